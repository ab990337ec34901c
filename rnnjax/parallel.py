"""Exact parallel-in-time evaluation of an elementwise ReLU recurrence.

One step of a scalar (or diagonal) ReLU cell is the map ``h -> max(0, w*h + u)``. Maps of the
form ``h -> clip(lo + a*(h - t), lo, hi)`` (a ramp of slope ``a`` leaving the floor ``lo`` at
``h = t``, capped at ``hi``) contain it and are closed under composition for any sign of
``w``, so ``jax.lax.associative_scan`` composes all prefixes in O(log T) depth. Nothing is
approximated: the scan computes the same function as the sequential loop, in another order of
floating-point operations (a tree, which also rounds less than the loop on long sequences).

The threshold form keeps the floor ``lo`` finite and never forms the offset ``a*t``: with
``|w| > 1`` the slope of a long span overflows to infinity, and a slope-offset pair
``a*h + b`` would then meet ``inf - inf``; here the map just becomes a step at ``t``.
Padded steps are not composed at all: every step is scanned, and each state past a sequence's
length is replaced by the state at its last step.

The gradient is a custom VJP: the adjoint of the recurrence is linear,
``lambda_t = g_t + J_{t+1} lambda_{t+1}``, which a second associative scan solves in reverse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rnnjax.masking import length_mask

__all__ = ["relu_scan"]

Ramp = tuple[jax.Array, jax.Array, jax.Array, jax.Array]  # (a, t, lo, hi)


def _mul(factor: jax.Array, value: jax.Array) -> jax.Array:
    """``factor * value`` with ``0 * inf = 0``: a zero on either side contributes nothing."""
    return jnp.where((factor == 0) | (value == 0), 0, factor * value)


def _steps(w: jax.Array, inputs: jax.Array) -> Ramp:
    """Each step ``h -> max(0, w*h + u)`` as a ramp; a zero weight gives the constant max(0, u)."""
    constant = jnp.broadcast_to(w == 0, inputs.shape)
    safe_w = jnp.where(w == 0, 1, w)
    floor = jnp.where(constant, jnp.maximum(inputs, 0), 0)
    return (
        jnp.broadcast_to(w, inputs.shape),
        jnp.where(constant, 0, -inputs / safe_w),
        floor,
        jnp.where(constant, floor, jnp.inf),
    )


def _compose(first: Ramp, second: Ramp) -> Ramp:
    """Returns ``second ∘ first``."""
    a1, t1, lo1, hi1 = first
    a2, t2, lo2, hi2 = second
    # second's affine part at first's bounds; at lo1 it is also the composition's value at t1.
    image_lo = lo2 + _mul(a2, lo1 - t2)
    image_hi = lo2 + _mul(a2, hi1 - t2)
    rising = a2 >= 0
    # clip(clip(z, l, u), lo2, hi2) == clip(z, clip(l, lo2, hi2), clip(u, lo2, hi2)).
    lo = jnp.clip(jnp.where(rising, image_lo, image_hi), lo2, hi2)
    hi = jnp.clip(jnp.where(rising, image_hi, image_lo), lo2, hi2)
    a = a1 * a2
    # The composition is image_lo + a*(h - t1); it meets its floor lo at t = t1 + (lo - image_lo)/a,
    # computed without forming a*(...) so that a huge slope cannot overflow it. When the floor
    # is image_lo itself (no clipping), t is t1 exactly, which keeps sums in tree order.
    shift = ((lo - lo2) / jnp.where(a2 == 0, 1, a2) + (t2 - lo1)) / jnp.where(a1 == 0, 1, a1)
    t = jnp.where((lo == image_lo) | (a == 0), t1, t1 + shift)
    return a, t, lo, hi


def _compose_affine_reversed(later, earlier):
    """Returns ``earlier ∘ later`` for affine maps ``lam -> A*lam + B`` (a reverse scan's order)."""
    a_later, b_later = later
    a_earlier, b_earlier = earlier
    return a_earlier * a_later, _mul(a_earlier, b_later) + b_earlier


def _forward(w, inputs, lengths, h0):
    mask = length_mask(lengths, inputs.shape[1])[..., None]
    a, t, lo, hi = jax.lax.associative_scan(_compose, _steps(w, jnp.where(mask, inputs, 0)), axis=1)
    states = jnp.clip(lo + _mul(a, h0[:, None] - t), lo, hi)
    # Past its length a sequence keeps the state of its last step (h0 if it has none).
    last = jnp.take_along_axis(states, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    final = jnp.where(lengths[:, None] > 0, last, h0)
    return jnp.where(mask, states, final[:, None])


@jax.custom_vjp
def relu_scan(w: jax.Array, inputs: jax.Array, lengths: jax.Array, h0: jax.Array) -> jax.Array:
    """Runs ``h_t = max(0, w*h_{t-1} + inputs_t)`` for ``t < lengths``, ``h_t = h_{t-1}`` after.

    Args:
      w: the diagonal of the recurrent matrix, ``(features,)``.
      inputs: the projected inputs ``x_t @ W_ih``, ``(batch, time, features)``.
      lengths: ``(batch,)`` int32 in ``[0, time]``; later steps leave the state unchanged,
        whatever their inputs.
      h0: the initial state, ``(batch, features)``.

    Returns:
      The state after every step, ``(batch, time, features)``, frozen from ``lengths`` on.

    Example:
      >>> import jax.numpy as jnp
      >>> inputs = jnp.array([[[3.0], [5.0], [7.0], [2.0]]])
      >>> relu_scan(jnp.ones(1), inputs, jnp.array([3]), jnp.zeros((1, 1)))[0, :, 0]
      Array([ 3.,  8., 15., 15.], dtype=float32)
    """
    return _forward(w, inputs, lengths, h0)


def _relu_scan_fwd(w, inputs, lengths, h0):
    states = _forward(w, inputs, lengths, h0)
    return states, (w, inputs, lengths, h0, states)


def _relu_scan_bwd(residuals, cotangents):
    w, inputs, lengths, h0, states = residuals
    m = length_mask(lengths, inputs.shape[1])[..., None]
    previous = jnp.concatenate([h0[:, None], states[:, :-1]], axis=1)
    fired = m & (w * previous + jnp.where(m, inputs, 0) > 0)
    # d h_t / d h_{t-1}: w where the ReLU fired, 0 where it did not, 1 on a padded (frozen) step.
    jacobians = jnp.where(m, jnp.where(fired, w, 0), 1).astype(states.dtype)
    next_jacobians = jnp.concatenate(
        [jacobians[:, 1:], jnp.zeros_like(jacobians[:, :1])], axis=1
    )
    # Adjoint: lam_t = g_t + J_{t+1} * lam_{t+1}, a linear recurrence run backwards in time.
    _, adjoints = jax.lax.associative_scan(
        _compose_affine_reversed, (next_jacobians, cotangents), axis=1, reverse=True
    )
    pre_activation_grads = jnp.where(fired, adjoints, 0)
    w_grad = jnp.sum(_mul(pre_activation_grads, previous), axis=(0, 1))
    h0_grad = jacobians[:, 0] * adjoints[:, 0]
    return w_grad.astype(w.dtype), pre_activation_grads, None, h0_grad


relu_scan.defvjp(_relu_scan_fwd, _relu_scan_bwd)
