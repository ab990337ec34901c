"""Ramps: the maps that a span of steps of an elementwise ReLU recurrence applies to its state.

One step ``h -> max(0, w*h + u)`` maps ``[0, inf)`` into ``[0, inf)``, and so does any span of
them. Such a map is monotone and piecewise linear with one sloped segment: it is constant up to
``start``, has slope ``w**k`` (``k`` the span's length) up to ``end``, and is constant after. A
``Ramp`` stores that segment's two endpoints,

    f(h) = clip(start_value + slope * (h - start), min(start_value, end_value),
                max(start_value, end_value))

with ``0 <= start, start_value <= M`` (``M`` the dtype's largest finite value), ``start <= end
<= inf`` and ``0 <= end_value <= inf``, and its value at 0 stored apart (``at_zero``). Every
coordinate is a point of the domain or of the range, never an extrapolation: a ramp that rises
from its floor at ``h = 1e40`` in exact arithmetic stores ``start = M`` (it is constant on every
finite state). Positions are states that exist: 0, or at least ``tiny`` (the smallest normal
number; XLA flushes smaller ones to 0 on a CPU). A kink between 0 and ``tiny`` is stored at
``tiny`` where the line falls and where the line reaches ``tiny`` where it rises, which changes
the map on no state.

The slope is kept apart, as a ``Slope``: every ramp of a span of ``k`` steps has slope ``w**k``,
so ``powers`` computes it from ``k`` alone, rounded once (a product of rounded slopes would
compound their rounding over the spans), and with an exponent range of its own: ``3**1000`` or
``1e-30**1000`` is stored as it is, not clamped to ``M`` or flushed to 0. ``multiply`` then
scales a value by it with one rounding and ``divide`` with two, overflowing to ``inf`` or
underflowing to 0 only where the exact result does. That is what keeps every quantity finite
(the argument, and the error bound it gives, are in ``docs/parallel.md``) where a
slope-and-offset pair ``a*h + b`` overflows for ``|w| > 1`` and a threshold form ``a*(h - t)``
overflows ``t`` for ``|w| < 1``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Ramp", "Slope", "powers", "multiply", "divide", "identity", "evaluate",
           "then_step", "of_runs", "compose"]


class Ramp(NamedTuple):
    """A monotone piecewise-linear map of ``[0, inf)`` into ``[0, inf]`` (see the module docs).

    Attributes:
      start: where the sloped segment begins, in ``[0, M]``.
      start_value: the map's value at ``start``, in ``[0, M]``.
      end: where it ends, in ``[start, inf]``.
      end_value: the value at ``end``, in ``[0, inf]``.
      at_zero: the value at ``h = 0``.
    """

    start: jax.Array
    start_value: jax.Array
    end: jax.Array
    end_value: jax.Array
    at_zero: jax.Array


class Slope(NamedTuple):
    """A number ``lead * scale * scale`` of any magnitude, from normal floats, and its inverse.

    ``lead`` holds the sign and the significand, within ``2**+-(maxexp // 2)``; ``scale`` is a
    power of two; both are on the slope's side of 1 and have normal reciprocals, so that
    ``x * lead * scale * scale`` (and ``x * inverse_lead * inverse_scale * inverse_scale``)
    rounds once (twice) and overflows or underflows only where the exact product does. Exactly
    0 is ``2**-C`` with ``C`` past the dtype's range: it multiplies every finite number to 0
    and divides every positive one to ``inf``. Division is a product with the stored inverse,
    never ``x / lead``: compilers turn a division by a broadcast value into a product with its
    reciprocal, which flushes to 0 past the normal range.
    """

    lead: jax.Array
    scale: jax.Array
    inverse_lead: jax.Array
    inverse_scale: jax.Array


def _int_type(dtype) -> type:
    return {4: jnp.int32, 8: jnp.int64}[jnp.dtype(dtype).itemsize]


def _power_of_two(exponent: jax.Array, dtype) -> jax.Array:
    """``2.0**exponent`` exactly, for exponents of normal numbers of ``dtype``."""
    info = jnp.finfo(dtype)
    biased = (exponent.astype(_int_type(dtype)) - (info.minexp - 1)) << info.nmant
    return jax.lax.bitcast_convert_type(biased, dtype)


def _split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x = high + low`` exactly, each with at most half of ``x``'s significand bits (by
    masking bits, which no compiler contracts into a fused multiply-add)."""
    info = jnp.finfo(x.dtype)
    int_type = _int_type(x.dtype)
    low_bits = (info.nmant + 2) // 2
    mask = ~jnp.asarray((1 << low_bits) - 1, int_type)
    high = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(x, int_type) & mask, x.dtype)
    return high, x - high


