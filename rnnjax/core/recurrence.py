"""Running a cell over time: a masked ``lax.scan``, or an exact parallel scan."""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.core import checks, compensated
from rnnjax.core.cell import PRECISION, ReLUCell
from rnnjax.core.compensated import PRECISIONS, Precision
from rnnjax.core.masking import length_mask
from rnnjax.core.parallel import scan

__all__ = ["Method", "METHODS", "rnn", "run", "resolve_method", "flip_sequences", "initial_carry",
           "default_unroll"]

Method = Literal["sequential", "parallel", "auto"]
METHODS: tuple[str, ...] = get_args(Method)
# loop(body, carry, xs) -> (carry, ys): lax.scan of body(step, carry, x) with a cell's step.
Loop = Callable[[Callable, Any, Any], tuple[Any, Any]]

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


def _parallel_refusal(cell: nn.Module, dtype: Any = jnp.float32) -> str | None:
    """Why ``cell`` cannot be evaluated in parallel on inputs of ``dtype``, or None if it can."""
    if not isinstance(cell, ReLUCell):
        return (f"method='parallel' needs a ReLUCell; received {type(cell).__name__}. "
                "Use method='sequential'.")
    if not (cell.diagonal or cell.features == 1):
        return (f"method='parallel' needs a ReLUCell with features == 1 or diagonal=True; "
                f"received ReLUCell(features={cell.features}) whose W_hh is a full "
                f"{cell.features}x{cell.features} matrix. Use method='sequential', or "
                "ReLUCell(features, diagonal=True).")
    if not jnp.issubdtype(dtype, jnp.floating):
        return f"method='parallel' needs real inputs; received dtype {dtype}. Use method='sequential'."
    return None


