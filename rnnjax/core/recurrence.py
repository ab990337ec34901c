"""Running a cell over time: a masked ``lax.scan``, or an exact parallel scan."""

from __future__ import annotations

from typing import Any, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.core import checks, compensated
from rnnjax.core.cell import PRECISION, ReLUCell
from rnnjax.core.compensated import PRECISIONS, Precision
from rnnjax.core.masking import length_mask
from rnnjax.core.parallel import scan

__all__ = ["Method", "METHODS", "rnn", "run", "resolve_method"]

Method = Literal["sequential", "parallel", "auto"]
METHODS: tuple[str, ...] = get_args(Method)

# lax.scan unroll factor per backend, from benchmarks/NOTES.md: on a CPU unrolling does not pay
# (unroll 16 or more is 10-30x slower); on an H100 unroll 8 took a plain scan from 105 to 13.6 ms.
_UNROLL = {"cpu": 1}
_ACCELERATOR_UNROLL = 8

# From this many steps on, "auto" runs a ReLU cell in parallel on a CPU too. Chosen on the plain
# loop's accuracy: its float32 L1 norm of N(0, 1) inputs, worst of 40 sequences, is 5.2e-7 off at
# 256 steps, 8.6e-7 at 512, 1.1e-6 at 1024 and 0.46 at 1e8; the plain blocked scan's 2.3e-7 or
# less at every length up to 1e8 (benchmarks/NOTES.md, "What auto picks"). Compensated (the
# default), both are within 2 ulps at every length (docs/accuracy.md).
AUTO_PARALLEL_FROM = 256


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


def resolve_method(cell: nn.Module, method: str, *, time: int | None = None) -> str:
    """Returns the method ``rnn`` will use, or raises if ``cell`` cannot use the one asked for.

    "auto" is the fastest method that is accurate (benchmarks/NOTES.md, "What auto picks"):
    "parallel" whenever the cell allows it, on an accelerator (a plain scan launches work step
    by step there) and on a CPU from ``AUTO_PARALLEL_FROM`` (256) steps on, where the loop's
    float32 sums start to drift towards 1e-6 relative; "sequential" otherwise.

    Args:
      cell: the cell ``rnn`` runs.
      method: "sequential", "parallel" or "auto" (checked by the caller).
      time: the number of steps, for "auto"; None counts as short.
    """
    refusal = _parallel_refusal(cell)
    if method == "parallel" and refusal:
        raise checks.InputError(refusal, "method")
    if method == "auto":
        long = time is not None and time >= AUTO_PARALLEL_FROM
        return "parallel" if refusal is None and (long or jax.default_backend() != "cpu") else "sequential"
    return method


def rnn(
    cell: nn.Module,
    params: Any,
    xs: jax.Array,
    lengths: jax.Array | None = None,
    *,
    initial_state: Any = None,
    method: Method = "auto",
    precision: Precision = "compensated",
) -> tuple[Any, jax.Array]:
    """Runs ``cell`` over the time axis of ``xs``, each sequence stopping at its length.

    Past a sequence's length its carry is frozen and its outputs are zero; padded inputs are
    replaced by zeros before they reach the cell, so neither the result nor its gradient depends
    on them (NaN included).

    Args:
      cell: a ``ReLUCell``; with ``method="sequential"``, any flax cell whose
        ``__call__(carry, x)`` returns ``(new_carry, output)`` and whose carry is an array or a
        pytree of arrays (``nn.LSTMCell``, ``nn.GRUCell``, ...).
      params: the cell's variables, as returned by ``cell.init``.
      xs: inputs, ``(batch, time, features)``, floating point.
      lengths: ``(batch,)`` integers in ``[0, time]``; None means every sequence is full. The
        range is checked when the values are concrete; under ``jit`` a length above ``time``
        acts as ``time`` and a negative one as 0, whatever the integer type.
      initial_state: the carry before the first step, shaped like
        ``cell.initialize_carry(key, xs[:, 0].shape)``; None means that (zeros).
      method: "sequential" (one ``lax.scan``), "parallel" (the exact blocked scan of
        ``rnnjax.core.parallel``; ``ReLUCell`` with ``features == 1`` or ``diagonal=True`` only;
        weights below float32 precision are computed in float32 and returned in their dtype,
        saturating at its largest finite value: 65504 for float16, where the loop's float16
        sum of ones stalls at 2048), or "auto" (see
        ``resolve_method``).
      precision: "compensated" (the default) carries a ``ReLUCell``'s recurrence, with
        ``features == 1`` or ``diagonal=True``, as if in twice the working precision (float64
        for float32 on a CPU or GPU, double words otherwise: ``rnnjax.core.compensated``), in
        the loop and in the parallel scan alike, and rounds each state once: within
        ``u |h_t| + c u**2 S_t`` of the exact state, ``u`` the unit roundoff and ``S_t`` the
        recurrence's condition number times ``|h_t|`` (the constants: ``docs/accuracy.md``);
        float32 L1 norms within 2 ulps at any length. "plain" rounds every operation once, as
        the cell does (the loop's float32 sums drift, the parallel scan's error depends on its
        block size). Other cells, a full ``W_hh`` and float16 or bfloat16 cells in the loop run
        plain either way.

    Returns:
      ``(final_state, states)``: ``final_state`` is the carry after step ``lengths[b] - 1`` (the
      initial state where the length is 0); ``states`` ``(batch, time, out_features)`` holds the
      cell's output at each step, zero from ``lengths[b]`` on. For a ``ReLUCell`` the output is
      the state, ``(batch, time, features)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cell = ReLUCell(features=1)
      >>> xs = jnp.array([[[3.0], [5.0], [7.0]], [[1.0], [jnp.nan], [jnp.nan]]])
      >>> params = cell.init(jax.random.key(0), jnp.zeros((2, 1)), xs[:, 0])
      >>> final_state, states = rnn(cell, params, xs, jnp.array([3, 1]))
      >>> final_state.shape, states.shape, bool(jnp.isfinite(states).all())
      ((2, 1), (2, 3, 1), True)
    """
    cell = checks.cell("cell", cell)
    xs = checks.floating_array("xs", xs, shapes=("(batch, time, features)",))
    method = checks.choice("method", method, METHODS)
    precision = checks.choice("precision", precision, PRECISIONS)
    batch, time, _ = xs.shape
    expected_params, expected_carry = _expected(cell, xs)
    params = checks.variables("params", params, expected_params, what=f"this cell and xs of shape {xs.shape}",
                              fix=f" Initialise the cell with inputs shaped like xs[:, 0] = {xs[:, 0].shape}.")
    lengths = checks.lengths(lengths, batch, time)
    initial_state = _initial_state(initial_state, expected_carry)
    return run(cell, params, xs, lengths, initial_state, resolve_method(cell, method, time=time),
               precision=precision)


