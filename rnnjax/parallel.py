"""Exact parallel-in-time evaluation of an elementwise ReLU recurrence.

One step of a scalar (or diagonal) ReLU cell is the map ``h -> max(0, w*h + u)``. Maps of the
form ``h -> clip(a*h + b, lo, hi)`` contain it and are closed under composition for any sign of
``w``, so ``jax.lax.associative_scan`` can compose all prefixes in O(log T) depth. A padded step
is the identity ``(1, 0, -inf, +inf)``. Nothing is approximated: the scan computes the same
function as the sequential loop, in another order of floating-point operations (a tree, which
also rounds less than the loop on long sequences).

The gradient is a custom VJP: the adjoint of the recurrence is linear,
``lambda_t = g_t + J_{t+1} lambda_{t+1}``, which a second associative scan solves in reverse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["relu_scan"]

ClampAffine = tuple[jax.Array, jax.Array, jax.Array, jax.Array]  # (a, b, lo, hi)


def _scale(factor: jax.Array, value: jax.Array) -> jax.Array:
    """``factor * value`` with ``0 * inf = 0``: a zero factor makes a constant map."""
    return jnp.where(factor == 0, 0, factor * value)


def _compose(first: ClampAffine, second: ClampAffine) -> ClampAffine:
    """Returns ``second ∘ first`` for maps ``h -> clip(a*h + b, lo, hi)``."""
    a1, b1, lo1, hi1 = first
    a2, b2, lo2, hi2 = second
    # a2 * clip(y, lo1, hi1) + b2 clips a2*y + b2 to the images of lo1 and hi1, swapped if a2 < 0.
    image_lo = _scale(a2, lo1) + b2
    image_hi = _scale(a2, hi1) + b2
    lo = jnp.where(a2 >= 0, image_lo, image_hi)
    hi = jnp.where(a2 >= 0, image_hi, image_lo)
    # clip(clip(z, lo, hi), lo2, hi2) == clip(z, clip(lo, lo2, hi2), clip(hi, lo2, hi2)).
    return a1 * a2, a2 * b1 + b2, jnp.clip(lo, lo2, hi2), jnp.clip(hi, lo2, hi2)


def _compose_affine_reversed(later, earlier):
    """Returns ``earlier ∘ later`` for affine maps ``lam -> A*lam + B`` (a reverse scan's order)."""
    a_later, b_later = later
    a_earlier, b_earlier = earlier
    return a_earlier * a_later, a_earlier * b_later + b_earlier


def _forward(w, inputs, mask, h0):
    m = mask[..., None]
    maps = tuple(
        jnp.broadcast_to(jnp.asarray(value, inputs.dtype), inputs.shape)
        for value in (jnp.where(m, w, 1), jnp.where(m, inputs, 0), jnp.where(m, 0, -jnp.inf), jnp.inf)
    )
    a, b, lo, hi = jax.lax.associative_scan(_compose, maps, axis=1)
    return jnp.clip(_scale(h0[:, None], a) + b, lo, hi)


@jax.custom_vjp
def relu_scan(w: jax.Array, inputs: jax.Array, mask: jax.Array, h0: jax.Array) -> jax.Array:
    """Runs ``h_t = max(0, w*h_{t-1} + inputs_t)`` where ``mask`` holds, ``h_t = h_{t-1}`` elsewhere.

    Args:
      w: the diagonal of the recurrent matrix, ``(features,)``.
      inputs: the projected inputs ``x_t @ W_ih``, ``(batch, time, features)``.
      mask: ``(batch, time)`` booleans; False steps leave the state unchanged, whatever their inputs.
      h0: the initial state, ``(batch, features)``.

    Returns:
      The state after every step, ``(batch, time, features)``, frozen where ``mask`` is False.

    Example:
      >>> import jax.numpy as jnp
      >>> inputs = jnp.array([[[3.0], [5.0], [7.0], [2.0]]])
      >>> relu_scan(jnp.ones(1), inputs, jnp.array([[True, True, True, False]]), jnp.zeros((1, 1)))[0, :, 0]
      Array([ 3.,  8., 15., 15.], dtype=float32)
    """
    return _forward(w, inputs, mask, h0)


def _relu_scan_fwd(w, inputs, mask, h0):
    states = _forward(w, inputs, mask, h0)
    return states, (w, inputs, mask, h0, states)


def _relu_scan_bwd(residuals, cotangents):
    w, inputs, mask, h0, states = residuals
    m = mask[..., None]
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
    w_grad = jnp.sum(pre_activation_grads * previous, axis=(0, 1))
    h0_grad = jacobians[:, 0] * adjoints[:, 0]
    return w_grad.astype(w.dtype), pre_activation_grads, None, h0_grad


relu_scan.defvjp(_relu_scan_fwd, _relu_scan_bwd)