def resolve_method(cell: nn.Module, method: str, *, time: int | None = None, dtype: Any = jnp.float32) -> str:
    """Returns the method ``rnn`` will use, or raises if ``cell`` cannot use the one asked for.

    "auto" is the fastest method that is accurate (benchmarks/NOTES.md, "What auto picks"):
    "parallel" whenever the cell allows it, on an accelerator (a plain scan launches work step
    by step there) and on a CPU from ``AUTO_PARALLEL_FROM`` (256) steps on, where the loop's
    float32 sums start to drift towards 1e-6 relative; "sequential" otherwise.

    Args:
      cell: the cell ``rnn`` runs.
      method: "sequential", "parallel" or "auto" (checked by the caller).
      time: the number of steps, for "auto"; None counts as short.
      dtype: the inputs' dtype (complex inputs run sequentially).
    """
    refusal = _parallel_refusal(cell, dtype)
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
    reverse: bool = False,
    keep_order: bool = False,
    precision: Precision = "compensated",
) -> tuple[Any, jax.Array]:
    """Runs ``cell`` over the time axis of ``xs``, each sequence stopping at its length.

    Past a sequence's length its carry is frozen and its outputs are zero; padded inputs are
    replaced by zeros before they reach the cell, so neither the result nor its gradient depends
    on them (NaN included). That covers what ``rnn`` computes from ``xs``; a layer that computes
    ``xs`` from padded data still sees the padding, so mask its input first:
    ``jnp.where(jnp.arange(time)[None, :, None] < lengths[:, None, None], raw, 0)``.

    Args:
      cell: a ``ReLUCell``; with ``method="sequential"``, any flax cell whose
        ``__call__(carry, x)`` returns ``(new_carry, output)`` and whose carry is an array or a
        pytree of arrays (``nn.LSTMCell``, ``nn.GRUCell``, ``nn.ConvLSTMCell``, ...).
      params: the cell's variables, as returned by ``cell.init``.
      xs: inputs, ``(*batch, time, features)``: any number of batch axes (none included), then
        time, then ``cell.num_feature_axes`` feature axes (``(height, width, channels)`` for a
        ``ConvLSTMCell``); floating point, or complex for a cell that computes in complex
        numbers (sequential only).
      lengths: ``(*batch,)`` integers in ``[0, time]``; None means every sequence is full. The
        range is checked when the values are concrete; under ``jit`` a length above ``time``
        acts as ``time`` and a negative one as 0, whatever the integer type.
      initial_state: the carry before the first step, shaped like
        ``cell.initialize_carry(key, xs[..., 0, :].shape)``; None means that (zeros).
      method: "sequential" (one ``lax.scan``), "parallel" (the exact blocked scan of
        ``rnnjax.core.parallel``; ``ReLUCell`` with ``features == 1`` or ``diagonal=True`` only;
        weights below float32 precision are computed in float32 and returned in the cell's
        dtype, saturating at its largest finite value: 65504 for float16, where the loop's
        float16 sum of ones stalls at 2048), or "auto" (see ``resolve_method``).
      reverse: run each sequence from its last real step back to its first; the padding stays
        at the end.
      keep_order: with ``reverse``, return the outputs in the inputs' order (step t's output
        next to ``xs[..., t, :]``) instead of the order in which they were computed.
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
      ``(final_state, states)``: ``final_state`` is the carry after the last real step (the
      initial state where the length is 0); ``states`` ``(*batch, time, out_features)`` holds
      the cell's output at each step, zero past each length. The carry and outputs have the
      dtype one step of the cell returns. For a ``ReLUCell`` the output is the state.

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
    features = cell.num_feature_axes
    xs = checks.floating_array("xs", xs, complex_ok=True,
                               shapes=(f"(*batch, time, {', '.join(_feature_names(features))})",))
    method = checks.choice("method", method, METHODS)
    precision = checks.choice("precision", precision, PRECISIONS)
    batch_shape, time = xs.shape[:xs.ndim - features - 1], xs.shape[xs.ndim - features - 1]
    step_shape = (*batch_shape, *xs.shape[xs.ndim - features:])
    expected_params, expected_carry = _expected(cell, step_shape, xs.dtype)
    fix = f" Initialise the cell with inputs shaped like one step of xs, {step_shape}"
    fix += ", or give xs a features axis: xs[..., None]." if features == 1 and xs.ndim == 2 else "."
    params = checks.variables("params", params, expected_params, what=f"this cell and xs of shape {xs.shape}",
                              fix=fix)
    lengths = checks.lengths(lengths, batch_shape if len(batch_shape) != 1 else batch_shape[0], time)
    initial_state = initial_carry("initial_state", initial_state, expected_carry)
    method = resolve_method(cell, method, time=time, dtype=xs.dtype)
    return run(cell, params, xs, lengths, initial_state, method, reverse=reverse, keep_order=keep_order,
               precision=precision)


def _feature_names(count: int) -> list[str]:
    return ["features"] if count == 1 else [f"feature_{axis}" for axis in range(count)]


def run(cell: nn.Module, params: Any, xs: jax.Array, lengths: jax.Array, initial_state: Any,
        method: str, *, reverse: bool = False, keep_order: bool = False, precision: str = "compensated",
        unroll: int | None = None, loop: Loop | None = None) -> tuple[Any, jax.Array]:
    """``rnn`` on checked arguments: ``lengths`` int32 in ``[0, time]`` shaped like the batch
    axes, ``initial_state`` the carry (or None for zeros), ``method`` "sequential" or "parallel"
    (as ``resolve_method`` returns it). What ``rnnjax.RNN`` calls after checking its arguments.

    ``unroll`` is ``lax.scan``'s (None: the measured best for the backend). ``loop``, given,
    replaces ``lax.scan`` for the sequential method: ``loop(body, carry, xs)`` must return
    ``lax.scan(lambda carry, x: body(step, carry, x), carry, xs)`` for a ``step(carry, x)`` of
    its own (``rnnjax.RNN`` passes flax's lifted ``nn.scan``, which owns the cell's variables and
    random numbers; ``params`` is then unused, and the loop runs plain whatever ``precision``).
    """
    batch_axes = lengths.ndim
    batch_shape, time = xs.shape[:batch_axes], xs.shape[batch_axes]
    xs = xs.reshape(-1, *xs.shape[batch_axes:])  # (batch, time, *features), one batch axis
    lengths = lengths.reshape(-1)
    if initial_state is None:
        initial_state = cell.initialize_carry(jax.random.key(0), (*batch_shape, *xs.shape[2:]))
    initial_state = jax.tree.map(lambda leaf: leaf.reshape(-1, *leaf.shape[batch_axes:]), initial_state)
    if loop is None:
        # The carry in the dtype one step returns (inputs, weights and state promoted together).
        step = jax.eval_shape(lambda h, x: cell.apply(params, h, x)[0], initial_state, xs[:, 0])
        initial_state = jax.tree.map(lambda h, s: h.astype(s.dtype), initial_state, step)
        compensate = (precision == "compensated" and _parallel_refusal(cell) is None
                      and initial_state.dtype in (jnp.float32, jnp.float64))
        loop = functools.partial(_scan, functools.partial(cell.apply, params), unroll or default_unroll())
    else:
        compensate = False
    xs = jnp.where(_expand(length_mask(lengths, time), xs), xs, 0)
    if reverse:
        xs = flip_sequences(xs, lengths)
    if method == "parallel":
        final_state, states = _parallel(cell, params, xs, lengths, initial_state, precision=precision)
    elif compensate:
        final_state, states = _compensated_loop(cell, params, xs, lengths, initial_state)
    else:
        final_state, states = _sequential(loop, xs, lengths, initial_state, freeze=isinstance(cell, ReLUCell))
    if reverse and keep_order:
        states = flip_sequences(states, lengths)
    unflatten = lambda leaf: leaf.reshape(*batch_shape, *leaf.shape[1:])
    return jax.tree.map(unflatten, final_state), jax.tree.map(unflatten, states)


def default_unroll() -> int:
    """``lax.scan``'s unroll factor for this backend, measured (benchmarks/NOTES.md)."""
    return _UNROLL.get(jax.default_backend(), _ACCELERATOR_UNROLL)


