"""The seed networks: the L1 norm of a sequence (|x| made by negation, or learned), and running
counts of a binary sequence."""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from rnnjax.core import checks
from rnnjax.core.cell import PRECISION, ReLUCell
from rnnjax.core.masking import length_mask
from rnnjax.core.compensated import Precision
from rnnjax.core.module import RNN
from rnnjax.core.recurrence import Method

__all__ = ["L1Norm", "RunningCount", "L1NormLearned"]

_SCALAR_CELL = {"cell/W_hh": (1, 1), "cell/W_ih": (1, 1)}


class _Model(nn.Module):
    """A seed network: ``apply`` checks the variables against ``WEIGHTS`` (path -> shape) before
    flax reads them, and ``__call__`` checks ``xs`` and ``lengths`` through ``_arguments``; an
    ``rnnjax.RNN`` of a ``ReLUCell(1)`` runs the recurrence, its weights under ``"cell"``."""

    WEIGHTS: ClassVar[dict[str, tuple[int, ...]]] = _SCALAR_CELL
    method: Method = "auto"
    precision: Precision = "compensated"

    def setup(self):
        self.recurrence = RNN(ReLUCell(features=1), method=self.method, precision=self.precision, return_carry=True)
        nn.share_scope(self, self.recurrence)  # the cell's weights at "cell", not "recurrence/cell"

    def apply(self, variables, *args, **kwargs):
        expected = {"params": _nest(self.WEIGHTS)}
        checks.variables(f"{type(self).__name__} variables", variables, expected,
                         fix=f" Pass what {type(self).__name__}().init returns.")
        return super().apply(variables, *args, **kwargs)

    def _arguments(self, xs, lengths) -> tuple[jax.Array, jax.Array]:
        """``xs`` as ``(batch, time, 1)`` and ``lengths`` as int32."""
        xs = checks.floating_array("xs", xs, shapes=("(batch, time)", "(batch, time, 1)"))
        if xs.ndim == 3 and xs.shape[-1] != 1:
            raise checks.InputError(f"xs must have shape (batch, time) or (batch, time, 1); received shape "
                                    f"{xs.shape}. For a single sequence use xs[None].", "xs")
        xs = xs.reshape(*xs.shape[:2], 1)
        return xs, checks.lengths(lengths, *xs.shape[:2])


def _nest(flat: dict[str, tuple[int, ...]]) -> dict:
    """``{"cell/W_ih": shape}`` -> ``{"cell": {"W_ih": shape}}`` of ShapeDtypeStructs."""
    nested: dict = {}
    for path, shape in flat.items():
        *scopes, leaf = path.split("/")
        node = nested
        for scope in scopes:
            node = node.setdefault(scope, {})
        node[leaf] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return nested


class L1Norm(_Model):
    """Seed 000's network: the L1 norm of each sequence, from a bias-free ``ReLUCell(1)``.

    The input is made non-negative by negation where ``x < 0`` (no ``abs``, no norm); the
    output is the final state. With ``W_ih = W_hh = 1`` the state after step t is
    ``sum_{s<=t} |x_s|`` exactly; training finds those weights from a random init.

    Attributes:
      method: how ``rnnjax.rnn`` evaluates the recurrence ("sequential", "parallel", "auto";
        "auto" takes "parallel" from 256 steps on a CPU).
      precision: "compensated" (the default): with ``W_ih = W_hh = 1``, float32, either method
        is within 2 ulps (2.4e-7 relative) of the exact norm for every input of magnitude 1e-6
        to 1e6 and every length up to 1e8 (on a CPU or GPU; ``docs/accuracy.md``). "plain":
        every operation rounded once in float32; the loop then drifts to 0.46 at 1e8 steps,
        and the parallel scan's error grows with its block size (8.6e-6 measured).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = L1Norm()
      >>> xs, lengths = jnp.array([[3.0, -5.0, 7.0, -2.0]]), jnp.array([4])
      >>> variables = model.init(jax.random.key(0), xs, lengths)
      >>> model.apply(variables, xs, lengths).shape
      (1,)
    """

    def __call__(self, xs: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """Returns the predicted L1 norm of each sequence, ``(batch,)``.

        Args:
          xs: ``(batch, time)`` or ``(batch, time, 1)`` floats.
          lengths: ``(batch,)`` integers in ``[0, time]``; None means every sequence is full.
        """
        xs, lengths = self._arguments(xs, lengths)
        magnitudes = jnp.where(xs < 0, -xs, xs)
        final_state, _ = self.recurrence(magnitudes, seq_lengths=lengths)
        return final_state[:, 0]


class RunningCount(_Model):
    """Seed 003's network: a ``ReLUCell(1)`` on the raw inputs with an output at every step.

    On binary sequences, ``W_ih = W_hh = 1`` makes the output at step t the number of ones so
    far; training finds those weights from a random init.

    Attributes:
      method: how ``rnnjax.rnn`` evaluates the recurrence ("sequential", "parallel", "auto").
      precision: "compensated" (the default) or "plain", as ``rnnjax.rnn`` takes it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = RunningCount()
      >>> xs = jnp.array([[1.0, 0.0, 1.0, 1.0]])
      >>> variables = model.init(jax.random.key(0), xs)
      >>> model.apply(variables, xs).shape
      (1, 4)
    """

    def __call__(self, xs: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """Returns the state after every step, ``(batch, time)``, zero past each length.

        Args:
          xs: ``(batch, time)`` or ``(batch, time, 1)`` floats.
          lengths: ``(batch,)`` integers in ``[0, time]``; None means every sequence is full.
        """
        xs, lengths = self._arguments(xs, lengths)
        _, states = self.recurrence(xs, seq_lengths=lengths)
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
      precision: "compensated" (the default) or "plain", as ``rnnjax.rnn`` takes it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = L1NormLearned()
      >>> xs = jnp.array([[3.0, -5.0, 7.0, -2.0]])
      >>> variables = model.init(jax.random.key(0), xs)
      >>> model.apply(variables, xs).shape, sorted(L1NormLearned.function_weights(variables))
      ((1,), ['cell/W_hh', 'slope_neg', 'slope_pos'])
    """

    WEIGHTS: ClassVar[dict[str, tuple[int, ...]]] = {**_SCALAR_CELL, "cell/W_ih": (2, 1), "dense/kernel": (1, 2)}

    def setup(self):
        super().setup()
        # PyTorch's nn.Linear init, U(-1/sqrt(in), 1/sqrt(in)), like the cell's.
        init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        self.dense = nn.Dense(2, use_bias=False, kernel_init=init, precision=PRECISION)

    def __call__(self, xs: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """Returns the predicted L1 norm of each sequence, ``(batch,)``.

        Args:
          xs: ``(batch, time)`` or ``(batch, time, 1)`` floats.
          lengths: ``(batch,)`` integers in ``[0, time]``; None means every sequence is full.
        """
        xs, lengths = self._arguments(xs, lengths)
        # the dense layer sees no padding, so nothing depends on it (NaN included)
        xs = jnp.where(length_mask(lengths, xs.shape[1])[..., None], xs, 0)
        final_state, _ = self.recurrence(nn.relu(self.dense(xs)), seq_lengths=lengths)
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
