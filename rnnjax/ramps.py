"""Ramps: the maps that a span of steps of an elementwise ReLU recurrence applies to its state.

One step ``h -> max(0, w*h + u)`` maps ``[0, inf)`` into ``[0, inf)``, and so does any span of
them. Such a map is monotone and piecewise linear with one sloped segment: it is constant up to
``start``, has slope ``slope`` up to ``end``, and is constant after. A ``Ramp`` stores it by that
segment's two endpoints and its slope:

    f(h) = clip(start_value + slope * (h - start), min(start_value, end_value),
                max(start_value, end_value))

with the invariants (``M`` is the dtype's largest finite value, ``tiny`` its smallest normal):

    tiny <= |slope| <= M,    0 <= start <= M,    0 <= start_value <= M,
    start <= end <= inf,     0 <= end_value <= inf.

Every coordinate is a point of the domain or of the range, never an extrapolation: a ramp that
rises from its floor at ``h = 1e40`` in exact arithmetic stores ``start = M`` (it is constant on
every finite state), and one whose slope is ``0.5**1000`` stores ``tiny``. That is what keeps
every quantity finite (see ``rnnjax.parallel`` for the argument) where a slope-and-offset pair
``a*h + b`` overflows for ``|w| > 1`` and a threshold form ``a*(h - t)`` overflows ``t`` for
``|w| < 1``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Ramp", "identity", "evaluate", "then_step", "compose"]


class Ramp(NamedTuple):
    """A monotone piecewise-linear map of ``[0, inf)`` into ``[0, inf]`` (see the module docs).

    Attributes:
      slope: the sloped segment's slope, ``tiny <= |slope| <= M``.
      start: where the sloped segment begins, in ``[0, M]``.
      start_value: the map's value at ``start``, in ``[0, M]``.
      end: where it ends, in ``[start, inf]``.
      end_value: the value at ``end``, in ``[0, inf]``.
    """

    slope: jax.Array
    start: jax.Array
    start_value: jax.Array
    end: jax.Array
    end_value: jax.Array


def _saturate(slope: jax.Array) -> jax.Array:
    """Clamps ``|slope|`` into ``[tiny, M]``, keeping its sign (a zero becomes ``+tiny``)."""
    info = jnp.finfo(slope.dtype)
    magnitude = jnp.clip(jnp.abs(slope), info.tiny, info.max)
    return jnp.where(slope < 0, -magnitude, magnitude)


def identity(shape: tuple[int, ...], dtype) -> Ramp:
    """The identity map ``h -> h`` of ``[0, inf)``, as ramps of the given shape."""
    zeros = jnp.zeros(shape, dtype)
    infinite = jnp.full(shape, jnp.inf, dtype)
    return Ramp(jnp.ones(shape, dtype), zeros, zeros, infinite, infinite)


def evaluate(ramp: Ramp, h: jax.Array) -> jax.Array:
    """Returns ``ramp(h)`` for states ``h >= 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> ramp = then_step(identity((), jnp.float32), jnp.float32(2.0), jnp.float32(-3.0))
      >>> [float(evaluate(ramp, jnp.float32(h))) for h in (0.0, 1.5, 4.0)]  # max(0, 2h - 3)
      [0.0, 0.0, 5.0]
    """
    low = jnp.minimum(ramp.start_value, ramp.end_value)
    high = jnp.maximum(ramp.start_value, ramp.end_value)
    return jnp.clip(ramp.start_value + ramp.slope * (h - ramp.start), low, high)


def then_step(ramp: Ramp, w: jax.Array, u: jax.Array) -> Ramp:
    """Returns ``step ∘ ramp`` for the step ``v -> max(0, w*v + u)``.

    The new values at the segment's ends are one step of the recurrence applied to the old
    ones, rounded exactly as the sequential loop rounds; where the step clips, the segment ends
    at the kink ``start - (w*start_value + u) / (w*slope)``, clamped into the old segment.
    """
    value_at_start = w * ramp.start_value + u
    value_at_end = jnp.where(w == 0, 0, w * ramp.end_value) + u  # 0 * inf is 0 here
    slope = _saturate(ramp.slope * w)
    kink = jnp.clip(ramp.start - value_at_start / slope, ramp.start, ramp.end)
    start = jnp.where(value_at_start > 0, ramp.start, kink)
    return Ramp(
        slope,
        jnp.minimum(start, jnp.finfo(start.dtype).max),
        jnp.maximum(value_at_start, 0),
        jnp.where(value_at_end > 0, ramp.end, kink),
        jnp.maximum(value_at_end, 0),
    )


def compose(first: Ramp, second: Ramp) -> Ramp:
    """Returns ``second ∘ first``; associative, so ``lax.associative_scan`` may use it too.

    The composition's segment is the part of ``first``'s segment that ``first`` maps into
    ``second``'s: its ends are preimages of ``second``'s ends under ``first`` (a division by
    ``first.slope``, which is never 0), clamped into ``first``'s segment.
    """
    low = jnp.minimum(first.start_value, first.end_value)
    high = jnp.maximum(first.start_value, first.end_value)
    rising = first.slope > 0
    enters = jnp.where(rising, second.start, second.end)  # where `first` reaches `second`'s
    leaves = jnp.where(rising, second.end, second.start)  # segment, in `first`'s value space

    def preimage(value):
        return jnp.clip(first.start + (value - first.start_value) / first.slope,
                        first.start, first.end)

    return Ramp(
        _saturate(first.slope * second.slope),
        jnp.minimum(preimage(enters), jnp.finfo(low.dtype).max),
        evaluate(second, jnp.clip(enters, low, high)),
        preimage(leaves),
        evaluate(second, jnp.clip(leaves, low, high)),
    )
