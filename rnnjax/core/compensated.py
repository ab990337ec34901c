"""Compensated (twice the working precision) evaluation of the ReLU recurrence.

A step ``h -> max(0, w*h + u)`` is, where it fires, one step of Horner's scheme; compensated
Horner computes it as if in twice the working precision, and a ReLU reset to 0 is exact. Here a
state is carried as a "wide" number, in one of two arithmetics (``arithmetic``):

* ``FLOAT64``: a float32 recurrence on a CPU or a GPU runs in float64 (``jax.enable_x64`` inside
  the function only; the arrays that come out are float32): a step is one float64 multiply-add,
  unit roundoff ``2**-53``, below float32's squared (``2**-48``), at the cost of a float32 step
  on vectors half as wide. It measured 5 to 10 times as fast as the double word below
  (benchmarks/NOTES.md, "Compensation").
* ``DOUBLE_WORD``: float64, and float32 on other backends: ``hi + lo`` in the working dtype, a
  step computed from error-free transformations and renormalised (``hi = fl(hi + lo)``): within
  ``3 u**2 |w h + u|`` of the exact step on ``hi + lo`` (``u = eps / 2``, the unit roundoff),
  and ``hi`` the state rounded once.

The error-free transformations:

* ``two_sum(a, b) = (s, e)``: ``s = fl(a + b)`` and ``a + b = s + e`` exactly (Knuth's six
  operations, no branch, no magnitude ordering);
* ``two_product(a, b) = (p, e)``: ``p = fl(a * b)`` and ``a * b = p + e`` exactly (Dekker's
  product on halves split by masking significand bits: every partial product is exact, so a
  compiler that contracts a product and a sum into a fused multiply-add, as XLA's CPU backend
  does where a product has one use, computes the same numbers).

Both hold in round-to-nearest wherever no intermediate overflows (``|a*b|`` and ``|a + b|``
below the dtype's largest value over ``2**(nmant // 2 + 1)``: ``1e34`` in float32) and ``e`` is
a normal number or 0; XLA flushes a smaller ``e`` to 0 on a CPU, an absolute error below
``tiny`` (the smallest normal number). ``tests/test_compensated.py`` checks the compiled
programs against ``fractions``.

``loop`` is the sequential loop of a scalar or diagonal ``ReLUCell`` in the wide arithmetic;
``rnnjax.core.parallel`` runs its blocks in it. The bounds: ``docs/accuracy.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp

__all__ = ["Precision", "PRECISIONS", "Arithmetic", "arithmetic", "two_sum", "two_product",
           "split", "product_error", "loop"]

Precision = Literal["compensated", "plain"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

# Backends whose float64 is native: a float32 recurrence runs in float64 there.
FLOAT64_BACKENDS = ("cpu", "gpu", "cuda", "rocm")

# lax.scan unroll factor per backend (rnnjax.core.recurrence's, which imports this module).
_UNROLL = {"cpu": 1}
_ACCELERATOR_UNROLL = 8


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
    down = lambda small: jnp.where(small, 1 / up, 1).astype(e.dtype)  # noqa: E731
    return p, e * down(a_small) * down(b_small)


def product_error(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a * b - fl(a * b)``, exactly (``two_product``'s ``e``): in float64 for float32 factors
    where ``arithmetic`` is ``FLOAT64`` (the exact product of two float32 fits in float64), which
    is 4 operations where Dekker's product takes 20."""
    if arithmetic(a.dtype) is FLOAT64:
        with jax.enable_x64(True):
            wide = a.astype(jnp.float64) * b.astype(jnp.float64)
            return (wide - (a * b).astype(jnp.float64)).astype(a.dtype)
    return two_product(a, b)[1]


class Arithmetic(NamedTuple):
    """How wide numbers (a pytree per number: a float64 array, or a ``(hi, lo)`` pair) are
    formed and stepped. Every function runs inside ``context()``.

    Attributes:
      name: "float64" or "double word".
      solve: the dtype of corrections (``add``, ``minus``) and of the pre-activations ``step``
        returns: float64 for ``FLOAT64``, the working dtype for ``DOUBLE_WORD``.
      context: a context manager under which the wide arrays can be formed.
      lift: ``(value, low) -> value + low``, both in the working dtype.
      weight: the form of ``w`` that ``step`` takes.
      step: ``(h, w, u) -> (max(0, w*h + u), pre)``, ``pre`` the pre-activation ``w*h + u``
        rounded to ``solve`` (positive exactly where the step fired).
      add: ``(h, d) -> h + d``, ``d`` in ``solve``.
      minus: ``(a, b) -> a - b``, rounded to ``solve``.
      round: ``h -> fl(h)`` in the working dtype ``dtype``.
    """

    name: str
    solve: Any
    context: Callable[[], Any]
    lift: Callable[[jax.Array, jax.Array], Any]
    weight: Callable[[jax.Array], Any]
    step: Callable[[Any, Any, Any], tuple[Any, jax.Array]]
    add: Callable[[Any, jax.Array], Any]
    minus: Callable[[Any, Any], jax.Array]
    round: Callable[[Any, Any], jax.Array]


def _float64_step(h, w, u):
    pre = w * h + u
    return jnp.where(pre > 0, pre, jnp.where(jnp.isnan(pre), pre, 0)), pre  # a NaN stays NaN


FLOAT64 = Arithmetic(
    name="float64",
    solve=jnp.float64,
    context=lambda: jax.enable_x64(True),
    lift=lambda value, low: value.astype(jnp.float64) + low.astype(jnp.float64),
    weight=lambda w: w.astype(jnp.float64),
    step=_float64_step,
    add=lambda h, d: h + d,
    minus=lambda a, b: a - b,
    round=lambda h, dtype: h.astype(dtype),
)


