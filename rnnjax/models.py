"""The seed networks: the L1 norm of a sequence (|x| made by negation, or learned), and running
counts of a binary sequence."""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from rnnjax.cell import PRECISION, ReLUCell
from rnnjax.masking import check_lengths, length_mask
from rnnjax.recurrence import Method, check_sequences, resolve_method, rnn

__all__ = ["L1Norm", "RunningCount", "L1NormLearned"]


def _scalar_sequences(xs) -> jax.Array:
    """Returns ``xs`` as ``(batch, time, 1)``, from ``(batch, time)`` or ``(batch, time, 1)``."""
    xs = check_sequences(xs)
    if xs.ndim == 2:
        return xs[..., None]
    if xs.ndim == 3 and xs.shape[-1] == 1:
        return xs
    raise ValueError(
        f"xs must have shape (batch, time) or (batch, time, 1); received shape {xs.shape}. "
        "For a single sequence use xs[None]."
    )


def _check_weights(module: nn.Module, expected: dict[str, tuple[int, ...]]) -> None:
    """Refuses variables whose weights are not ``expected`` (path -> shape) or not floating point,
    quoting both; flax's own errors name one scope at a time, or the wrong one."""
    if module.is_initializing():
        return
    model = type(module).__name__
    if module.variables and "params" not in module.variables:
        raise ValueError(f"{model}: the variables must be {{'params': weights}}, as {model}().init returns them; "
                         f"received a dict with keys {sorted(module.variables)}. Weights alone go in as "
                         "{'params': weights}.")
    flat = jax.tree_util.tree_flatten_with_path(module.variables.get("params", {}))[0]
    weights = {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}
    received = {name: tuple(jnp.shape(w)) for name, w in sorted(weights.items())}
    if received != expected:
        raise ValueError(f"{model}: the variables must hold the weights {model}().init makes, {{'params': ...}} "
                         f"with {expected}; received {received}.")
    for name, w in weights.items():
        if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
            raise TypeError(f"{model}: weights must be floating point; received {jnp.result_type(w)} for "
                            f"{name}. Cast them with jax.tree.map(lambda w: w.astype(jnp.float32), variables).")


_CELL = {"cell/W_hh": (1, 1), "cell/W_ih": (1, 1)}


class _Model(nn.Module):
    """A seed network: ``apply`` refuses variables that are not a dict before flax reads them."""

    def apply(self, variables, *args, **kwargs):
        if not isinstance(variables, Mapping):
            model = type(self).__name__
            raise TypeError(f"{model}.apply: variables must be a dict, {{'params': weights}}, as {model}().init "
                            f"returns them; received {type(variables).__name__}.")
        return super().apply(variables, *args, **kwargs)


def _scalar_cell_rnn(module: nn.Module, xs: jax.Array, lengths, method: Method):
    """Runs a ``ReLUCell(1)`` owned by ``module`` (its weights under "cell") over ``xs``."""
    cell = ReLUCell(features=1)
    resolve_method(cell, method)  # a bad method fails before any weight is created
    weights = module.param(
        "cell",
        lambda key: cell.init(key, cell.initialize_carry(key, xs[:, 0].shape), xs[:, 0])["params"],
    )
    return rnn(cell, {"params": weights}, xs, lengths, method=method)


