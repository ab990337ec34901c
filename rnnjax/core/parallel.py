"""Exact parallel-in-time evaluation of an elementwise ReLU recurrence, in blocks.

``relu_scan`` computes ``h_t = max(0, w*h_{t-1} + u_t)`` for ``t < length`` from ``h0`` (which
enters as ``w*h0`` added to ``u_0``), each feature with its own scalar ``w``, in blocks of ``C``
steps (``block_size``):

1. one loop over a block's steps, vectorised across blocks and sequences, composes each
   block's steps into one ``rnnjax.core.ramps.Ramp`` (from three plain runs, ``ramps.of_runs``,
   where no ``|w|`` of the call exceeds 1);
2. the state entering each block comes from the blocks' ramps by the same method one level up,
   in blocks of ``upper_block_size`` (at most ``MAX_UPPER_BLOCK_SIZE``) maps, until one block
   is left: ``levels(T, C)`` loops deep, ``O(T)`` work, ``O(batch * T)`` memory;
3. each block re-runs its steps from its entering state; the final state is the last block's
   prefix ramp evaluated at its entering state.

Invariants: every state is the same function of the inputs as the sequential loop's, evaluated
in another order (nothing is approximated); each slope ``w**k`` is a ``ramps.Slope`` computed
from ``k``, rounded once, of any magnitude; within the domain no ``inf - inf`` or ``0 * inf`` is
formed. Derivatives come from a ``custom_jvp`` that solves the tangent recurrence by the same
method on affine maps; JAX transposes it for reverse mode and differentiates it again.

Domain: float32 or float64; ``w`` 0 or of magnitude in ``[1e-30, 3]``; inputs 0 or of magnitude
in ``[tiny, 1e6]``; ``h0 >= 0``; any length; wherever the sequential loop's states stay below
``1e30``. There every state is finite and within

    |h_t - exact_t| <= K * eps * max_{s <= t} |w|^(t - s) * (|w * h_{s-1}| + |u_s|)
                       + K * tiny * (1 + max_s h_s + max_{s <= t} |w|^(t - s)),
    K = 8 * (C + (16 + U) * levels(T, C)),   U = upper_block_size(ceil(T / C)),

of the exact recurrence on the same inputs, ``C`` the block size in effect, ``eps`` the dtype's
machine epsilon and ``tiny`` its smallest normal number (XLA flushes smaller numbers to 0 on a
CPU, in the loop as here). ``tests/test_parallel.py`` checks it against a float64 loop. The
derivation, why every quantity stays finite, the derivatives' limits and the audit record:
``docs/parallel.md``.

That is the plain scan (``precision="plain"``). Compensated (the default), the entering states
are refined and every block re-run in twice the working precision (``_compensated_states``), and
every state is within

    |h_t - exact_t| <= u |exact_t| + c u**2 S_t + K**2 eps eps_s M_t + tiny terms,

``u = eps / 2``, ``S_t = sum_{s <= t} |w|^(t - s) (|w h_{s-1}| + |u_s|)``, ``M_t`` the same with
max for sum, ``c = 1/16`` and ``eps_s = 2**-52`` for float32 on a CPU or GPU (float64
arithmetic), ``c = 16`` and ``eps_s = 2**-52`` for float64 (double words): the constants, the
derivation and its one limit (chains of more than ``MAX_REFINEMENTS - 1`` cancellations, each
deciding the next) are in ``docs/accuracy.md``, checked by ``tests/test_compensated.py``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.core import ramps
from rnnjax.core import checks
from rnnjax.core import compensated

__all__ = ["relu_scan", "scan", "default_block_size", "upper_block_size", "levels"]

# Each constant's measurements: benchmarks/NOTES.md, "Current decisions".
# Steps per block on a CPU: 64 up to _LONG steps; beyond, 256 on AMD and 32 on Intel (where 256
# ran T = 1e5, batch 8 1.3 to 1.6 times as long), 128 on CPUs not measured.
_LONG = 2**15
_CPU_BLOCK_SIZE = {"AuthenticAMD": (64, 256), "GenuineIntel": (64, 32)}
_OTHER_CPU_BLOCK_SIZE = (64, 128)


def _cpu_vendor() -> str:
    """The CPU's vendor as ``/proc/cpuinfo`` names it (``"GenuineIntel"``); ``""`` if unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def _cpu_block_size(vendor: str) -> tuple[int, int]:
    """Block sizes (up to ``_LONG`` steps, beyond) on a CPU of ``vendor``."""
    return _CPU_BLOCK_SIZE.get(vendor, _OTHER_CPU_BLOCK_SIZE)


_BLOCK_SIZE = {"cpu": _cpu_block_size(_cpu_vendor())}
# On an accelerator 32 steps a block: the fastest of 32, 64 and 128 on an H200 by the geometric
# mean of the target shapes (1.11 against 1.82 ms forward at T = 1e4, batch 1).
_ACCELERATOR_BLOCK_SIZE = (32, 32)
# lax.scan's unroll for the loops over a block's elements: rolled. On a CPU unrolling never paid
# (2, 4, 8: the training step at T = 1e5, batch 8 1.5 to 2.8 times as long); on an H200 it ran
# T = 1e4, batch 1 3.4 to 15 times as fast but took 14 to 46 s to compile (3.5 s rolled).
_UNROLL = {"cpu": 1}
_ACCELERATOR_UNROLL = 1
# Maps a block at most above the first level, in as few levels as that allows: each level is a
# loop XLA compiles, and 128 compiled T = 1e6 35 to 45% faster than 16 (three levels, not five).
MAX_UPPER_BLOCK_SIZE = 128


