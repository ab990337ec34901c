"""Exact parallel-in-time evaluation of an elementwise ReLU recurrence, in blocks.

``relu_scan`` computes ``h_t = max(0, w*h_{t-1} + u_t)`` for every ``t`` with the work split
into blocks of ``block_size`` steps:

1. each block's steps are composed into one ``Ramp`` (``rnnjax.core.ramps``): a ``lax.scan`` over the
   steps of a block, vectorised across blocks and the batch; where no ``|w|`` exceeds 1 it runs
   the loop three times at once (from 0, from ``inf`` and without the ReLU, ``ramps.of_runs``),
   three plain numbers a step, and forms each block's ramp from their ends;
2. the state entering each block comes from the blocks' ramps, by the same method one level up
   (blocks of blocks, at most 128 maps a block, ``upper_block_size``), until one block is left;
   there the loop that composes a block's maps keeps every prefix map, and each is evaluated
   at its block's entering state in one vectorised pass;
3. each block of steps runs again from its true entering state.

The program is ``O(log T / log block_size)`` loops deep, does ``O(T)`` work and keeps
``O(batch * T)`` memory. Nothing is approximated: every state is the same function of the
inputs as the sequential loop's, evaluated in another order.

**Domain and bound.** For float32 and float64, ``w`` equal to 0 or of magnitude in
``[1e-30, 3]``, inputs of magnitude up to ``1e6`` (0, or at least the smallest normal number:
XLA flushes subnormal numbers to 0 on a CPU, in the loop as here), any length and any initial
state: wherever the sequential loop's states stay below ``1e30``, every state is finite and
within

    |h_t - exact_t| <= K * eps * max_{s <= t} |w|^(t - s) * (|w * h_{s-1}| + |u_s|)
                       + K * tiny * (1 + max_s h_s + max_{s <= t} |w|^(t - s))

of the exact (float64) recurrence on the same inputs, where ``K = 8 * (block_size + (16 + U) *
levels(T, block_size))`` with ``U = upper_block_size(ceil(T / block_size))`` the upper levels'
block size (1 for one block), ``eps`` is the dtype's machine epsilon and ``tiny`` its smallest
normal number. The last term is the flushing of subnormal numbers to 0, which the loop suffers
as well (its own error obeys the same bound); it only shows for states within a few orders of
magnitude of ``tiny`` followed by growth. The first term is a sum of magnitudes along one path
of the computation, not of all steps: each state is a ramp evaluated at an entering state,
itself a ramp of the level above evaluated at its own, and so on, and each evaluation rounds
once. The slopes ``w^k`` are
computed from ``k`` by ``rnnjax.core.ramps.powers``, each rounded once, so their rounding does not
compound over the blocks (at ``w = 0.99999``, ``T = 1e5``, float32, ``h_t = w^(t+1)`` is within
28 eps of exact at every step with 32 steps a block, 61 with 128 and 122 with 256, the loop's
98: each block's re-run is the loop's own rounding over its steps, which on this input all round
one way).
``tests/test_parallel.py`` checks the bound by property tests over that domain, including tiny
states growing through spans whose ``|w|^k`` passes the largest float.

**Why every quantity stays finite** (invariants of ``rnnjax.core.ramps``):

- A slope is a ``Slope``, the product of normal floats ``lead * scale * scale`` whose binary
  exponent is carried apart: ``3**1000`` and ``1e-30**1000`` are stored as they are, and
  ``w = 0`` as ``2**-C`` with ``C`` past the dtype's range. ``multiply`` and ``divide`` apply it
  factor by factor, all on the slope's side of 1, so a product is ``inf`` or 0 exactly where
  the exact one overflows or underflows, and no factor is ever 0 or ``inf``: ``0 * inf`` is
  never formed. Division is a product with the stored inverse.
- ``start`` and ``end`` are states that exist (0, or at least ``tiny``: XLA flushes smaller
  numbers to 0 on a CPU), and ``start_value`` and ``end_value`` the map's values there, with
  its value at 0 kept apart (``at_zero``). A kink that falls between 0 and ``tiny`` is moved to
  where the line reaches ``tiny``: no state lies in between, so the map is unchanged on every
  state (a kink flushed to 0 had shifted the line by up to ``tiny`` in the domain, which
  ``|w|^k`` then amplified: 8% off at ``w = 2``, ``inf`` at ``w = 3``, in the second audit).
  Only a segment that reaches ``tiny`` has such a kink: one that ends at 0 maps every state
  past 0 to its end value (taking it for one put a kink in every block whose
  ``|w|^k * tiny`` exceeded the next input, 2.2 off at ``w = -2``, 128 steps a block, in the
  third audit).
- ``start`` and ``start_value`` are clamped to ``[0, M]``.
  ``end`` and ``end_value`` may be ``+inf`` (a segment that never ends).
- Differences ``h - start``, ``value - start_value`` are of non-negative finite numbers, or
  ``+inf`` minus a finite number: never ``inf - inf``. ``w * end_value`` with ``w = 0`` is
  replaced by 0. So no NaN is ever formed, and an infinity only means an exact value past
  ``M`` (a segment without end, or a state beyond the domain), which the clip then resolves.
- Where no ``|w|`` exceeds 1, a block's ramp comes from three runs (``ramps.of_runs``): the runs
  from 0 and from ``inf`` are the loop's own states (the one from ``inf`` stays ``inf`` for ``w
  > 0``, and ``w * inf`` with ``w = 0`` is replaced by 0), and the run without the ReLU is at
  most the sum of the block's input magnitudes (at most ``1e6 * block_size``). The ramp's ends
  are their differences times the Slope's inverse: finite minus finite, or ``inf`` minus
  finite.
- A ``start_value`` clamped to ``M`` belongs to a ramp whose every value exceeds ``M``: only
  steps past the end of a sequence (its padding) or beyond the domain form one.

The derivative is a ``custom_jvp``: the tangent obeys the linear recurrence
``dh_t = J_t dh_{t-1} + [z_t > 0] (dw h_{t-1} + du_t)`` with ``J_t = w [z_t > 0]``, solved by the
same blocked method on affine maps ``y -> a*y + b`` (in the blocks' layout throughout, with
``[z_t > 0]`` read off the state, so a derivative transposes the ``(batch, time)`` arrays once
each way), whose ``a`` over a span is ``w^k`` as a
``Slope`` from ``rnnjax.core.ramps.powers`` again (where every step of it fired; 0 otherwise), so
gradients do not compound the rounding of ``w^k`` either, and ``a*y`` overflows or underflows
only where the exact product does (a tiny tangent carried through a span with ``|w|^k > M`` is
exact, as in the loop). JAX transposes it for reverse mode, and differentiates it again for
second derivatives (``jax.hessian``, grad of grad), so every order of derivative is the
sequential loop's, within rounding. One limit: the derivative of ``w^k`` itself, which only
second derivatives use, is a float product of the steps' ``J_t`` clamped to ``[-M, M]``; with
``|w|^k`` past ``M`` its term is lost where forward-over-forward mode is finite in the loop
(reverse mode, and so ``jax.hessian``, overflows there in both). And outside the domain, where
a tangent itself overflows to ``inf`` (states past ``1e30``, tangents past ``M``), that term's
zero times the ``inf`` forms NaN where the loop's tangent is ``inf`` (the fourth audit: 76 of 90
such tangents at ``w = 1.5``, float32, blocks of 7). Masking it on the tangent is not linear in
the tangent (JAX cannot transpose it), and a custom rule for the zero lost its derivative under
``jax.hessian`` (4% off), so it stays.
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

__all__ = ["relu_scan", "scan", "default_block_size", "upper_block_size", "levels"]

# Steps per block, and lax.scan's unroll for the loops over a block's elements. On a CPU 64
# steps up to 2**15 steps; beyond them the best size depended on the machine: 256 on a 2-core
# AMD EPYC, 32 on a 2-core Intel Xeon (where 256 ran the forward pass at T = 1e5, batch 8, 1.3
# to 1.6 times as long); other CPUs, not measured, get 128, between the two (benchmarks/NOTES.md,
# "Block size", "The blocks' layout" and "Block size by machine"). Loops rolled (unrolling never
# paid on a CPU). On an accelerator 32, rolled: of 32, 64 and 128 the fastest on an H200 by
# the geometric mean of the target shapes; unrolling (8 at 32 steps, or 16 at 16) ran T = 1e4,
# batch 1 3.4 to 15 times as fast but took 14 to 46 s to compile (benchmarks/NOTES.md, "GPU";
# benchmarks/tune.py).
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
_ACCELERATOR_BLOCK_SIZE = (32, 32)
_UNROLL = {"cpu": 1}
_ACCELERATOR_UNROLL = 1
# The levels above the first group at most this many maps a block, in as few levels as that
# allows and blocks of equal size (upper_block_size): each level is a loop that XLA compiles,
# so fewer levels compile faster (benchmarks/NOTES.md, "Upper levels").
MAX_UPPER_BLOCK_SIZE = 128


def default_block_size(time: int, backend: str | None = None) -> int:
    """Returns the block size ``relu_scan`` uses for sequences of ``time`` steps on ``backend``."""
    short, long = _BLOCK_SIZE.get(backend or jax.default_backend(), _ACCELERATOR_BLOCK_SIZE)
    return max(1, min(long if time > _LONG else short, time))


def _scan(f: Callable, init: Any, xs: Any) -> tuple[Any, Any]:
    """``jax.lax.scan`` over a block's elements, unrolled as suits the default backend."""
    return jax.lax.scan(f, init, xs, unroll=_UNROLL.get(jax.default_backend(), _ACCELERATOR_UNROLL))