def run(cell: nn.Module, params: Any, xs: jax.Array, lengths: jax.Array, initial_state: Any,
        method: str, *, precision: str = "compensated") -> tuple[Any, jax.Array]:
    """``rnn`` on checked arguments: ``lengths`` int32 in ``[0, time]``, ``initial_state`` the
    carry (or None for zeros), ``method`` "sequential" or "parallel" (as ``resolve_method``
    returns it). What the models call after checking their own arguments."""
    time = xs.shape[1]
    if initial_state is None:
        initial_state = cell.initialize_carry(jax.random.key(0), xs[:, 0].shape)
    # The carry in the dtype one step returns (inputs, weights and state promoted together).
    step = jax.eval_shape(lambda h, x: cell.apply(params, h, x)[0], initial_state, xs[:, 0])
    initial_state = jax.tree.map(lambda h, s: h.astype(s.dtype), initial_state, step)
    xs = jnp.where(length_mask(lengths, time)[..., None], xs, 0)
    return (_parallel if method == "parallel" else _sequential)(cell, params, xs, lengths, initial_state,
                                                                precision=precision)


def _expected(cell: nn.Module, xs: jax.Array) -> tuple[Any, Any]:
    """The shapes of ``cell.init``'s variables and of its zero carry for inputs like ``xs``: one
    trace of the cell."""
    def init(key, step):
        carry = cell.initialize_carry(key, step.shape)
        return cell.init(key, carry, step), carry

    return jax.eval_shape(init, jax.random.key(0), xs[:, 0])


def _initial_state(initial_state: Any, expected: Any) -> Any:
    """Checks ``initial_state`` against the shapes of the cell's carry; None stays None."""
    if initial_state is None:
        return None
    leaves = jax.tree.leaves(initial_state)
    if not leaves or not all(isinstance(leaf, jax.Array) or np.asarray(leaf).dtype.kind in "biuf" for leaf in leaves):
        raise checks.InputError(f"initial_state must be an array, or a pytree of arrays like the cell's carry; "
                                f"received {type(initial_state).__name__}.", "initial_state")
    initial_state = jax.tree.map(jnp.asarray, initial_state)
    received = jax.tree.map(lambda leaf: leaf.shape, initial_state)
    shapes = jax.tree.map(lambda leaf: leaf.shape, expected)
    if received != shapes:
        if isinstance(expected, jax.ShapeDtypeStruct):
            raise checks.InputError(f"initial_state must have shape (batch, features) = {shapes}; "
                                    f"received shape {received}.", "initial_state")
        raise checks.InputError(
            f"initial_state must be shaped like the cell's carry {shapes}; received {received}. "
            "Leave it None for zeros, or start from cell.initialize_carry(key, xs[:, 0].shape).",
            "initial_state")
    return initial_state