def flip_sequences(xs: jax.Array, lengths: jax.Array) -> jax.Array:
    """Reverses each sequence of ``xs`` ``(batch, time, ...)`` within its length; the padding
    stays at the end (reversed too).

    Example:
      >>> import jax.numpy as jnp
      >>> flip_sequences(jnp.array([[1, 2, 3, 0], [4, 5, 0, 0]]), jnp.array([3, 2]))
      Array([[3, 2, 1, 0],
             [5, 4, 0, 0]], dtype=int32)
    """
    time = xs.shape[1]
    index = (lengths[:, None] - 1 - jnp.arange(time)[None]) % time  # (batch, time)
    return jnp.take_along_axis(xs, index.reshape(*index.shape, *(1,) * (xs.ndim - 2)), axis=1)


def _expand(mask: jax.Array, like: jax.Array) -> jax.Array:
    """``mask`` with trailing axes of size 1, to broadcast against ``like``."""
    return mask.reshape(*mask.shape, *(1,) * (like.ndim - mask.ndim))


def _expected(cell: nn.Module, step_shape: tuple[int, ...], dtype: Any) -> tuple[Any, Any]:
    """The shapes of ``cell.init``'s variables and of its zero carry for one step's inputs of
    ``step_shape``: one trace of the cell."""
    def init(key, step):
        carry = cell.initialize_carry(key, step.shape)
        return cell.init(key, carry, step), carry

    return jax.eval_shape(init, jax.random.key(0), jax.ShapeDtypeStruct(step_shape, dtype))


def initial_carry(name: str, value: Any, expected: Any) -> Any:
    """Checks a given carry ``value`` against the shapes of the cell's carry; None stays None."""
    if value is None:
        return None
    leaves = jax.tree.leaves(value)
    if not leaves or not all(isinstance(leaf, jax.Array) or np.asarray(leaf).dtype.kind in "biufc" for leaf in leaves):
        raise checks.InputError(f"{name} must be an array, or a pytree of arrays like the cell's carry; "
                                f"received {type(value).__name__}.", name)
    value = jax.tree.map(jnp.asarray, value)
    received = jax.tree.map(lambda leaf: leaf.shape, value)
    shapes = jax.tree.map(lambda leaf: leaf.shape, expected)
    if received != shapes:
        if isinstance(expected, jax.ShapeDtypeStruct):
            raise checks.InputError(f"{name} must have shape (*batch, features) = {shapes}; "
                                    f"received shape {received}.", name)
        raise checks.InputError(
            f"{name} must be shaped like the cell's carry {shapes}; received {received}. "
            "Leave it None for zeros, or start from cell.initialize_carry(key, one_step.shape).", name)
    return value


def _scan(step, unroll, body, carry, xs):
    """The default loop of ``run``: ``lax.scan`` of ``body`` with ``step``."""
    return jax.lax.scan(functools.partial(body, step), carry, xs, unroll=unroll)


def _sequential(loop, xs, lengths, initial_state, *, freeze: bool):
    """One ``loop`` over time; returns the final carry and the outputs, zero past each length.

    With ``freeze`` (a ``ReLUCell``, whose state can grow past the float range over a long
    padding) the state is frozen step by step past each length. Otherwise the loop runs on over
    the zeroed padding and each sequence's carry is taken at its last real step, as ``nn.RNN``
    does: a select inside the loop of a cell that XLA fuses whole (an LSTM) split its step into
    kernels, 20x slower in training on a CPU (benchmarks/NOTES.md). The values are the same.
    """
    time = xs.shape[1]
    mask = length_mask(lengths, time)

    def body(step, carry, x):
        if not freeze:
            returned, output = step(carry, x)
            return returned, (returned, output)
        # the state is kept or dropped at the start of the next step, not at the end of its own:
        # there the select split even the ReLU step in two
        returned, state, t = carry
        state = _select(t - 1 < lengths, returned, state)  # step t - 1 was real, or state stays
        returned, output = step(state, x)
        return (returned, state, t + 1), (None, output)

    start = (initial_state, initial_state, jnp.zeros((), jnp.int32)) if freeze else initial_state
    final, (carries, outputs) = loop(body, start, jnp.swapaxes(xs, 0, 1))
    outputs = jax.tree.map(lambda out: jnp.where(_expand(mask, out), jnp.swapaxes(out, 0, 1), 0), outputs)
    if freeze:
        returned, state, _ = final
        return _select(time - 1 < lengths, returned, state), outputs
    last = jnp.maximum(lengths - 1, 0)
    final = jax.tree.map(lambda leaf: leaf[last, jnp.arange(lengths.shape[0])], carries)
    return _select(lengths > 0, final, initial_state), outputs


def _select(active: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``active`` ``(batch,)``, else ``old``, leaf by leaf."""
    return jax.tree.map(lambda n, o: jnp.where(_expand(active, n), n, o), new, old)


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