def default_block_size(time: int, backend: str | None = None) -> int:
    """Returns the block size ``relu_scan`` uses for sequences of ``time`` steps on ``backend``."""
    short, long = _BLOCK_SIZE.get(backend or jax.default_backend(), _ACCELERATOR_BLOCK_SIZE)
    return max(1, min(long if time > _LONG else short, time))


def _scan(f: Callable, init: Any, xs: Any) -> tuple[Any, Any]:
    """``jax.lax.scan`` over a block's elements, unrolled as suits the default backend."""
    return jax.lax.scan(f, init, xs, unroll=_UNROLL.get(jax.default_backend(), _ACCELERATOR_UNROLL))


# ----------------------------------------------------------------------------------------------
# The blocks' layout.


def _to_blocks(tree: Any, size: int, fill: Any) -> Any:
    """``(batch, n)`` leaves -> ``(size, blocks * batch)``, lane ``k * batch + b`` holding block
    ``k`` of sequence ``b``; the last block is padded with the leaves of ``fill`` (padding only
    feeds states that are cut off).

    The blocks of every sequence lie along one axis, which XLA compiles to plain vector code on
    a CPU; the batch inner keeps the transpose's output minor axis short, XLA's CPU transpose's
    fast form (benchmarks/NOTES.md, "Batch 8: fewer passes, one axis", "The blocks' layout")."""

    def block(x, value):
        batch, n = x.shape
        blocks = -(-n // size)
        x = jnp.pad(x, ((0, 0), (0, blocks * size - n)), constant_values=value)
        return x.reshape(batch, blocks, size).transpose(2, 1, 0).reshape(size, blocks * batch)

    return jax.tree.map(block, tree, fill)


def _split(x: jax.Array, size: int) -> jax.Array:
    """``(batch, n)`` -> ``(batch, blocks, size)``, zero-padded: the steps in blocks, in the
    inputs' own order (a bitcast after the padding)."""
    batch, n = x.shape
    blocks = -(-n // size)
    return jnp.pad(x, ((0, 0), (0, blocks * size - n))).reshape(batch, blocks, size)


def _lanes(x: jax.Array) -> jax.Array:
    """``(batch, blocks, size)`` (``_split``'s) -> ``(size, blocks * batch)``, ``_to_blocks``'s
    layout. Given an array of that shape (the operand of ``lax.cond``, not a bitcast of a
    ``(batch, n)`` one inside the transpose's fusion), XLA's CPU transpose ran 2.4 times as fast
    (26 against 63 ms at T = 1e6, batch 8)."""
    batch, blocks, size = x.shape
    return x.transpose(2, 1, 0).reshape(size, blocks * batch)


def _from_blocks(x: jax.Array, batch: int, n: int) -> jax.Array:
    """``(size, blocks * batch)`` (``_to_blocks``'s layout) -> ``(batch, n)``."""
    size = x.shape[0]
    return x.reshape(size, -1, batch).transpose(2, 1, 0).reshape(batch, -1)[:, :n]


# ----------------------------------------------------------------------------------------------
# The blocked driver, for any maps with an associative composition.


class _Algebra(NamedTuple):
    """The maps that spans of elements form, for the blocked driver.

    ``identity(shape, dtype)`` is the identity map; ``then(map, element, slopes)`` is the map
    followed by one element of the first level (a step), ``compose(first, second, slopes)`` the
    map followed by another map (an element of an upper level), and ``evaluate(map, slope, h)``
    applies one. ``powers(counts)`` returns what spans of ``counts`` steps share, stacked
    (``rnnjax.core.ramps.powers``). At the ``j``-th element of a block the driver passes
    ``slopes = (before, element, after)``: those of the spans of the ``j`` elements before, of
    the element, and of all ``j + 1``. ``spans(blocks, slope)``, if given, returns the maps of
    whole blocks of first-level elements at once, from ``(size, lanes)`` leaves and what a
    block's span shares; without it they are composed one element at a time with ``then``.
    """

    identity: Callable[[tuple[int, ...], Any], Any]
    then: Callable[[Any, Any, Any], Any]
    compose: Callable[[Any, Any, Any], Any]
    evaluate: Callable[[Any, Any, jax.Array], jax.Array]
    powers: Callable[[np.ndarray], Any]
    spans: Callable[[Any, Any], Any] | None = None


def _rows(table: Any, index: Any) -> Any:
    """``table[index]`` for every leaf of a stacked pytree."""
    return jax.tree.map(lambda x: x[index], table)


def _fold(combine: Callable, blocks: Any, table: Any, identity: Any, *, keep: bool) -> Any:
    """Composes each block's elements in order, ``combine(prefix, element, slopes)``, in one
    loop over the ``(size, lanes)`` leaves of ``blocks``; ``table`` holds what spans of 0 to
    ``size`` elements share. Returns every prefix map, stacked ``(size, lanes)`` (``keep``), or
    each block's map, ``(lanes,)``."""
    element = _rows(table, 1)

    def extend(prefix, x):
        item, (before, after) = x
        new = combine(prefix, item, (before, element, after))
        return new, (new if keep else None)

    spans = (_rows(table, slice(None, -1)), _rows(table, slice(1, None)))
    maps, prefixes = _scan(extend, identity, (blocks, spans))
    return prefixes if keep else maps


def _entering(block_maps: Any, start: jax.Array, algebra: _Algebra, span: int) -> jax.Array:
    """The state before each block, ``(batch, blocks)``, from the blocks' maps (``(blocks *
    batch,)`` leaves in ``_to_blocks``'s lanes, at least two blocks a sequence, each map of
    ``span`` steps) and ``start``, ``(batch,)``, the state before the first: their own prefix
    states, one level up."""
    batch = start.shape[0]
    blocks = jax.tree.leaves(block_maps)[0].shape[0] // batch
    block_maps = jax.tree.map(lambda x: x.reshape(blocks, batch).T, block_maps)
    ends = _upper_states(block_maps, start, algebra, span)
    return jnp.concatenate([start[:, None], ends[:, :-1]], axis=1)


def _upper_states(maps: Any, start: jax.Array, algebra: _Algebra, span: int) -> jax.Array:
    """``h_k = maps_k(h_{k-1})`` for ``k < n``, with ``h_{-1} = start``, ``(batch, n)``, for
    ``(batch, n)`` leaves of maps of ``span`` steps each: an upper level.

    Blocks of ``upper_block_size(n)`` maps, the last padded with identity maps (which only feed
    states that are cut off). The loop that composes each block's maps keeps every prefix map,
    and once the level above has given each block's entering state, every prefix is evaluated
    there in one vectorised pass (one rounding at that state's magnitude, and no second loop).
    """
    batch, n = jax.tree.leaves(maps)[0].shape
    size = upper_block_size(n)
    blocks = _to_blocks(maps, size, algebra.identity((), start.dtype))
    lanes = jax.tree.leaves(blocks)[0].shape[1]
    table = algebra.powers(span * np.arange(size + 1))  # spans of 0, 1, ..., size maps
    prefixes = _fold(algebra.compose, blocks, table, algebra.identity((lanes,), start.dtype),
                     keep=True)
    if lanes == batch:  # one block: the top level
        entering = start[:, None]
    else:
        entering = _entering(_rows(prefixes, -1), start, algebra, span * size)
    after = jax.tree.map(lambda x: x[1:][:, None], table)
    states = algebra.evaluate(prefixes, after, entering.T.reshape(-1))  # in the lanes' order
    return _from_blocks(states, batch, n)


def _block_maps(blocks: Any, algebra: _Algebra, table: Any, dtype: Any) -> Any:
    """Each first-level block's map, ``(lanes,)`` leaves, from its elements, ``(size, lanes)``
    leaves; ``table`` holds what spans of 0 to ``size`` steps share."""
    if algebra.spans is not None:
        return algebra.spans(blocks, _rows(table, -1))
    lanes = jax.tree.leaves(blocks)[0].shape[1]
    return _fold(algebra.then, blocks, table, algebra.identity((lanes,), dtype), keep=False)


def _blocked_states(
    blocks: Any,
    start: jax.Array,
    algebra: _Algebra,
    step: Callable[[jax.Array, Any], jax.Array],
) -> tuple[jax.Array, jax.Array]:
    """Returns ``h_k = step(h_{k-1}, e_k)`` for every element, with ``h_{-1} = start``, in blocks:
    the first level.

    The blocks' maps give each block's entering state (``_entering``), and each block then
    re-runs its elements one by one from it (the loop's own rounding). The states stay in the
    blocks' layout, so that the recurrence and its derivative transpose the ``(batch, time)``
    arrays once each way.

    Args:
      blocks: a pytree of ``(size, blocks * batch)`` arrays (``_to_blocks``'s layout), one
        element (step) per position.
      start: ``(batch,)``, the state before the first element.
      algebra: the maps that spans of elements form.
      step: ``step(h, element)``, one element applied to a state.

    Returns:
      ``(states, entering)``: ``states`` ``(size, blocks * batch)``, and ``entering`` ``(batch,
      blocks)``, the state before each block.
    """
    size, lanes = jax.tree.leaves(blocks)[0].shape
    if lanes == start.shape[0]:  # one block a sequence
        entering = start[:, None]
    else:
        table = algebra.powers(np.arange(size + 1))  # spans of 0, 1, ..., size steps
        block_maps = _block_maps(blocks, algebra, table, start.dtype)
        entering = _entering(block_maps, start, algebra, size)
    _, states = _scan(lambda h, x: (step(h, x),) * 2, entering.T.reshape(-1), blocks)
    return states, entering


def _last_states(block: Any, entering: jax.Array, lengths: jax.Array,
                 algebra: _Algebra) -> jax.Array:
    """The state after step ``lengths - 1`` of each sequence, ``(batch,)``: its block's prefix
    map evaluated at the block's entering state (``_blocked_states``), which rounds once at
    that magnitude instead of once a step and needs no block's second run. ``block`` holds the
    elements of each sequence's last block, ``(size, batch)`` leaves; where a length is 0 the
    result is the state before the first step."""
    size, batch = jax.tree.leaves(block)[0].shape
    last = jnp.maximum(lengths - 1, 0)
    last_block, last_step = last // size, last % size
    table = algebra.powers(np.arange(size + 1))  # spans of 0, 1, ..., size steps
    element_slope = jax.tree.map(lambda x: x[1], table)

    def then_if(prefix, x):  # steps past the last one leave the prefix as it is
        take, element, after = x
        new = algebra.then(prefix, element, (None, element_slope, after))
        return jax.tree.map(lambda n, old: jnp.where(take, n, old), new, prefix), None

    prefix, _ = _scan(
        then_if, algebra.identity((batch,), entering.dtype),
        (jnp.arange(size)[:, None] <= last_step, block, jax.tree.map(lambda x: x[1:], table)))
    start = jnp.take_along_axis(entering, last_block[:, None], axis=1)[:, 0]
    return algebra.evaluate(prefix, jax.tree.map(lambda x: x[last_step + 1], table), start)


def _scaled(a: jax.Array, fired: jax.Array, slope: ramps.Slope, y: jax.Array) -> jax.Array:
    """``a * y`` for the ``a`` of a span's affine map: ``slope`` (``w**k``, of any magnitude)
    where every step of the span fired and 0 elsewhere, rounded once. The float ``a``, a product
    of the steps' ``J_t``, adds its derivative only (0 in value: where ``y`` is finite, and where
    it is not the loop's tangent is not finite either; where a step did not fire, 0 as the loop's)."""
    return jnp.where(fired, ramps.multiply(y, slope) + (a - jax.lax.stop_gradient(a)) * y, 0)


def _affine(w: jax.Array) -> _Algebra:
    """Affine maps ``y -> a*y + b`` of the tangent recurrence ``y_t = J_t y_{t-1} + d_t``,
    ``J_t = w`` where step ``t`` fired and 0 elsewhere. Elements are the pairs ``(J_t, d_t)``;
    maps of spans are ``(a, b, fired)``.

    A span's ``a`` is ``w**k`` if all its ``k`` steps fired, else 0. It is applied as the
    ``Slope`` from ``rnnjax.core.ramps.powers`` (rounded once, so its rounding does not compound over
    the blocks, and of any magnitude, so ``a*y`` overflows or underflows only where the exact
    product does), where the span's ``fired`` says every step fired (``_scaled``).
    """
    largest = jnp.finfo(w.dtype).max

    def compose(first, second, slopes):
        (a1, b1, fired1), (a2, b2, fired2) = first, second
        a = jnp.clip(a1 * a2, -largest, largest)  # only its derivative is used
        return a, _scaled(a2, fired2, slopes[1], b1) + b2, fired1 & fired2

    def then(first, element, slopes):
        (a, b, fired), (jacobian, drive) = first, element
        # One step's a is J_t itself, exact. J_t != 0 is "step t fired" but where w == 0, whose
        # w**k are exactly 0 anyway.
        a = jnp.clip(a * jacobian, -largest, largest)
        return a, jacobian * b + drive, fired & (jacobian != 0)

    def evaluate(affine, slope, y):
        a, b, fired = affine
        return _scaled(a, fired, slope, y) + b

    return _Algebra(
        identity=lambda shape, dtype: (jnp.ones(shape, dtype), jnp.zeros(shape, dtype),
                                       jnp.ones(shape, bool)),
        then=then,
        compose=compose,
        evaluate=evaluate,
        powers=lambda counts: _powers(jax.lax.stop_gradient(w), counts),
    )


def _ramps(w: jax.Array, growing: bool) -> _Algebra:
    """The ramps of the steps ``h -> max(0, w*h + u)``, whose elements are the inputs ``u``
    (``growing``: whether some ``|w| > 1``, see ``rnnjax.core.ramps.evaluate``)."""
    return _Algebra(
        identity=ramps.identity,
        then=lambda m, u, slopes: ramps.then_step(m, w, u, slopes[2], growing=growing),
        compose=lambda m, e, slopes: ramps.compose(m, slopes[0], e, slopes[1], growing=growing),
        evaluate=functools.partial(ramps.evaluate, growing=growing),
        powers=lambda counts: _powers(w, counts),
        # Three plain runs of the loop a block where no slope exceeds 1 (rnnjax.core.ramps.of_runs).
        spans=None if growing else lambda blocks, slope: ramps.of_runs(w, blocks, slope, scan=_scan),
    )


def _powers(w: jax.Array, counts: np.ndarray) -> ramps.Slope:
    """``rnnjax.core.ramps.powers`` of a scalar ``w``: ``w**k`` for each ``k`` of ``counts``."""
    return jax.tree.map(lambda x: x[:, 0], ramps.powers(w[None], counts, scan=_scan))


# ----------------------------------------------------------------------------------------------
# The recurrence and its derivatives.


@jax.custom_jvp
def _from_zero(w: jax.Array, inputs: jax.Array, lengths: jax.Array,
               growing: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(final_state, states)`` of ``h_t = max(0, w*h_{t-1} + inputs_t)`` from ``h_{-1} = 0``,
    for a scalar ``w`` and inputs in blocks, ``(batch, blocks, block_size)`` (``_split``'s): the
    state after step ``lengths - 1``, ``(batch,)`` (0 where the length is 0), and every state in
    the blocks' layout of ``_to_blocks``, ``(block_size, blocks * batch)`` (those past a length
    are not used).

    Each block re-runs the loop's own steps from its entering state; the last state of
    each sequence comes from ``_last_states``. ``growing`` (a boolean) must be true if ``|w| >
    1``: the work for positions between 0 and tiny is only needed then.
    """
    return jax.lax.cond(
        growing,
        functools.partial(_states_from_zero, growing=True),
        functools.partial(_states_from_zero, growing=False),
        w, inputs, lengths)


def _states_from_zero(w, inputs, lengths, *, growing):
    """``_from_zero``'s result; ``growing=False`` only if ``|w| <= 1``."""
    batch, _, size = inputs.shape
    algebra = _ramps(w, growing)
    states, entering = _blocked_states(_lanes(inputs), jnp.zeros(batch, inputs.dtype), algebra,
                                       lambda h, u: jnp.maximum(w * h + u, 0))
    last = (jnp.maximum(lengths - 1, 0) // size)[:, None, None]  # each sequence's last block
    last_block = jnp.take_along_axis(inputs, last, axis=1)[:, 0].T  # (block_size, batch)
    last_state = _last_states(last_block, entering, lengths, algebra)
    return jnp.where(lengths > 0, last_state, 0), states


@_from_zero.defjvp
def _from_zero_jvp(primals, tangents):
    """The tangent recurrence ``y_t = J_t y_{t-1} + d_t``, solved by the blocked driver on
    affine maps. Everything stays in the blocks' layout, so the derivative transposes the
    ``(batch, time)`` arrays once: the tangent of the inputs (and, in reverse mode, its
    cotangent)."""
    w, inputs, lengths, growing = primals
    dw, dinputs, _, _ = tangents
    final_state, states = _from_zero(w, inputs, lengths, growing)
    return (final_state, states), _tangents(w, dw, dinputs, states, lengths)


# Passes of the compensated scan's refinement at most (see _refined_entering).
MAX_REFINEMENTS = 8


@jax.custom_jvp
def _compensated_from(w, inputs, inputs_low, h0, lengths, growing):
    """``_from_zero``'s result, compensated, from ``h0`` ``(batch,)`` (not folded into the first
    input, whose sum a compiler may contract with the product ``w * h0``): the inputs are
    ``inputs + inputs_low`` (both ``_split``'s ``(batch, blocks, block_size)``), and every state
    comes from a run of its block in the wide arithmetic of ``rnnjax.core.compensated`` from the
    block's entering state, which ``_refined_entering`` finds to that precision; each is
    rounded once."""
    return jax.lax.cond(
        growing,
        functools.partial(_compensated_states, growing=True),
        functools.partial(_compensated_states, growing=False),
        w, inputs, inputs_low, h0, lengths)


def _compensated_states(w, inputs, inputs_low, h0, lengths, *, growing):
    """``_compensated_from``'s result; ``growing=False`` only if ``|w| <= 1``. The inputs
    are transposed into the blocks' layout once, inside the branch (``_lanes``), and widened a
    step at a time inside the loops."""
    batch, blocks, size = inputs.shape
    arith, dtype = compensated.arithmetic(inputs.dtype), inputs.dtype
    lanes = (_lanes(inputs), _lanes(inputs_low))
    if blocks == 1:
        entering = h0[:, None]
    else:
        algebra = _ramps(w, growing)
        block_maps = _block_maps(lanes[0], algebra, _powers(w, np.arange(size + 1)), dtype)
        entering = _entering(block_maps, h0, algebra, size)
    with arith.context():
        w_wide = arith.weight(w)
        entering = _refined_entering(arith, w, w_wide, lanes, entering)
        start = jax.tree.map(lambda x: x.T.reshape(-1), entering)  # in the lanes' order
        _, states = _scan(lambda h, u: (lambda new: (new, arith.round(new, dtype)))(
            arith.step(h, w_wide, arith.lift(*u))[0]), start, lanes)
        last = jnp.maximum(lengths - 1, 0)
        block = jax.tree.map(lambda x: jnp.take_along_axis(x, (last // size)[:, None, None],
                                                           axis=1)[:, 0].T, (inputs, inputs_low))
        h = jax.tree.map(lambda x: jnp.take_along_axis(x, (last // size)[:, None], axis=1)[:, 0],
                         entering)

        def step_if(h, x):  # the last block's steps up to each sequence's last one
            take, u = x
            new, _ = arith.step(h, w_wide, arith.lift(*u))
            return jax.tree.map(lambda n, old: jnp.where(take, n, old), new, h), None

        h, _ = _scan(step_if, h, (jnp.arange(size)[:, None] <= last % size, block))
        final_state = jnp.where(lengths > 0, arith.round(h, dtype), 0)
    return final_state, states


def _refined_entering(arith, w, w_wide, steps, entering):
    """The entering states ``(batch, blocks)`` as wide numbers, refined from the plain ones.

    The exact entering states satisfy ``X_{k+1} = f_k(X_k)``, ``f_k`` block ``k``'s map. A pass
    runs every block from ``X_k`` in the wide arithmetic, which gives ``f_k(X_k)`` to about
    ``u**2``; where no step of block ``k`` changes its ReLU's decision between ``X_k`` and the
    exact entering state, ``f_k`` is affine between them, slope ``J_k = w**C`` where every step
    fired and 0 elsewhere, and the corrections ``d_k = exact_k - X_k`` solve
    ``d_{k+1} = J_k d_k + (f_k(X_k) - X_{k+1})`` over the blocks (one upper level of affine
    maps, in ``arith.solve``). A decision can change only at a step ``j`` (before the block's
    first reset) with ``|pre_j| <= |w**(j+1) d_k|``; where some block has one, ``X + d`` is run
    again, at most ``MAX_REFINEMENTS`` passes in all. The first pass starts from the plain
    entering states, which are within the plain bound."""
    batch, blocks = entering.shape
    size = jax.tree.leaves(steps)[0].shape[0]
    entering_dtype = entering.dtype
    solve = compensated.solve_dtype(arith, entering_dtype)
    unit = float(jnp.finfo(entering_dtype).eps) / 2
    entering = arith.lift(entering, jnp.zeros_like(entering))
    if blocks == 1:
        return entering
    w_solve = w.astype(solve)
    block_slope = _powers(w_solve, np.array([size]))  # w**C
    algebra = _affine(w_solve)
    by_block = lambda x: x.reshape(blocks, batch).T  # noqa: E731  (batch, blocks)

    def run(carry, u):
        h, reach = carry
        h, pre = arith.step(h, w_wide, arith.lift(*u))
        # reach: the least |pre| of the block's steps up to its first reset, negated (its sign
        # bit set, -0.0 included) from that reset on. Two carries: XLA's CPU loop computes
        # each carry in a fusion of its own, each repeating the step.
        alive = ~jnp.signbit(reach)
        least = jnp.minimum(reach, jnp.abs(pre))
        return (h, jnp.where(alive, jnp.where(pre > 0, least, -least), reach)), None

    def refine(x):
        start = jax.tree.map(lambda x: x.T.reshape(-1), x)
        (end, reach), _ = _scan(run, (start, jnp.full(batch * blocks, jnp.inf, solve)), steps)
        end, reach = jax.tree.map(by_block, (end, reach))
        defect = arith.minus(jax.tree.map(lambda e: e[:, :-1], end),
                             jax.tree.map(lambda e: e[:, 1:], x))
        maps = (jnp.ones_like(defect), defect, ~jnp.signbit(reach[:, :-1]))
        correction = _upper_states(maps, jnp.zeros(batch, solve), algebra, size)
        correction = jnp.concatenate([jnp.zeros((batch, 1), solve), correction], axis=1)
        # Step j's decision changes only if |w**(j+1) correction| >= |pre_j|, so not where
        # |correction| < least |pre_j| / max(1, |w|**C).
        distance = jnp.where(jnp.abs(w_solve) > 1,
                             jnp.abs(ramps.divide(jnp.abs(reach), _rows(block_slope, 0))),
                             jnp.abs(reach))
        # A change that a correction below u**2 |X_k| makes costs at most that, within the
        # bound: such ones (ties at the wide precision's level) are not run again.
        tie = unit**2 * jnp.abs(arith.round(x, entering_dtype).astype(solve))
        changes = (jnp.abs(correction) >= distance) & (jnp.abs(correction) > tie) & (w != 0)
        return arith.add(x, correction), jnp.any(changes)

    entering, again = refine(entering)
    entering, _, _ = jax.lax.while_loop(
        lambda c: c[1] & (c[2] < MAX_REFINEMENTS), lambda c: (*refine(c[0]), c[2] + 1),
        (entering, again, 1))
    return entering


@_compensated_from.defjvp
def _compensated_from_jvp(primals, tangents):
    """``_from_zero_jvp``'s tangent recurrence at the compensated states, the first step's
    ``w dh0 + h0 dw`` added to its input's tangent; ``inputs_low`` carries no derivative."""
    w, inputs, inputs_low, h0, lengths, growing = primals
    dw, dinputs, _, dh0, _, _ = tangents
    final_state, states = _compensated_from(w, inputs, inputs_low, h0, lengths, growing)
    dinputs = dinputs.at[:, 0, 0].add(w * dh0 + h0 * dw)
    return (final_state, states), _tangents(w, dw, dinputs, states, lengths)


def _tangents(w, dw, dinputs, states, lengths):
    """The tangents ``(dfinal_state, dstates)`` of ``_from_zero``'s result at ``states``."""
    elements = _tangent_elements(w, dw, dinputs, states, lengths)
    zero = jnp.zeros(lengths.shape[0], states.dtype)
    dstates, dentering = _blocked_states(elements, zero, _affine(w), lambda y, e: e[0] * y + e[1])
    dfinal_state = jnp.where(lengths > 0, _last_tangents(elements, dentering, lengths), 0)
    return dfinal_state, dstates


def _tangent_elements(w, dw, dinputs, states, lengths):
    """The tangent recurrence's elements ``(J_t, d_t)``, ``(block_size, lanes)`` each in the
    blocks' layout: ``J_t = w`` and ``d_t = dw * h_{t-1} + du_t`` where step ``t`` fired, 0
    elsewhere. ``dinputs`` is ``_split``'s ``(batch, blocks, block_size)``."""
    size, lanes = states.shape
    batch = lengths.shape[0]
    block = jnp.arange(lanes) // batch
    positions = block * size + jnp.arange(size)[:, None]  # the step of each element
    lane_lengths = jnp.tile(lengths, lanes // batch)
    # The state before each step: the block's previous one, or the previous block's last (0
    # before a sequence's first block).
    before_block = jnp.where(block == 0, 0, jnp.roll(states[-1], batch))
    previous = jnp.concatenate([before_block[None], states[:-1]], axis=0)
    # The ReLU's derivative is 1 where it fired (strictly, as jax.nn.relu's: the state is
    # positive) and 0 elsewhere, past each length included, so tangents there are 0 like the
    # states.
    fired = (positions < lane_lengths) & (states > 0)
    jacobians = jnp.where(fired, w, 0)
    drive = (dw * jnp.where(fired, previous, 0)
             + jnp.where(fired, _lanes(dinputs), 0))
    return jacobians, drive


def _last_tangents(elements, dentering, lengths):
    """The tangent after step ``lengths - 1``, ``(batch,)``: the last block's steps re-run from
    its entering tangent on ``(block_size, batch)`` gathered elements, not every state's
    tangent. Plain steps, not the block's prefix map: a span's ``a`` is 0 where ``w == 0`` and
    would drop ``d(w**k)/dw``, which second derivatives at ``w = 0`` need."""
    size = jax.tree.leaves(elements)[0].shape[0]
    batch = lengths.shape[0]
    last = jnp.maximum(lengths - 1, 0)
    lane = last // size * batch + jnp.arange(batch)
    last_block = jax.tree.map(lambda x: jnp.take(x, lane, axis=1), elements)

    def step_if(y, x):  # steps past the last one leave the tangent as it is
        take, (jacobian, d) = x
        return jnp.where(take, jacobian * y + d, y), None

    dlast, _ = _scan(
        step_if, jnp.take_along_axis(dentering, (last // size)[:, None], axis=1)[:, 0],
        (jnp.arange(size)[:, None] <= last % size, last_block))
    return dlast


def _scan_feature(w, inputs, lengths, growing, block_size, inputs_low=None, h0=None):
    """``relu_scan`` for one feature: a scalar ``w`` and ``(batch, time)`` inputs from 0 (the
    initial state folded into the first input); compensated where ``inputs_low`` (the inputs'
    low words, ``(batch, time)``) is given, from ``h0`` ``(batch,)``."""
    batch, time = inputs.shape
    if inputs_low is None:
        final_state, states = _from_zero(w, _split(inputs, block_size), lengths, growing)
    else:
        final_state, states = _compensated_from(
            w, _split(inputs, block_size), _split(inputs_low, block_size), h0, lengths, growing)
    position = jnp.arange(time)[None, :]
    states = jnp.where(position == jnp.maximum(lengths - 1, 0)[:, None], final_state[:, None],
                       _from_blocks(states, batch, time))
    return final_state, jnp.where(position < lengths[:, None], states, 0)


@jax.custom_jvp
def _add_to_first_step(inputs: jax.Array, first: jax.Array) -> jax.Array:
    """Adds ``first`` ``(batch, features)`` to step 0 of ``inputs`` ``(batch, time, features)``.

    An elementwise select, which fuses into the inputs' producer (a scatter into step 0 copied
    the inputs first). Its tangent is the scatter, whose transpose is a slice: the select's
    would broadcast ``first`` over every step and reduce a ``(batch, time)`` array back."""
    return inputs + jnp.where(jnp.arange(inputs.shape[1])[:, None] == 0, first[:, None], 0)


@_add_to_first_step.defjvp
def _add_to_first_step_jvp(primals, tangents):
    (inputs, first), (dinputs, dfirst) = primals, tangents
    return _add_to_first_step(inputs, first), dinputs.at[:, 0].add(dfirst)


def relu_scan(
    w: jax.Array,
    inputs: jax.Array,
    lengths: jax.Array,
    h0: jax.Array,
    *,
    block_size: int | None = None,
    precision: compensated.Precision = "compensated",
) -> tuple[jax.Array, jax.Array]:
    """Runs ``h_t = max(0, w*h_{t-1} + inputs_t)`` for ``t < lengths``, exactly, in blocks.

    The module docstring states the domain and the error bound; ``docs/parallel.md`` why they
    hold.

    Args:
      w: the diagonal of the recurrent matrix, ``(features,)``.
      inputs: the projected inputs ``x_t @ W_ih``, ``(batch, time, features)``; float32 or
        float64.
      lengths: ``(batch,)`` integers in ``[0, time]``; under ``jit`` others are clipped to it.
      h0: the initial state, ``(batch, features)``.
      block_size: steps per block (one above ``time`` acts as ``time``); None takes
        ``default_block_size(time)``.
      precision: "compensated" (the default): every state as if computed in twice the
        working precision, then rounded once (the module docstring's second bound; the L1 norm
        within 2 ulps of the exact one at any length and block size); "plain": every operation
        rounded once (the first bound, which grows with the block size). Compensation cost
        1.2 to 2.1 times the plain forward pass and training step on a 2-core CPU
        (``docs/accuracy.md``, "Cost").

    Returns:
      ``(final_state, states)``, as ``rnnjax.rnn`` returns them: ``final_state`` ``(batch,
      features)``, the state after step ``lengths[b] - 1`` (``h0`` where the length is 0), and
      ``states`` ``(batch, time, features)``, the state after every step, zero from ``lengths``
      on. The final state does not need ``states``: where they are not used, ``jit`` leaves out
      the work that forms them (the blocks' second run), and the forward pass reads the inputs
      once.

    Raises:
      InputError: (a ``ValueError`` and a ``TypeError``) an argument that is not an array,
        inputs not float32 or float64 (``rnnjax.rnn`` computes float16 and bfloat16 cells in
        float32), ``w`` or ``h0`` of another dtype, lengths not integers, shapes other than the
        above (or an axis of size 0), concrete lengths outside ``[0, time]``, or
        ``block_size`` not a positive integer.

    Example:
      >>> import jax.numpy as jnp
      >>> inputs = jnp.array([[[3.0], [-5.0], [7.0], [2.0]]])
      >>> final_state, states = relu_scan(jnp.ones(1), inputs, jnp.array([3]), jnp.zeros((1, 1)))
      >>> final_state[:, 0], states[0, :, 0]
      (Array([7.], dtype=float32), Array([3., 0., 7., 0.], dtype=float32))
    """
    _check_arguments(w, inputs, h0)
    batch, time, _ = inputs.shape
    lengths = checks.lengths(lengths, batch, time, sequences="inputs")
    block_size = None if block_size is None else checks.integer("block_size", block_size)
    precision = checks.choice("precision", precision, compensated.PRECISIONS)
    return scan(w, inputs, lengths, h0, block_size=block_size, precision=precision)


def scan(w: jax.Array, inputs: jax.Array, lengths: jax.Array, h0: jax.Array, *,
         block_size: int | None = None, precision: str = "compensated",
         inputs_low: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``relu_scan`` on checked arguments (``lengths`` int32 in ``[0, time]``): what
    ``rnnjax.rnn`` calls. ``inputs_low``, with ``precision="compensated"``: the rounding errors
    of ``inputs`` (``inputs + inputs_low`` the exact inputs; None for zeros), which carry no
    derivative."""
    time = inputs.shape[1]
    size = default_block_size(time) if block_size is None else min(block_size, time)
    growing = jnp.any(jnp.abs(w) > 1)  # one branch for every feature, also under vmap
    if precision == "compensated":  # from h0, which the wide runs start from exactly
        low = jnp.zeros_like(inputs) if inputs_low is None else jax.lax.stop_gradient(inputs_low)

        def scan_feature(w, inputs, low, h0):  # w (), inputs and low (batch, time), h0 (batch,)
            return _scan_feature(w, inputs, lengths, growing, size, low, h0)

        operands = (w, inputs, low, h0)
    else:
        # The first step sees w*h0 + u_0 (summed as the loop sums it), so the scan starts from 0.
        inputs = _add_to_first_step(inputs, h0 * w)

        def scan_feature(w, inputs):  # w () and inputs (batch, time): one feature's recurrence
            return _scan_feature(w, inputs, lengths, growing, size)

        operands = (w, inputs)
    axes = (0,) + (2,) * (len(operands) - 1)
    axes = axes[:3] + (1,) * (len(operands) == 4)  # h0 (batch, features)
    if w.shape[0] == 1:  # the common case, without vmap's extra axis (see _to_blocks)
        final_state, states = jax.tree.map(lambda x: x[..., None], scan_feature(
            *(jnp.take(x, 0, axis) for x, axis in zip(operands, axes))))
    else:
        final_state, states = jax.vmap(scan_feature, in_axes=axes, out_axes=(1, 2))(*operands)
    return jnp.where(lengths[:, None] > 0, final_state, h0), states


def _check_arguments(w, inputs, h0) -> None:
    """Raises ``InputError`` unless ``w``, ``inputs`` and ``h0`` have ``relu_scan``'s shapes and
    dtypes."""
    arrays = {"w": w, "inputs": inputs, "h0": h0}
    for name, value in arrays.items():
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise checks.InputError(f"relu_scan: {name} must be an array; received {type(value).__name__}.", name)
    dtype = jnp.dtype(inputs.dtype)
    if dtype not in (jnp.float32, jnp.float64):
        raise checks.InputError(f"relu_scan: inputs must be float32 or float64; received {dtype}. Cast them "
                                "(and w, h0) to float32, or call rnnjax.rnn, which computes a float16 or "
                                "bfloat16 cell in float32.", "inputs")
    for name in ("w", "h0"):
        if jnp.dtype(arrays[name].dtype) != dtype:
            raise checks.InputError(f"relu_scan: {name} must have the inputs' dtype {dtype}; received "
                                    f"{jnp.dtype(arrays[name].dtype)}.", name)
    if inputs.ndim != 3 or 0 in inputs.shape:
        raise checks.InputError(f"relu_scan: inputs must be (batch, time, features), none of them 0; "
                                f"received shape {tuple(inputs.shape)}.", "inputs")
    batch, _, features = inputs.shape
    for name, shape in {"w": (features,), "h0": (batch, features)}.items():
        if tuple(arrays[name].shape) != shape:
            raise checks.InputError(f"relu_scan: {name} must have shape {shape} for inputs of shape "
                                    f"{tuple(inputs.shape)}; received {tuple(arrays[name].shape)}.", name)


def upper_block_size(maps: int) -> int:
    """Maps a block groups at the level above ``maps`` maps: the fewest levels of at most
    ``MAX_UPPER_BLOCK_SIZE`` that reach one block, with the smallest size that keeps them that
    few (7,813 maps: two levels of 89, not 128 and 62)."""
    depth, reach = 1, MAX_UPPER_BLOCK_SIZE
    while reach < maps:
        depth, reach = depth + 1, reach * MAX_UPPER_BLOCK_SIZE
    size = max(1, math.ceil(maps ** (1 / depth)) - 1)
    while size**depth < maps:  # the float root may round either way
        size += 1
    return size


def levels(time: int, block_size: int) -> int:
    """Loops deep the blocked scan is for ``time`` steps (1 when one block holds them all)."""
    depth, n = 1, math.ceil(time / block_size)
    while n > 1:
        depth, n = depth + 1, math.ceil(n / upper_block_size(n))
    return depth
