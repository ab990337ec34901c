"""rnnjax: exact, fast recurrent networks with a bias-free ReLU cell, in JAX and Flax.

The names below load on first use, so that ``import rnnjax`` alone does not import JAX: the
``rnnjax`` command can then answer Ctrl-C during its start-up like anywhere else.
"""

import importlib

__all__ = ["ReLUCell", "rnn", "L1Norm", "L1NormLearned", "RunningCount", "bptt", "data", "devices",
           "recipes", "sweep", "train"]
__version__ = "0.1.0"

_HOMES = {"ReLUCell": "rnnjax.cell", "rnn": "rnnjax.recurrence", "L1Norm": "rnnjax.models",
          "L1NormLearned": "rnnjax.models", "RunningCount": "rnnjax.models", "bptt": "rnnjax.bptt",
          "data": "rnnjax.data", "devices": "rnnjax.devices", "recipes": "rnnjax.recipes",
          "sweep": "rnnjax.sweep", "train": "rnnjax.train"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'rnnjax' has no attribute {name!r}")
    module = importlib.import_module(_HOMES[name])
    value = module if module.__name__ == f"rnnjax.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
