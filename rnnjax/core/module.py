"""``RNN``: flax's ``nn.RNN`` interface over ``rnnjax.rnn``, with exact masking and the parallel
method."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from rnnjax.core import checks
from rnnjax.core.cell import ReLUCell
from rnnjax.core.compensated import PRECISIONS, Precision
from rnnjax.core.recurrence import METHODS, Method, default_unroll, initial_carry, resolve_method, run

__all__ = ["RNN"]

# The lifted-scan options of flax's nn.RNN, at their defaults: a cell whose only variables are
# broadcast weights and that draws no random numbers per step.
_LIFTED_DEFAULTS = {"variable_axes": FrozenDict(), "variable_broadcast": "params",
                    "variable_carry": False, "split_rngs": FrozenDict({"params": False})}


class RNN(nn.Module):
    """Runs a recurrent cell over the time axis: flax's ``nn.RNN``, with exact masking.

    A drop-in for ``nn.RNN``: the same attributes, call arguments, variable layout (the cell's
    weights under ``'cell'``) and output shapes, and ``nn.Bidirectional`` takes it. It adds
    ``method``, and differs from ``nn.RNN`` in two ways, on purpose: outputs past a sequence's
    length are zero (``nn.RNN`` leaves what the cell computed over the padding), and a sequence
    of length 0 returns its initial carry. Neither the outputs nor their gradients depend on
    what the padding holds (NaN included). It runs ``rnnjax.rnn``'s implementation: a
    ``ReLUCell`` with its weights passed in (so ``method="parallel"`` and ``"auto"`` apply), any
    other cell in flax's lifted ``nn.scan`` with the lifted-scan options below (so cells with
    dropout, per-step variables or a ``ConvLSTMCell`` run as under ``nn.RNN``).

    Attributes:
      cell: a flax recurrent cell (``ReLUCell``, ``nn.LSTMCell``, ``nn.GRUCell``,
        ``nn.ConvLSTMCell``, ...).
      time_major: inputs ``(time, *batch, *features)`` instead of ``(*batch, time, *features)``.
      return_carry: return ``(carry, outputs)`` instead of the outputs alone.
      reverse: run each sequence from its last real step back; the padding stays at the end.
      keep_order: with ``reverse``, return the outputs in the inputs' order.
      unroll: ``lax.scan``'s unroll; None (the default) takes the measured best for the backend
        (1 on a CPU, 8 on an accelerator).
      variable_axes, variable_broadcast, variable_carry, split_rngs: flax's ``nn.scan`` options,
        as in ``nn.RNN``; a ``ReLUCell`` runs under the defaults only.
      method: "sequential", "parallel" (a ``ReLUCell`` with ``features == 1`` or
        ``diagonal=True``: the exact blocked scan) or "auto" (see ``rnnjax.rnn``).
      precision: "compensated" or "plain", as in ``rnnjax.rnn`` (a scalar or diagonal
        ``ReLUCell`` under the default lifted options; other cells run plain).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from rnnjax import ReLUCell
      >>> layer = RNN(ReLUCell(features=1), method="parallel")
      >>> xs = jnp.array([[[3.0], [5.0], [jnp.nan]]])
      >>> variables = layer.init(jax.random.key(0), xs, seq_lengths=jnp.array([2]))
      >>> layer.apply(variables, xs, seq_lengths=jnp.array([2])).shape
      (1, 3, 1)
    """

    cell: nn.RNNCellBase
    time_major: bool = False
    return_carry: bool = False
    reverse: bool = False
    keep_order: bool = False
    unroll: int | None = None
    variable_axes: Mapping[Any, Any] = FrozenDict()
    variable_broadcast: Any = "params"
    variable_carry: Any = False
    split_rngs: Mapping[Any, bool] = FrozenDict({"params": False})
    method: Method = "auto"
    precision: Precision = "compensated"

    def __call__(
        self,
        inputs: jax.Array,
        *,
        initial_carry: Any = None,
        init_key: jax.Array | None = None,
        seq_lengths: jax.Array | None = None,
        return_carry: bool | None = None,
        time_major: bool | None = None,
        reverse: bool | None = None,
        keep_order: bool | None = None,
    ) -> Any:
        """Runs the cell over ``inputs``.

        Args:
          inputs: ``(*batch, time, *features)``, or ``(time, *batch, *features)`` if
            ``time_major``; ``features`` has ``cell.num_feature_axes`` axes.
          initial_carry: the carry before the first step; None means
            ``cell.initialize_carry(init_key, one_step_shape)``.
          init_key: the key for ``initialize_carry``; None means ``jax.random.key(0)``.
          seq_lengths: ``(*batch,)`` integers in ``[0, time]``; None means every sequence is full.
          return_carry, time_major, reverse, keep_order: override the attributes for this call.

        Returns:
          the outputs ``(*batch, time, *out_features)`` (time first if ``time_major``), zero past
          each length; with ``return_carry``, ``(carry, outputs)``, the carry after each
          sequence's last real step.
        """
        given = {"return_carry": return_carry, "time_major": time_major, "reverse": reverse,
                 "keep_order": keep_order}
        option = {name: getattr(self, name) if value is None else value for name, value in given.items()}
        lifted = {name: getattr(self, name) for name in _LIFTED_DEFAULTS}
        xs, lengths, carry, method = self._arguments(inputs, seq_lengths, initial_carry, init_key,
                                                     option["time_major"], lifted)
        if isinstance(self.cell, ReLUCell) and lifted == _LIFTED_DEFAULTS:
            if self.is_initializing():  # creates the weights as nn.RNN's scan does: same values
                self.cell(carry, xs[(slice(None),) * lengths.ndim + (0,)])
            final_carry, outputs = run(self.cell.clone(parent=None), self.cell.variables, xs, lengths, carry,
                                       method, reverse=option["reverse"], keep_order=option["keep_order"],
                                       precision=self.precision, unroll=self.unroll)
        else:
            final_carry, outputs = run(self.cell, None, xs, lengths, carry, method, reverse=option["reverse"],
                                       keep_order=option["keep_order"], loop=self._lifted_scan)
        if option["time_major"]:
            outputs = jax.tree.map(lambda out: jnp.moveaxis(out, lengths.ndim, 0), outputs)
        return (final_carry, outputs) if option["return_carry"] else outputs

    def _arguments(self, inputs, seq_lengths, given_carry, init_key, time_major, lifted):
        """Checks the call's arguments; returns inputs batch-major, the lengths, the initial
        carry and the method to run."""
        cell = checks.cell("cell", self.cell)
        method = checks.choice("method", self.method, METHODS)
        checks.choice("precision", self.precision, PRECISIONS)
        features = cell.num_feature_axes
        layout = "(time, *batch, *features)" if time_major else "(*batch, time, *features)"
        xs = checks.floating_array("inputs", inputs, complex_ok=True, shapes=(layout.replace("*features", (
            "features" if features == 1 else ", ".join(f"feature_{axis}" for axis in range(features)))),))
        if time_major:
            xs = jnp.moveaxis(xs, 0, xs.ndim - features - 1)
        batch_shape = xs.shape[:xs.ndim - features - 1]
        time = xs.shape[len(batch_shape)]
        lengths = checks.lengths(seq_lengths, batch_shape if len(batch_shape) != 1 else batch_shape[0], time,
                                 sequences="inputs", name="seq_lengths")
        step_shape = (*batch_shape, *xs.shape[len(batch_shape) + 1:])
        key = jax.random.key(0) if init_key is None else checks.key("init_key", init_key)
        expected = jax.eval_shape(lambda: cell.initialize_carry(key, step_shape))
        carry = initial_carry("initial_carry", given_carry, expected)
        if carry is None:
            carry = cell.initialize_carry(key, step_shape)
        if lifted != _LIFTED_DEFAULTS and method == "parallel":
            raise checks.InputError("method='parallel' runs a ReLUCell under nn.scan's default options; "
                                    f"received {lifted}. Use method='sequential'.", "method")
        method = "sequential" if lifted != _LIFTED_DEFAULTS else method
        return xs, lengths, carry, resolve_method(cell, method, time=time, dtype=xs.dtype)

    @nn.nowrap
    def _lifted_scan(self, body, carry, xs):
        """``run``'s loop for cells that own variables or random numbers: flax's ``nn.scan``."""
        scan = nn.scan(body, variable_axes=self.variable_axes, variable_broadcast=self.variable_broadcast,
                       variable_carry=self.variable_carry, split_rngs=self.split_rngs,
                       in_axes=0, out_axes=0, unroll=self.unroll or default_unroll())
        return scan(self.cell, carry, xs)