def _times(a: tuple, b: tuple) -> tuple:
    """The product of two double-length numbers ``(high, low)`` in ``[0.5, 1)`` (Dekker)."""
    (a_high, a_low), (b_high, b_low) = a, b
    product = a_high * b_high
    (a1, a2), (b1, b2) = _split(a_high), _split(b_high)
    error = ((a1 * b1 - product) + a1 * b2 + a2 * b1) + a2 * b2
    error = error + (a_high * b_low + a_low * b_high)
    high = product + error
    return high, error - (high - product)


def powers(w: jax.Array, counts: np.ndarray, *, scan=jax.lax.scan) -> Slope:
    """Returns ``w**k`` for each ``k`` of ``counts``, each rounded once to ``w``'s dtype.

    Binary powering in double length (products of ``(high, low)`` pairs) with the binary
    exponent carried apart as an integer, so ``w**k`` keeps its relative accuracy (``k * eps**2``
    before the last rounding) and its magnitude at any ``k``.

    Args:
      w: ``(features,)`` floats (float32 or float64).
      counts: ``(n,)`` non-negative integers, static.
      scan: the ``jax.lax.scan`` that runs the loop over the bits (``rnnjax.core.parallel`` passes
        one unrolled as suits the backend).

    Returns:
      A ``Slope`` of ``(n, features)`` arrays.
    """
    counts = np.asarray(counts, np.int64)[:, None]
    dtype = w.dtype
    info = jnp.finfo(dtype)
    # Exponents of the exact result clamp to +-cap, past which every finite product
    # overflows and every quotient underflows, and back; powers of one w share one sign of
    # exponent, so the clamp never mixes a clamped exponent with one of the other sign.
    cap = info.maxexp - info.minexp + info.nmant + 2
    significand, exponent = jnp.frexp(jnp.abs(w))  # |w| = significand * 2**exponent
    zero = w == 0
    base = (jnp.where(zero, 0.5, significand).astype(dtype), jnp.zeros_like(w))
    base_exponent = jnp.where(zero, -cap, exponent).astype(jnp.int32)
    shape = counts.shape[:1] + w.shape
    result = (jnp.ones(shape, dtype), jnp.zeros(shape, dtype))
    negative = (w < 0) & (counts % 2 == 1)

    def normalised(pair, exponent):
        high, shift = jnp.frexp(pair[0])  # the product of two of [0.5, 1) is in [0.25, 1]
        return (high, pair[1] * _power_of_two(-shift, dtype)), jnp.clip(exponent + shift, -cap, cap)

    def slope_of(pair, exponent):
        # 1 / (high + low), to within about eps / 2 of the exact reciprocal (a Newton step).
        reciprocal = 1 / pair[0]
        product = _times(pair, (reciprocal, jnp.zeros_like(reciprocal)))
        reciprocal = reciprocal + reciprocal * ((1 - product[0]) - product[1])
        # Split the exponent between lead * scale**2, lead's within +-(maxexp // 2), so that
        # lead and scale lie on the slope's side of 1 (|slope| >= 1 iff exponent >= 1).
        scale_exponent = jnp.where(exponent >= 1, (exponent - 1) // 2, -(-exponent // 2))
        shift = jnp.clip(scale_exponent, 2 - info.maxexp, info.maxexp - 2) - scale_exponent
        scale_exponent = scale_exponent + shift
        lead_exponent = exponent - 2 * scale_exponent
        sign = jnp.where(negative, -1, 1).astype(dtype)
        return Slope(
            sign * (pair[0] + pair[1]) * _power_of_two(lead_exponent, dtype),
            _power_of_two(scale_exponent, dtype),
            sign * reciprocal * _power_of_two(-lead_exponent, dtype),
            _power_of_two(-scale_exponent, dtype),
        )

    def next_bit(carry, take):
        result, result_exponent, base, base_exponent, _ = carry
        product, product_exponent = normalised(_times(result, base),
                                               result_exponent + base_exponent)
        result = tuple(jnp.where(take, new, old) for new, old in zip(product, result))
        result_exponent = jnp.where(take, product_exponent, result_exponent)
        base, base_exponent = normalised(_times(base, base), 2 * base_exponent)
        return (result, result_exponent, base, base_exponent,
                slope_of(result, result_exponent)), None

    # A loop over the bits, whose result XLA materialises: as unrolled code, fusion copied it
    # into every consumer, once per element (4x slower training). The Slope is assembled inside
    # the loop for the same reason. At least two bits, since a one-trip loop is inlined.
    bits = np.arange(max(2, int(counts.max()).bit_length()))
    takes = (counts[None] >> bits[:, None, None]) & 1 == 1
    initial = (result, jnp.zeros(shape, jnp.int32), base, base_exponent,
               slope_of(result, jnp.zeros(shape, jnp.int32)))
    (*_, slope), _ = scan(next_bit, initial, jnp.asarray(takes))
    # A barrier, so that no compiler folds a constant table into lead * scale * scale.
    return jax.lax.optimization_barrier(slope)


def multiply(x: jax.Array, slope: Slope) -> jax.Array:
    """``x * slope``, rounded once; ``inf`` or 0 only where the exact product is."""
    return x * slope.lead * slope.scale * slope.scale


def divide(x: jax.Array, slope: Slope) -> jax.Array:
    """``x / slope``, rounded twice; ``inf`` or 0 only where the exact quotient is."""
    return x * slope.inverse_lead * slope.inverse_scale * slope.inverse_scale


def identity(shape: tuple[int, ...], dtype) -> Ramp:
    """The identity map ``h -> h`` of ``[0, inf)`` (slope ``w**0 = 1``), of the given shape."""
    zeros = jnp.zeros(shape, dtype)
    infinite = jnp.full(shape, jnp.inf, dtype)
    return Ramp(zeros, zeros, infinite, infinite, zeros)


def evaluate(ramp: Ramp, slope: Slope, h: jax.Array, *, growing: bool = True) -> jax.Array:
    """Returns ``ramp(h)`` for states ``h`` (0 or at least ``tiny``), where ``slope`` is the
    ramp's slope.

    ``growing=False`` may be passed when no slope exceeds 1 in magnitude (``|w| <= 1``): then no
    position lies between 0 and ``tiny``, the value at 0 is the line's, and the work for such
    positions is skipped (here and in ``then_step`` and ``compose``; the hot loop is 2x faster):
    ``at_zero`` is then not used, and ``then_step`` and ``compose`` pass it on unchanged.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([2.0])
      >>> slope = powers(w, [1])  # w**1, shape (1, 1)
      >>> ramp = then_step(identity((1, 1), jnp.float32), w, jnp.float32(-3.0), slope)
      >>> evaluate(ramp, slope, jnp.array([[0.0], [1.5], [4.0]]))[:, 0]  # max(0, 2h - 3)
      Array([0., 0., 5.], dtype=float32)
    """
    low = jnp.minimum(ramp.start_value, ramp.end_value)
    high = jnp.maximum(ramp.start_value, ramp.end_value)
    sloped = jnp.clip(ramp.start_value + multiply(h - ramp.start, slope), low, high)
    return jnp.where(h == 0, ramp.at_zero, sloped) if growing else sloped


def _position(start: jax.Array, offset: jax.Array, ahead: jax.Array, end: jax.Array):
    """``start + offset`` clamped into ``[start, end]``, rounded up to ``tiny`` where the exact
    position lies ``ahead`` of ``start`` but below ``tiny`` (XLA flushes it to 0; no state lies
    in between). Returns the position and whether it was rounded up."""
    tiny = jnp.finfo(start.dtype).tiny
    exact = start + offset
    rounded_up = ahead & (exact < tiny)
    return jnp.clip(jnp.where(rounded_up, tiny, exact), start, end), rounded_up


def then_step(ramp: Ramp, w: jax.Array, u: jax.Array, slope: Slope, *,
              growing: bool = True) -> Ramp:
    """Returns ``step ∘ ramp`` for the step ``v -> max(0, w*v + u)``; ``slope`` is its slope.

    The new values at the segment's ends are one step of the recurrence applied to the old
    ones, rounded exactly as the sequential loop rounds; where the step clips, the segment ends
    at the kink ``start - (w*start_value + u) / slope``, clamped into the old segment. A kink
    between 0 and ``tiny`` (only where ``start`` is 0) is stored at ``tiny`` if the line falls
    there, and where the line reaches ``tiny`` if it rises. ``growing``: see ``evaluate``.
    """
    tiny = jnp.finfo(u.dtype).tiny
    value_at_start = w * ramp.start_value + u
    value_at_end = jnp.where(w == 0, 0, w * ramp.end_value) + u  # 0 * inf is 0 here
    rising = slope.lead > 0
    reach = multiply(tiny, slope)  # what the line gains from 0 to tiny; per feature, cheap
    # The line reaches 0 ahead, before tiny, within a segment that reaches tiny (one that
    # ends at 0 maps every state past 0 to its end value).
    below = ((ramp.start == 0) & (ramp.end > 0) & (value_at_start * slope.lead < 0)
             & (jnp.abs(value_at_start) < jnp.abs(reach)) & growing)
    anchored = below & rising
    kink = jnp.clip(
        ramp.start - divide(jnp.where(anchored, value_at_start - tiny, value_at_start), slope),
        jnp.where(below, tiny, ramp.start), ramp.end)
    value_at_kink = jnp.where(anchored, jnp.maximum(value_at_start + reach, tiny), 0)
    largest = jnp.finfo(kink.dtype).max
    positive = value_at_start > 0
    return Ramp(
        jnp.minimum(jnp.where(positive, ramp.start, kink), largest),
        jnp.clip(jnp.where(positive, value_at_start, value_at_kink), 0, largest),
        jnp.where(value_at_end > 0, ramp.end, kink),
        jnp.where(value_at_end > 0, value_at_end, value_at_kink),
        jnp.maximum(w * ramp.at_zero + u, 0) if growing else ramp.at_zero,
    )


def of_runs(w: jax.Array, inputs: jax.Array, slope: Slope, *, scan=jax.lax.scan) -> Ramp:
    """Returns the ramps of spans of the steps ``h -> max(0, w*h + u)``, one span a column of
    ``inputs`` (``(steps, spans)``, one step a row), for ``|w| <= 1``; ``slope`` is ``w**steps``.

    Three plain runs of the loop over the span give the ramp, at three numbers a step where
    composing it step by step (``then_step``) carries four through a kink's division and
    selects. A span maps ``[0, inf)`` onto the values between ``f(0)`` and ``f(inf)``, and it
    is ``clip(slope*h + line, min(f(0), f(inf)), max(f(0), f(inf)))`` with ``line`` the
    span's steps run without the ReLU from 0 (a state that never clips follows the line; one
    that clips once follows the run from 0 or from ``inf`` from there on, since every step is
    monotone). The run from ``inf`` is ``inf`` for ``w > 0`` and, for ``w <= 0``, the run from
    0 after a first step that clips. With ``|w| <= 1``, ``|line|`` is at most the sum of the
    inputs' magnitudes: every number is finite, and its rounding is the loop's. ``scan`` runs
    the steps (``rnnjax.core.parallel`` passes one unrolled as suits the backend).
    """
    largest = jnp.finfo(inputs.dtype).max

    def step(runs, u):
        from_zero, from_infinity, line = runs
        return (jnp.maximum(w * from_zero + u, 0),
                jnp.maximum(jnp.where(w == 0, 0, w * from_infinity) + u, 0),  # 0 * inf is 0
                w * line + u), None

    zeros = jnp.zeros(inputs.shape[1:], inputs.dtype)
    (at_zero, at_infinity, line), _ = scan(
        step, (zeros, jnp.full_like(zeros, jnp.inf), zeros), inputs)
    # Where the line meets f(0) and f(inf): start <= end for either sign of the slope (the
    # differences and the slope have one sign); the clamps only absorb rounding.
    start = jnp.clip(divide(at_zero - line, slope), 0, largest)
    end = jnp.maximum(divide(at_infinity - line, slope), start)
    return Ramp(start, jnp.minimum(at_zero, largest), end, at_infinity, zeros)


def compose(first: Ramp, first_slope: Slope, second: Ramp, second_slope: Slope, *,
            growing: bool = True) -> Ramp:
    """Returns ``second ∘ first`` (whose slope is the product of theirs); associative.

    The composition's segment is the part of ``first``'s segment that ``first`` maps into
    ``second``'s: its ends are preimages of ``second``'s ends under ``first`` (a division by
    ``first_slope``, which is never 0), clamped into ``first``'s segment and rounded up to
    ``tiny`` if they lie closer to 0 (the values stored are the composition's there).
    ``growing``: see ``evaluate``.
    """
    low = jnp.minimum(first.start_value, first.end_value)
    high = jnp.maximum(first.start_value, first.end_value)
    rising = first_slope.lead > 0
    enters = jnp.where(rising, second.start, second.end)  # where `first` reaches `second`'s
    leaves = jnp.where(rising, second.end, second.start)  # segment, in `first`'s value space

    def end(value):
        """The preimage of ``value`` and ``second ∘ first`` there."""
        change = value - first.start_value
        position, rounded_up = _position(
            first.start, divide(change, first_slope),
            ((change > 0) == rising) & (change != 0) & growing, first.end)
        if growing:
            value = jnp.where(rounded_up, evaluate(first, first_slope, position), value)
        return position, evaluate(second, second_slope, jnp.clip(value, low, high),
                                  growing=growing)

    (start, start_value), (end_, end_value) = end(enters), end(leaves)
    largest = jnp.finfo(low.dtype).max
    return Ramp(jnp.minimum(start, largest), jnp.minimum(start_value, largest), end_, end_value,
                evaluate(second, second_slope, first.at_zero) if growing else first.at_zero)
