"""Running a cell over time: a masked ``lax.scan``, or an exact parallel scan."""

from __future__ import annotations

from typing import Any, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.cell import PRECISION, ReLUCell
from rnnjax.masking import length_mask
from rnnjax.parallel import relu_scan

__all__ = ["Method", "METHODS", "rnn", "resolve_method", "check_sequences"]

Method = Literal["sequential", "parallel", "auto"]
METHODS: tuple[str, ...] = get_args(Method)

# lax.scan unroll factor per backend, from benchmarks/NOTES.md: on a CPU unrolling does not pay
# (unroll 16 or more is 10-30x slower); on an H100 unroll 8 took a plain scan from 105 to 13.6 ms.
_UNROLL = {"cpu": 1}
_ACCELERATOR_UNROLL = 8


def check_sequences(xs: Any, name: str = "xs") -> jax.Array:
    """Returns ``xs`` as an array after checking that it is floating point with no empty axis."""
    xs = jnp.asarray(xs) if not isinstance(xs, jax.Array) else xs
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array; received dtype {xs.dtype}. "
            f"Convert it with {name}.astype(jnp.float32)."
        )
    if 0 in xs.shape:
        raise ValueError(
            f"{name} must hold at least one sequence and one time step; received shape {xs.shape}."
        )
    return xs


def _check_lengths(lengths: Any, batch: int, time: int) -> jax.Array:
    """Returns ``lengths`` as int32 after checking shape, dtype and (when concrete) range."""
    if not isinstance(lengths, jax.core.Tracer):  # under jit the values are unknown
        lengths = np.asarray(lengths)  # keeps int64 and uint types, so the range check sees them
    if lengths.shape != (batch,):
        raise ValueError(
            f"lengths must have shape (batch,) = ({batch},) to match xs; "
            f"received shape {lengths.shape}."
        )
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(
            f"lengths must be integers; received dtype {lengths.dtype}. "
            "Convert them with lengths.astype(jnp.int32)."
        )
    if isinstance(lengths, np.ndarray) and (lengths.min() < 0 or lengths.max() > time):
        raise ValueError(
            f"lengths must lie in [0, {time}] (the time axis of xs); "
            f"received values from {lengths.min()} to {lengths.max()}."
        )
    if isinstance(lengths, jax.core.Tracer) and jnp.iinfo(lengths.dtype).bits > 32:
        lengths = jnp.clip(lengths, 0, time)  # so that the cast below cannot wrap around
    return jnp.asarray(lengths).astype(jnp.int32)


def _parallel_refusal(cell: nn.Module) -> str | None:
    """Why ``cell`` cannot be evaluated in parallel, or None if it can."""
    if not isinstance(cell, ReLUCell):
        return (f"method='parallel' needs a ReLUCell; received {type(cell).__name__}. "
                "Use method='sequential'.")
    if not (cell.diagonal or cell.features == 1):
        return (f"method='parallel' needs a ReLUCell with features == 1 or diagonal=True; "
                f"received ReLUCell(features={cell.features}) whose W_hh is a full "
                f"{cell.features}x{cell.features} matrix. Use method='sequential', or "
                "ReLUCell(features, diagonal=True).")
    return None


