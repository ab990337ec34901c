"""Compensated (twice the working precision) arithmetic for the ReLU recurrence.

A step ``h -> max(0, w*h + u)`` is, where it fires, one step of Horner's scheme; compensated
Horner computes it as if in twice the working precision from error-free transformations:

* ``two_sum(a, b) = (s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e`` exactly (Knuth's six
  operations, no branch, no magnitude ordering);
* ``two_product(a, b) = (p, e)`` with ``p = fl(a * b)`` and ``a * b = p + e`` exactly (Dekker's
  product on halves split by masking significand bits: every partial product is exact, so a
  compiler that contracts a product and a sum into a fused multiply-add computes the same
  numbers, and no ``fma`` primitive is needed).

Both hold in round-to-nearest for float32 and float64 wherever no intermediate overflows
(``|a*b|`` and ``|a + b|`` below the dtype's largest value over ``2**(nmant // 2 + 1)``: ``1e34``
in float32) and ``e`` is a normal number or 0; XLA flushes a smaller ``e`` to 0 on a CPU, which
is then an absolute error below ``tiny`` (the smallest normal number). ``tests/test_compensated.py``
checks that the compiled programs return exact pairs (against ``fractions``) on a CPU, under
``jit``, and that XLA does not simplify ``(a + b) - a`` to ``b``.

Two uses:

* ``step``: the sequential loop's step on a double-word state ``(hi, lo)``, renormalised every
  step (``hi = fl(hi + lo)``), so the state is ``hi + lo`` to within ``3 u**2 |w h + u|`` a step
  (``u`` the unit roundoff, ``eps / 2``) and ``hi`` is it rounded once;
* ``residual``: how far a computed state is from one exact step of the recurrence applied to the
  computed previous state, to within ``3 u |residual| + 2 u**2 |w h + u|``; the parallel scan
  solves the recurrence of the error from it (one step of iterative refinement,
  ``rnnjax.core.parallel``).
"""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp

__all__ = ["Precision", "PRECISIONS", "two_sum", "two_product", "split", "residual", "step"]

Precision = Literal["compensated", "plain"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def _int_type(dtype) -> type:
    return {4: jnp.int32, 8: jnp.int64}[jnp.dtype(dtype).itemsize]


def split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x = high + low`` exactly, ``high`` with the leading ``nmant // 2 + 1`` significand bits
    of ``x`` and ``low`` with at most ``(nmant + 1) // 2``: masking bits, which no compiler
    contracts or reassociates."""
    info = jnp.finfo(x.dtype)
    int_type = _int_type(x.dtype)
    low_bits = (info.nmant + 2) // 2
    mask = ~jnp.asarray((1 << low_bits) - 1, int_type)
    high = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(x, int_type) & mask, x.dtype)
    return high, x - high


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(s, e)``: ``s = fl(a + b)`` and ``a + b = s + e`` exactly (Knuth)."""
    s = a + b
    b_virtual = s - a
    a_virtual = s - b_virtual
    return s, (a - a_virtual) + (b - b_virtual)


def two_product(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(p, e)``: ``p = fl(a * b)`` and ``a * b = p + e`` exactly (Dekker, on masked halves),
    wherever ``e`` is a normal number or 0 (else it is within ``tiny`` of it).

    A factor below ``2**(minexp + 2 * nmant)`` is scaled up by ``2**(2 * nmant + 2)`` first
    (exactly), so that its low half and the partial products are normal numbers: flushed to 0,
    they would make ``e`` off by up to ``|a * b| * 2**-nmant``."""
    info = jnp.finfo(a.dtype)
    up = 2.0 ** (2 * info.nmant + 2)
    small = 2.0 ** (info.minexp + 2 * info.nmant)
    a_small, b_small = jnp.abs(a) < small, jnp.abs(b) < small
    a_scaled, b_scaled = jnp.where(a_small, a * up, a), jnp.where(b_small, b * up, b)
    p = a * b
    p_scaled = a_scaled * b_scaled
    (a1, a2), (b1, b2) = split(a_scaled), split(b_scaled)
    e = ((a1 * b1 - p_scaled) + a1 * b2 + a2 * b1) + a2 * b2
    return p, e * jnp.where(a_small, 1 / up, 1).astype(e.dtype) * jnp.where(b_small, 1 / up, 1).astype(e.dtype)


def residual(h: jax.Array, previous: jax.Array, w: jax.Array, u: jax.Array,
             u_low: jax.Array) -> jax.Array:
    """``h - (w * previous + u + u_low)``, the computed state ``h`` less one exact step from the
    computed ``previous`` (``u + u_low`` the step's input, as a double word): its relative error
    is at most about ``3 u`` plus ``2 u**2 |w * previous + u|`` absolute (``h - fl(w*previous +
    u)`` is exact where the two are within a factor 2, Sterbenz)."""
    p, p_error = two_product(w, previous)
    s, s_error = two_sum(p, u)
    return (((h - s) - s_error) - p_error) - u_low


@jax.custom_jvp
def step(hi: jax.Array, lo: jax.Array, w: jax.Array, u: jax.Array,
         u_low: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One step ``h -> max(0, w*h + u)`` on a double word ``h = hi + lo`` (``u + u_low`` the
    input, a double word too), renormalised: ``hi`` is the new state rounded once, and ``hi +
    lo`` is within ``3 u**2 |w h + u|`` of the exact step on ``hi + lo`` where it fires (0,
    exactly, where it does not). A ReLU reset is exact.

    Its derivative is the step's, ``w dh + h dw + du`` where the step fired and 0 elsewhere, at
    ``h = hi`` (``lo`` and ``u_low`` carry no derivative): a linear function of the tangents, so
    JAX transposes a loop of steps for reverse mode and differentiates it again.
    """
    p, p_error = two_product(w, hi)
    s, s_error = two_sum(p, u)
    low = (p_error + s_error) + (w * lo + u_low)
    new_hi, new_lo = two_sum(s, low)
    fired = new_hi > 0  # hi + lo has hi's sign (|lo| <= ulp(hi) / 2)
    return jnp.where(fired, new_hi, 0), jnp.where(fired, new_lo, 0)


@step.defjvp
def _step_jvp(primals, tangents):
    hi, lo, w, u, u_low = primals
    dhi, _, dw, du, _ = tangents
    new_hi, new_lo = step(hi, lo, w, u, u_low)
    dnew = jnp.where(new_hi > 0, w * dhi + hi * dw + du, 0)
    return (new_hi, new_lo), (dnew, jnp.zeros_like(new_lo))