def _sequential(cell, params, xs, lengths, initial_state, *, precision="compensated"):
    """One ``lax.scan``; returns the final carry and the outputs, zero past each length.
    Compensated (``_compensated_loop``) for a ``ReLUCell`` with ``features == 1`` or
    ``diagonal=True`` computed in float32 or float64."""
    if (precision == "compensated" and _parallel_refusal(cell) is None
            and initial_state.dtype in (jnp.float32, jnp.float64)):
        return _compensated_loop(cell, params, xs, lengths, initial_state)
    lengths = lengths[:, None]

    def step(carry, x):
        state, t = carry
        new_state, output = cell.apply(params, state, x)
        # A step counter in the carry: cheaper than scanning over a mask (2x at batch 8 on a CPU).
        active = t < lengths
        state = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_state, state)
        return (state, t + 1), jnp.where(active, output, 0)

    unroll = _UNROLL.get(jax.default_backend(), _ACCELERATOR_UNROLL)
    (final_state, _), outputs = jax.lax.scan(
        step, (initial_state, jnp.zeros((), jnp.int32)), jnp.swapaxes(xs, 0, 1), unroll=unroll
    )
    return final_state, jnp.swapaxes(outputs, 0, 1)


def _compensated_loop(cell, params, xs, lengths, initial_state):
    """``_sequential`` for a scalar or diagonal ``ReLUCell`` in the wide arithmetic of
    ``rnnjax.core.compensated`` (``loop``): each output is the state rounded once."""
    weights = params["params"]
    dtype = initial_state.dtype
    inputs, inputs_low = _projected(xs, weights["W_ih"].astype(dtype), compensate=True)
    w_hh = weights["W_hh"].reshape(-1).astype(dtype)
    return compensated.loop(w_hh, inputs, inputs_low, lengths, initial_state)


# Up to this many input features the compensated projection sums its products in double words
# (a loop over the features, unrolled); beyond, it is one rounded dot product.
_COMPENSATED_DOT_FEATURES = 16


def _projected(xs, w_ih, *, compensate):
    """``(inputs, inputs_low)``: ``xs @ w_ih`` ``(batch, time, features)`` and, where
    ``compensate``, its rounding error (zeros otherwise, and beyond
    ``_COMPENSATED_DOT_FEATURES`` input features), which carries no derivative."""
    compute = w_ih.dtype
    if w_ih.shape == (1, 1):  # a product of (batch, time) arrays, which fuses with what makes
        # xs; its gradient is then a sum over two axes (with the features axis of 1 kept, XLA's
        # CPU reduction ran 10x slower: 37 ms at T = 1e6, batch 8)
        x = xs[..., 0].astype(compute)
        inputs = (x * w_ih[0, 0])[..., None]
        low = compensated.product_error(x, w_ih[0, 0])[..., None] if compensate else None
    elif w_ih.shape[0] == 1:  # one input feature: a product, which fuses with what makes xs
        inputs = xs.astype(compute) * w_ih[0]
        low = compensated.product_error(xs.astype(compute), w_ih[0]) if compensate else None
    elif compensate and w_ih.shape[0] <= _COMPENSATED_DOT_FEATURES:
        # Dot2 (Ogita, Rump and Oishi): the products' and the sums' errors summed apart.
        x = xs.astype(compute)
        inputs, low = compensated.two_product(x[..., :1], w_ih[0])
        for i in range(1, w_ih.shape[0]):
            product, product_error = compensated.two_product(x[..., i:i + 1], w_ih[i])
            inputs, sum_error = compensated.two_sum(inputs, product)
            low = low + (sum_error + product_error)
    else:
        inputs = jnp.dot(xs.astype(compute), w_ih, precision=PRECISION)
        low = None
    if not compensate:
        return inputs, None
    return inputs, jax.lax.stop_gradient(jnp.zeros_like(inputs) if low is None else low)


def _parallel(cell, params, xs, lengths, initial_state, *, precision="compensated"):
    """The same as ``_sequential``, by the exact blocked scan of ``rnnjax.core.parallel``."""
    weights = params["params"]
    dtype = initial_state.dtype
    compute = jnp.promote_types(dtype, jnp.float32)  # float16 and bfloat16 weights: float32
    inputs, inputs_low = _projected(xs, weights["W_ih"].astype(compute),
                                    compensate=precision == "compensated")
    w_hh = weights["W_hh"].reshape(-1).astype(compute)
    final_state, states = scan(w_hh, inputs, lengths, initial_state.astype(compute),
                               precision=precision, inputs_low=inputs_low)
    if dtype == compute:
        return final_state, states
    largest = jnp.finfo(dtype).max  # a float32 state past float16's range saturates, not inf
    return (jnp.minimum(final_state, largest).astype(dtype),
            jnp.minimum(states, largest).astype(dtype))