# ----------------------------------------------------------------------------------------------
# The blocked driver, for any maps with an associative composition.


def _to_blocks(tree: Any, size: int, fill: Any) -> Any:
    """``(batch, n)`` leaves -> ``(size, blocks * batch)``, lane ``k * batch + b`` holding block
    ``k`` of sequence ``b``; the last block is padded with the leaves of ``fill`` (padding only
    feeds states that are cut off).

    The blocks of every sequence lie along one axis: the loops' work is then one-dimensional,
    which XLA compiles to plain vector code on a CPU (with a third axis, even of size 1, a
    block's step at T = 1e6, batch 8, took 1.6x as long). Blocks outer and the batch inner,
    the transpose keeps the batch as its output's minor axis, which XLA's CPU transpose runs 2
    to 3.3 times as fast as with the blocks there (``benchmarks/NOTES.md``)."""

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
    ``(batch, n)`` one inside the transpose's fusion), XLA's CPU transpose ran 2.4x as fast: 26
    against 63 ms at T = 1e6, batch 8 (it computed each element's index through the bitcast)."""
    batch, blocks, size = x.shape
    return x.transpose(2, 1, 0).reshape(size, blocks * batch)


def _from_blocks(x: jax.Array, batch: int, n: int) -> jax.Array:
    """``(size, blocks * batch)`` (``_to_blocks``'s layout) -> ``(batch, n)``."""
    size = x.shape[0]
    return x.reshape(size, -1, batch).transpose(2, 1, 0).reshape(batch, -1)[:, :n]


class _Algebra(NamedTuple):
    """The maps that spans of elements form, for the blocked driver.

    ``then(map, element, slopes)`` is the map followed by one element of the first level and
    ``compose(first, second, slopes)`` the map followed by another map (of a higher level's
    element); ``evaluate(map, slopes, h)`` applies one. ``powers(counts)`` returns what spans of
    ``counts`` steps share, stacked (``rnnjax.core.ramps.powers`` for ramps), or is None. At the
    ``j``-th element of a block the driver passes ``slopes = (before, element, after)``: those of
    the spans of the ``j`` elements before, of the element, and of all ``j + 1``.
    ``spans(blocks, slope)``, if given, returns the maps of whole blocks of first-level elements
    at once, from ``(size, lanes)`` leaves and what a block's span shares; without it they are
    composed one element at a time with ``then``.
    """

    identity: Callable[[tuple[int, ...], Any], Any]
    then: Callable[[Any, Any, Any], Any]
    compose: Callable[[Any, Any, Any], Any]
    evaluate: Callable[[Any, Any, jax.Array], jax.Array]
    powers: Callable[[np.ndarray], Any] | None = None
    spans: Callable[[Any, Any], Any] | None = None


def _prefix_states(
    elements: Any,
    start: jax.Array,
    algebra: _Algebra,
    size: int,
    *,
    span: int = 1,
    maps: bool = False,
    step: Callable[[jax.Array, Any], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Returns ``h_k = e_k(h_{k-1})`` for ``k < n``, with ``h_{-1} = start``, in blocks.

    Args:
      elements: a pytree of ``(batch, n)`` arrays, one element per position: steps, or
        (``maps``) maps of ``span`` steps each.
      start: ``(batch,)``, the state before the first element.
      algebra: the maps that spans of elements form.
      size: elements per block at this level.
      span: steps per element.
      maps: whether the elements are maps (levels above the first) rather than steps.
      step: see ``_blocked_states``.

    Returns:
      ``(states, entering)``: ``states`` ``(batch, n)``, and ``entering`` ``(batch, blocks)``,
      the state before each block of ``size`` elements.
    """
    batch, n = jax.tree.leaves(elements)[0].shape
    # The last block is padded with zero elements at the first level and identity maps above
    # it; either way the padding only feeds states that are cut off.
    padding = (algebra.identity((), start.dtype) if maps
               else jax.tree.map(lambda _: 0, elements))
    states, entering = _blocked_states(_to_blocks(elements, size, padding), start, algebra,
                                       span=span, maps=maps, step=step)
    return _from_blocks(states, batch, n), entering


def _blocked_states(
    blocks: Any,
    start: jax.Array,
    algebra: _Algebra,
    *,
    span: int = 1,
    maps: bool = False,
    step: Callable[[jax.Array, Any], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``_prefix_states`` on elements already in blocks (``_to_blocks``'s layout), and its
    states left in that layout: what the first level works on, so that the recurrence and its
    derivative transpose the ``(batch, time)`` arrays once each way.

    Args:
      blocks: a pytree of ``(size, blocks * batch)`` arrays.
      start: ``(batch,)``, the state before the first element.
      algebra, span, maps: as for ``_prefix_states``.
      step: ``step(h, element)``, one element applied to a state. Given, each block re-runs its
        elements one by one from its entering state (the loop's own rounding); None evaluates
        there each prefix map, which the loop that forms the blocks' maps keeps (one rounding
        at the entering state's magnitude, and no second loop).

    Returns:
      ``(states, entering)``: ``states`` ``(size, blocks * batch)``, and ``entering`` ``(batch,
      blocks)``, the state before each block.
    """
    size, lanes = jax.tree.leaves(blocks)[0].shape
    batch = start.shape[0]
    blocks_per_sequence = lanes // batch
    then = algebra.compose if maps else algebra.then
    empty = algebra.identity((lanes,), start.dtype)
    if algebra.powers is None:
        slopes = element_slope = None
    else:
        table = algebra.powers(span * np.arange(size + 1))  # spans of 0, 1, ..., size elements
        slopes = jax.tree.map(lambda x: x[:-1], table), jax.tree.map(lambda x: x[1:], table)
        element_slope = jax.tree.map(lambda x: x[1], table)

    def extend(prefix, x):
        element, slope = x
        before, after = (None, None) if slope is None else slope
        return then(prefix, element, (before, element_slope, after)), after

    prefixes = None
    if step is None:  # every block's prefix maps, one loop: its last is the block's map
        _, prefixes = _scan(lambda m, x: (extend(m, x)[0],) * 2, empty, (blocks, slopes))
    if blocks_per_sequence == 1:
        entering = start[:, None]
    else:
        if prefixes is not None:
            block_maps = jax.tree.map(lambda x: x[-1], prefixes)
        elif algebra.spans is None:
            block_maps, _ = _scan(lambda m, x: (extend(m, x)[0], None), empty,
                                  (blocks, slopes))
        else:
            block_maps = algebra.spans(blocks, jax.tree.map(lambda x: x[-1], table))
        block_maps = jax.tree.map(lambda x: x.reshape(blocks_per_sequence, batch).T, block_maps)
        ends, _ = _prefix_states(block_maps, start, algebra,
                                  upper_block_size(blocks_per_sequence),
                                  span=span * size, maps=True)
        entering = jnp.concatenate([start[:, None], ends[:, :-1]], axis=1)

    flat_entering = entering.T.reshape(-1)  # in the lanes' order
    if step is None:  # each prefix map evaluated at its block's entering state, all at once
        after = None if slopes is None else jax.tree.map(lambda x: x[:, None], slopes[1])
        states = algebra.evaluate(prefixes, after, flat_entering)
    else:
        _, states = _scan(lambda h, x: (step(h, x[0]),) * 2, flat_entering, (blocks, slopes))
    return states, entering


def _last_states(block: Any, entering: jax.Array, lengths: jax.Array,
                 algebra: _Algebra) -> jax.Array:
    """The state after step ``lengths - 1`` of each sequence, ``(batch,)``: its block's prefix
    map evaluated at the block's entering state (``_blocked_states``), which rounds once at
    that magnitude instead of once a step (what keeps a 1e8-step L1 norm exact) and needs no
    block's second run. ``block`` holds the elements of each sequence's last block, ``(size,
    batch)`` leaves; where a length is 0 the result is the state before the first step."""
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

    Each block re-runs the loop's own steps from its exact entering state; the last state of
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
                                       step=lambda h, u: jnp.maximum(w * h + u, 0))
    last = (jnp.maximum(lengths - 1, 0) // size)[:, None, None]  # each sequence's last block
    last_block = jnp.take_along_axis(inputs, last, axis=1)[:, 0].T  # (block_size, batch)
    last_state = _last_states(last_block, entering, lengths, algebra)
    return jnp.where(lengths > 0, last_state, 0), states


@_from_zero.defjvp
def _from_zero_jvp(primals, tangents):
    w, inputs, lengths, growing = primals
    dw, dinputs, _, _ = tangents
    final_state, states = _from_zero(w, inputs, lengths, growing)
    # Everything stays in the blocks' layout, so the derivative transposes the (batch, time)
    # arrays once: the tangent of the inputs (and, in reverse mode, its cotangent).
    size, lanes = states.shape
    batch = lengths.shape[0]
    blocks_per_sequence = lanes // batch
    block = jnp.arange(lanes) // batch
    positions = block * size + jnp.arange(size)[:, None]  # the step of each element
    lane_lengths = jnp.tile(lengths, blocks_per_sequence)
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
    zero = jnp.zeros(batch, states.dtype)
    dstates, dentering = _blocked_states((jacobians, drive), zero, _affine(w),
                                         step=lambda y, e: e[0] * y + e[1])
    # The final state's tangent: the last block's steps re-run from its entering tangent, on
    # (block_size, batch) gathered elements, not every state's tangent. Plain steps, not the
    # block's prefix map: a span's `a` is 0 where w == 0 and would drop d(w**k)/dw, which
    # second derivatives at w = 0 need.
    last = jnp.maximum(lengths - 1, 0)
    lane = last // size * batch + jnp.arange(batch)
    last_block = jax.tree.map(lambda x: jnp.take(x, lane, axis=1), (jacobians, drive))

    def step_if(y, x):  # steps past the last one leave the tangent as it is
        take, (jacobian, d) = x
        return jnp.where(take, jacobian * y + d, y), None

    dlast, _ = _scan(
        step_if, jnp.take_along_axis(dentering, (last // size)[:, None], axis=1)[:, 0],
        (jnp.arange(size)[:, None] <= last % size, last_block))
    dfinal_state = jnp.where(lengths > 0, dlast, 0)
    return (final_state, states), (dfinal_state, dstates)


def _scan_feature(w, inputs, lengths, growing, block_size):
    """``relu_scan`` for one feature: a scalar ``w`` and ``(batch, time)`` inputs from 0."""
    batch, time = inputs.shape
    final_state, states = _from_zero(w, _split(inputs, block_size), lengths, growing)
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
) -> tuple[jax.Array, jax.Array]:
    """Runs ``h_t = max(0, w*h_{t-1} + inputs_t)`` for ``t < lengths``, exactly, in blocks.

    See the module docstring for the domain, the error bound and why it is finite.

    Args:
      w: the diagonal of the recurrent matrix, ``(features,)``.
      inputs: the projected inputs ``x_t @ W_ih``, ``(batch, time, features)``; float32 or
        float64.
      lengths: ``(batch,)`` integers in ``[0, time]``; under ``jit`` others are clipped to it.
      h0: the initial state, ``(batch, features)``.
      block_size: steps per block (one above ``time`` acts as ``time``); None takes
        ``default_block_size(time)``.

    Returns:
      ``(final_state, states)``, as ``rnnjax.rnn`` returns them: ``final_state`` ``(batch,
      features)``, the state after step ``lengths[b] - 1`` (``h0`` where the length is 0), and
      ``states`` ``(batch, time, features)``, the state after every step, zero from ``lengths``
      on. The final state does not need ``states``: where they are not used, ``jit`` leaves out
      the work that forms them (the blocks' second run), and the forward pass reads the inputs
      once.

    Raises:
      TypeError: inputs not float32 or float64 (``rnnjax.rnn`` computes float16 and bfloat16
        cells in float32), ``w`` or ``h0`` of another dtype, or lengths not integers.
      ValueError: shapes other than the above (or an axis of size 0), concrete lengths outside
        ``[0, time]``, or ``block_size`` not a positive integer.

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
    return scan(w, inputs, lengths, h0, block_size=block_size)


def scan(w: jax.Array, inputs: jax.Array, lengths: jax.Array, h0: jax.Array, *,
         block_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``relu_scan`` on checked arguments (``lengths`` int32 in ``[0, time]``): what
    ``rnnjax.rnn`` calls."""
    time = inputs.shape[1]
    size = default_block_size(time) if block_size is None else min(block_size, time)
    # The first step sees w*h0 + u_0 (summed as the loop sums it), so the scan starts from 0.
    inputs = _add_to_first_step(inputs, h0 * w)
    growing = jnp.any(jnp.abs(w) > 1)  # one branch for every feature, also under vmap

    def scan_feature(w, inputs):  # w () and inputs (batch, time): one feature's recurrence
        return _scan_feature(w, inputs, lengths, growing, size)

    if w.shape[0] == 1:  # the common case, without vmap's extra axis (see _to_blocks)
        final_state, states = jax.tree.map(lambda x: x[..., None], scan_feature(w[0], inputs[..., 0]))
    else:
        final_state, states = jax.vmap(scan_feature, in_axes=(0, 2), out_axes=(1, 2))(w, inputs)
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