def _double_word_step(h, w, u):
    """One step on a double word ``h = hi + lo``, input ``u = (u, u_low)``, renormalised: ``hi``
    the new state rounded once, ``hi + lo`` within ``3 u**2 |w h + u|`` of the exact step on
    ``hi + lo`` where it fires (0, exactly, where it does not)."""
    (hi, lo), (u, u_low) = h, u
    p, p_error = two_product(w, hi)
    s, s_error = two_sum(p, u)
    low = (p_error + s_error) + (w * lo + u_low)
    new_hi, new_lo = two_sum(s, low)
    fired = (new_hi > 0) | jnp.isnan(new_hi)  # hi + lo has hi's sign (|lo| <= ulp(hi) / 2); a NaN stays NaN
    return (jnp.where(fired, new_hi, 0), jnp.where(fired, new_lo, 0)), new_hi


def _double_word_add(h, d):
    hi, lo = h
    s, e = two_sum(hi, d)
    return two_sum(s, lo + e)


DOUBLE_WORD = Arithmetic(
    name="double word",
    solve=None,  # the working dtype
    context=contextlib.nullcontext,
    lift=lambda value, low: (value, low),  # step and add renormalise; minus needs none
    weight=lambda w: w,
    step=_double_word_step,
    add=_double_word_add,
    # The highs' difference is exact where they are within a factor 2 (Sterbenz).
    minus=lambda a, b: (a[0] - b[0]) + (a[1] - b[1]),
    round=lambda h, dtype: h[0],
)


def arithmetic(dtype, backend: str | None = None) -> Arithmetic:
    """The wide arithmetic for a recurrence in ``dtype`` (float32 or float64) on ``backend``
    (None: the default backend): ``FLOAT64`` for float32 where float64 is native
    (``FLOAT64_BACKENDS``), ``DOUBLE_WORD`` elsewhere."""
    backend = backend or jax.default_backend()
    if jnp.dtype(dtype) == jnp.float32 and backend in FLOAT64_BACKENDS:
        return FLOAT64
    return DOUBLE_WORD


def solve_dtype(arith: Arithmetic, dtype) -> Any:
    """The dtype of ``arith``'s corrections for a recurrence in ``dtype``."""
    return arith.solve or dtype


def loop(w: jax.Array, inputs: jax.Array, inputs_low: jax.Array, lengths: jax.Array,
         h0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The loop ``h_t = max(0, w*h_{t-1} + u_t)`` for ``t < lengths``, in the wide arithmetic
    (``arithmetic(inputs.dtype)``), each state rounded once to the working dtype.

    Args:
      w: ``(features,)``, the diagonal of ``W_hh``.
      inputs, inputs_low: ``(batch, time, features)``, the projected inputs and their rounding
        errors (``inputs + inputs_low`` the exact ones), float32 or float64.
      lengths: ``(batch,)`` int32 in ``[0, time]``.
      h0: ``(batch, features)``.

    Returns:
      ``(final_state, states)``, as ``rnnjax.rnn`` returns them.

    Its derivative is the loop's at the rounded states (``w dh + h dw + du`` where a step
    fired, 0 elsewhere; ``inputs_low`` carries none): a linear loop in the working dtype, which
    JAX transposes for reverse mode and differentiates again.
    """
    swap = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731  (time, batch, features) inside
    final_state, states = _time_major_loop(w, swap(inputs), swap(jax.lax.stop_gradient(inputs_low)),
                                           lengths, h0)
    return final_state, swap(states)


@jax.custom_jvp
def _time_major_loop(w, inputs, inputs_low, lengths, h0):
    """``loop`` on ``(time, batch, features)`` inputs and states."""
    arith, dtype = arithmetic(inputs.dtype), inputs.dtype
    unroll = _UNROLL.get(jax.default_backend(), _ACCELERATOR_UNROLL)
    with arith.context():
        w_wide = arith.weight(w)
        start = arith.lift(h0, jnp.zeros_like(h0))

        def step(carry, x):
            h, t = carry
            new, _ = arith.step(h, w_wide, arith.lift(*x))
            active = t < lengths[:, None]
            h = jax.tree.map(lambda n, old: jnp.where(active, n, old), new, h)
            return (h, t + 1), jnp.where(active, arith.round(new, dtype), 0)

        (h, _), states = jax.lax.scan(step, (start, jnp.zeros((), jnp.int32)), (inputs, inputs_low),
                                      unroll=unroll)
        return arith.round(h, dtype), states


@_time_major_loop.defjvp
def _time_major_loop_jvp(primals, tangents):
    w, _, _, lengths, h0 = primals
    dw, dinputs, _, _, dh0 = tangents
    final_state, states = _time_major_loop(*primals)
    unroll = _UNROLL.get(jax.default_backend(), _ACCELERATOR_UNROLL)

    def step(carry, x):
        y, before, t = carry  # before: the state before this step
        state, du = x
        active = t < lengths[:, None]
        y = jnp.where(active, jnp.where(state > 0, w * y + before * dw + du, 0), y)
        return (y, state, t + 1), jnp.where(active, y, 0)

    (dfinal, _, _), dstates = jax.lax.scan(step, (dh0, h0, jnp.zeros((), jnp.int32)), (states, dinputs),
                                           unroll=unroll)
    return (final_state, states), (dfinal, dstates)