def resolve_method(cell: nn.Module, method: str) -> str:
    """Returns the method ``rnn`` will use, or raises if ``cell`` cannot use the one asked for.

    "auto" takes "parallel" on an accelerator when the cell allows it (a plain scan launches
    work step by step there) and "sequential" on a CPU, where benchmarks/NOTES.md measured the
    scan 2-14x faster than the parallel form at every length from 1e2 to 1e6 steps.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; received {method!r}.")
    refusal = _parallel_refusal(cell)
    if method == "parallel" and refusal:
        raise ValueError(refusal)
    if method == "auto":
        return "parallel" if refusal is None and jax.default_backend() != "cpu" else "sequential"
    return method


def rnn(
    cell: nn.Module,
    params: Any,
    xs: jax.Array,
    lengths: jax.Array | None = None,
    *,
    initial_state: jax.Array | None = None,
    method: Method = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Runs ``cell`` over the time axis of ``xs``, each sequence stopping at its length.

    Past a sequence's length its state is frozen and its outputs are zero; padded inputs are
    replaced by zeros before they reach the cell, so neither the result nor its gradient depends
    on them (NaN included).

    Args:
      cell: a ``ReLUCell``; with ``method="sequential"``, any flax cell whose carry is one
        ``(batch, features)`` array and whose ``__call__(carry, x)`` returns
        ``(new_carry, output)`` (``states`` are then its carries).
      params: the cell's variables, as returned by ``cell.init``.
      xs: inputs, ``(batch, time, features)``, floating point.
      lengths: ``(batch,)`` integers in ``[0, time]``; None means every sequence is full. The
        range is checked when the values are concrete; under ``jit`` a length above ``time``
        acts as ``time`` and a negative one as 0.
      initial_state: ``(batch, cell.features)``; None means zeros.
      method: "sequential" (one ``lax.scan``), "parallel" (``lax.associative_scan`` in
        O(log time) depth, exact; ``ReLUCell`` with ``features == 1`` or ``diagonal=True``
        only), or "auto" (see ``resolve_method``).

    Returns:
      ``(final_state, states)``: ``final_state`` ``(batch, features)`` is the state after step
      ``lengths[b] - 1`` (the initial state where the length is 0); ``states``
      ``(batch, time, features)`` holds the state after each step, zero from ``lengths[b]`` on.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cell = ReLUCell(features=1)
      >>> xs = jnp.array([[[3.0], [5.0], [7.0]], [[1.0], [jnp.nan], [jnp.nan]]])
      >>> params = cell.init(jax.random.key(0), jnp.zeros((2, 1)), xs[:, 0])
      >>> final_state, states = rnn(cell, params, xs, jnp.array([3, 1]))
      >>> final_state.shape, states.shape, bool(jnp.isfinite(states).all())
      ((2, 1), (2, 3, 1), True)
    """
    xs = check_sequences(xs)
    if xs.ndim != 3:
        raise ValueError(
            f"xs must have shape (batch, time, features); received shape {xs.shape}. "
            "Add a features axis with xs[..., None], or a batch axis with xs[None]."
        )
    batch, time, _ = xs.shape
    method = resolve_method(cell, method)
    if lengths is None:
        lengths = jnp.full((batch,), time, jnp.int32)
    lengths = _check_lengths(lengths, batch, time)
    mask = length_mask(lengths, time)
    xs = jnp.where(mask[..., None], xs, 0)
    if initial_state is None:
        initial_state = cell.initialize_carry(jax.random.key(0), xs[:, 0].shape)
    initial_state = jnp.asarray(initial_state)
    if initial_state.shape != (batch, cell.features):
        raise ValueError(
            f"initial_state must have shape (batch, features) = ({batch}, {cell.features}); "
            f"received shape {initial_state.shape}."
        )
    # The carry's dtype is what one step returns (inputs, weights and state promoted together).
    initial_state = initial_state.astype(jnp.promote_types(xs.dtype, initial_state.dtype))
    step_shape = jax.eval_shape(lambda h, x: cell.apply(params, h, x)[0], initial_state, xs[:, 0])
    initial_state = initial_state.astype(step_shape.dtype)

    run = _parallel if method == "parallel" else _sequential
    final_state, carries = run(cell, params, xs, lengths, initial_state)
    return final_state, jnp.where(mask[..., None], carries, 0)


def _sequential(cell, params, xs, lengths, initial_state):
    """One ``lax.scan``; returns the final state and every carry, frozen past each length."""
    lengths = lengths[:, None]

    def step(carry, x):
        state, t = carry
        new_state, _ = cell.apply(params, state, x)
        # A step counter in the carry: cheaper than scanning over a mask (2x at batch 8 on a CPU).
        state = jnp.where(t < lengths, new_state, state)
        return (state, t + 1), state

    unroll = _UNROLL.get(jax.default_backend(), _ACCELERATOR_UNROLL)
    (final_state, _), carries = jax.lax.scan(
        step, (initial_state, jnp.zeros((), jnp.int32)), jnp.swapaxes(xs, 0, 1), unroll=unroll
    )
    return final_state, jnp.swapaxes(carries, 0, 1)


def _parallel(cell, params, xs, lengths, initial_state):
    """The same as ``_sequential``, by an associative scan of ramps (see rnnjax.parallel)."""
    weights = params["params"]
    inputs = jnp.dot(xs, weights["W_ih"], precision=PRECISION)
    w_hh = weights["W_hh"].reshape(-1).astype(inputs.dtype)
    carries = relu_scan(w_hh, inputs, lengths, initial_state.astype(inputs.dtype))
    return carries[:, -1], carries