class L1Norm(_Model):
    """Seed 000's network: the L1 norm of each sequence, from a bias-free ``ReLUCell(1)``.

    The input is made non-negative by negation where ``x < 0`` (no ``abs``, no norm); the
    output is the final state. With ``W_ih = W_hh = 1`` the state after step t is
    ``sum_{s<=t} |x_s|`` exactly; training finds those weights from a random init.

    Attributes:
      method: how ``rnnjax.rnn`` evaluates the recurrence ("sequential", "parallel", "auto").
        "auto" takes "parallel" from 256 steps on: it sums in tree order and keeps float32
        within 1e-6 of the exact norm up to 1e8 steps, where the sequential loop drifts to 0.46.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = L1Norm()
      >>> xs, lengths = jnp.array([[3.0, -5.0, 7.0, -2.0]]), jnp.array([4])
      >>> variables = model.init(jax.random.key(0), xs, lengths)
      >>> model.apply(variables, xs, lengths).shape
      (1,)
    """

    method: Method = "auto"

    @nn.compact
    def __call__(self, xs: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """Returns the predicted L1 norm of each sequence, ``(batch,)``.

        Args:
          xs: ``(batch, time)`` or ``(batch, time, 1)`` floats.
          lengths: ``(batch,)`` integers in ``[0, time]``; None means every sequence is full.
        """
        _check_weights(self, _CELL)
        xs = _scalar_sequences(xs)
        magnitudes = jnp.where(xs < 0, -xs, xs)
        final_state, _ = _scalar_cell_rnn(self, magnitudes, lengths, self.method)
        return final_state[:, 0]


class RunningCount(_Model):
    """Seed 003's network: a ``ReLUCell(1)`` on the raw inputs with an output at every step.

    On binary sequences, ``W_ih = W_hh = 1`` makes the output at step t the number of ones so
    far; training finds those weights from a random init.

    Attributes:
      method: how ``rnnjax.rnn`` evaluates the recurrence ("sequential", "parallel", "auto").

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = RunningCount()
      >>> xs = jnp.array([[1.0, 0.0, 1.0, 1.0]])
      >>> variables = model.init(jax.random.key(0), xs)
      >>> model.apply(variables, xs).shape
      (1, 4)
    """

    method: Method = "auto"

    @nn.compact
    def __call__(self, xs: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """Returns the state after every step, ``(batch, time)``, zero past each length.

        Args:
          xs: ``(batch, time)`` or ``(batch, time, 1)`` floats.
          lengths: ``(batch,)`` integers in ``[0, time]``; None means every sequence is full.
        """
        _check_weights(self, _CELL)
        _, states = _scalar_cell_rnn(self, _scalar_sequences(xs), lengths, self.method)
        return states[..., 0]


class L1NormLearned(_Model):
    """The L1 norm with ``|x|`` learned too: a bias-free dense layer from ``x`` to 2 units, a
    ReLU, then a bias-free ``ReLUCell(1)`` on those 2 inputs; the output is the final state.

    Nothing in the model looks at the sign of an input (no ``abs``, ``where``, ``sign`` or
    comparison): ``|x| = relu(x) + relu(-x)`` has to be found by training, as one unit with a
    positive weight and one with a negative one. The function is

        h_t = relu(slope_pos * relu(x_t) + slope_neg * relu(-x_t) + W_hh * h_{t-1}),

    where ``slope_pos = sum_i W_ih[i] relu(kernel[i])`` and
    ``slope_neg = sum_i W_ih[i] relu(-kernel[i])``: every weight set with
    ``slope_pos = slope_neg = W_hh = 1`` computes the L1 norm exactly, so the weights are not
    unique but those three numbers are (``function_weights``).

    Attributes:
      method: how ``rnnjax.rnn`` evaluates the recurrence ("sequential", "parallel", "auto").

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = L1NormLearned()
      >>> xs = jnp.array([[3.0, -5.0, 7.0, -2.0]])
      >>> variables = model.init(jax.random.key(0), xs)
      >>> model.apply(variables, xs).shape, sorted(L1NormLearned.function_weights(variables))
      ((1,), ['cell/W_hh', 'slope_neg', 'slope_pos'])
    """

    method: Method = "auto"

    @nn.compact
    def __call__(self, xs: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """Returns the predicted L1 norm of each sequence, ``(batch,)``.

        Args:
          xs: ``(batch, time)`` or ``(batch, time, 1)`` floats.
          lengths: ``(batch,)`` integers in ``[0, time]``; None means every sequence is full.
        """
        _check_weights(self, {"cell/W_hh": (1, 1), "cell/W_ih": (2, 1), "dense/kernel": (1, 2)})
        xs = _scalar_sequences(xs)
        if lengths is not None:  # the dense layer sees no padding, so nothing depends on it (NaN included)
            lengths = check_lengths(lengths, *xs.shape[:2])
            xs = jnp.where(length_mask(lengths, xs.shape[1])[..., None], xs, 0)
        # PyTorch's nn.Linear init, U(-1/sqrt(in), 1/sqrt(in)), like the cell's.
        init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        units = nn.relu(nn.Dense(2, use_bias=False, kernel_init=init, name="dense",
                                 precision=PRECISION)(xs))
        final_state, _ = _scalar_cell_rnn(self, units, lengths, self.method)
        return final_state[:, 0]

    @staticmethod
    def function_weights(variables) -> dict[str, jax.Array]:
        """Returns the three numbers that fix the function: ``slope_pos`` and ``slope_neg``
        (what a positive and a negative input of size 1 add to the cell's pre-activation) and
        ``cell/W_hh``; the L1 norm is computed exactly when all three are 1."""
        kernel = variables["params"]["dense"]["kernel"][0]
        w_ih = variables["params"]["cell"]["W_ih"][:, 0]
        return {"slope_pos": jnp.dot(nn.relu(kernel), w_ih, precision=PRECISION),
                "slope_neg": jnp.dot(nn.relu(-kernel), w_ih, precision=PRECISION),
                "cell/W_hh": variables["params"]["cell"]["W_hh"][0, 0]}
