"""rnnjax: exact, fast recurrent networks with a bias-free ReLU cell, in JAX and Flax.

The package has three layers, each importing only those below it: ``rnnjax.core`` (the cell,
the recurrence, the exact parallel scan), ``rnnjax.training`` (models, ``fit``, sweeps,
checkpoints) and ``rnnjax.app`` (the ``rnnjax`` command, run folders, input files). The public
API is the names below; they load on first use, so ``import rnnjax`` does not import JAX.

Example:
  >>> import jax, jax.numpy as jnp, rnnjax
  >>> cell = rnnjax.ReLUCell(features=1)
  >>> xs, lengths = jnp.array([[[3.0], [5.0], [7.0]]]), jnp.array([2])
  >>> params = cell.init(jax.random.key(0), jnp.zeros((1, 1)), xs[:, 0])
  >>> final_state, states = rnnjax.rnn(cell, params, xs, lengths)
  >>> states.shape
  (1, 3, 1)
"""

import importlib
import importlib.util
import sys

__all__ = ["ReLUCell", "RNN", "rnn", "relu_scan", "L1Norm", "L1NormLearned", "RunningCount", "fit",
           "sweep", "squared_error", "InputError", "data", "bptt"]
__version__ = "0.1.0"

_HOMES = {"ReLUCell": "rnnjax.core.cell", "RNN": "rnnjax.core.module", "rnn": "rnnjax.core.recurrence",
          "relu_scan": "rnnjax.core.parallel", "InputError": "rnnjax.core.checks",
          "L1Norm": "rnnjax.training.models", "L1NormLearned": "rnnjax.training.models",
          "RunningCount": "rnnjax.training.models", "fit": "rnnjax.training.fit",
          "squared_error": "rnnjax.training.fit", "sweep": "rnnjax.training.sweep"}
_MODULES = {"data": "rnnjax.training.data", "bptt": "rnnjax.core.bptt"}


def _lazy_module(name: str, home: str):
    """``home`` as a module that loads on first attribute access, importable as ``name`` too
    (``from rnnjax.data import l1_batch``)."""
    spec = importlib.util.find_spec(home)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[home] = sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


for _name, _home in _MODULES.items():
    globals()[_name] = sys.modules.get(_home) or _lazy_module(f"rnnjax.{_name}", _home)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'rnnjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
