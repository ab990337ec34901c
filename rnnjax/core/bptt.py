"""Seed 003's hand-derived backpropagation through time for the scalar cell, done right.

For ``z_t = W_ih x_t + W_hh h_{t-1}``, ``h_t = relu(z_t)`` (``h_{-1} = 0``) and the many-to-many
loss ``L = 1/2 sum_{b, t < lengths[b]} (h_t - y_t)^2``, the adjoint ``lam_t = dL/dh_t`` obeys

    lam_t = (h_t - y_t) + W_hh [z_{t+1} > 0] lam_{t+1}      (lam past the length is 0)

and with ``delta_t = [z_t > 0] lam_t``:

    dL/dW_ih = sum_t delta_t x_t,        dL/dW_hh = sum_t delta_t h_{t-1}.

The seed notebook got this almost right but never reset its sums, so each iteration's gradient
carried every earlier one; its products also dropped terms at the ends of the ranges. Here
each call computes the gradient afresh, as two ``lax.scan``s: forward for ``z`` and ``h``,
backward for ``lam``. It is a reference for teaching and testing; training uses ``jax.grad``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rnnjax.core import checks
from rnnjax.core.masking import length_mask

__all__ = ["forward", "loss", "grad"]


def forward(w_ih, w_hh, xs, lengths=None) -> tuple[jax.Array, jax.Array]:
    """Runs the scalar cell; returns pre-activations ``z`` and states ``h``, both ``(batch, time)``.

    Past each length both are zero (the state is not advanced there).

    Args:
      w_ih, w_hh: scalar weights.
      xs: ``(batch, time)`` inputs.
      lengths: ``(batch,)`` integers; None means every sequence is full.
    """
    xs, lengths = _checked(xs, lengths, w_ih, w_hh)
    return _forward(w_ih, w_hh, xs, length_mask(lengths, xs.shape[1]))


def _forward(w_ih, w_hh, xs, mask):
    xs = jnp.where(mask, xs, 0)  # padding, NaN included, must reach neither values nor gradients

    def step(h, inputs):
        x, active = inputs
        z = jnp.where(active, w_ih * x + w_hh * h, 0)
        h_next = jax.nn.relu(z)
        return jnp.where(active, h_next, h), (z, h_next)

    _, (z, h) = jax.lax.scan(step, jnp.zeros(xs.shape[0], xs.dtype), (xs.T, mask.T))
    return z.T, h.T


def loss(w_ih, w_hh, xs, targets, lengths=None) -> jax.Array:
    """Returns ``1/2 sum (h_t - y_t)^2`` over the steps before each length.

    Example:
      >>> import jax.numpy as jnp
      >>> xs = jnp.array([[1.0, 0.0, 1.0]])
      >>> float(loss(1.0, 1.0, xs, jnp.cumsum(xs, axis=1)))
      0.0
    """
    xs, lengths = _checked(xs, lengths, w_ih, w_hh, targets)
    mask = length_mask(lengths, xs.shape[1])
    _, h = _forward(w_ih, w_hh, xs, mask)
    return 0.5 * jnp.sum(jnp.where(mask, h - targets, 0) ** 2)


def grad(w_ih, w_hh, xs, targets, lengths=None) -> tuple[jax.Array, jax.Array]:
    """Returns ``(dL/dW_ih, dL/dW_hh)`` of ``loss``, by the hand-derived adjoint recurrence.

    Args:
      w_ih, w_hh: scalar weights.
      xs: ``(batch, time)`` inputs.
      targets: ``(batch, time)`` wanted states.
      lengths: ``(batch,)`` integers; None means every sequence is full.

    Returns:
      The two scalar gradients.

    Example:
      >>> import jax.numpy as jnp
      >>> xs = jnp.array([[1.0, 1.0]])
      >>> [float(g) for g in grad(1.0, 1.0, xs, jnp.zeros((1, 2)))]  # h = (1, 2)
      [5.0, 2.0]
    """
    xs, lengths = _checked(xs, lengths, w_ih, w_hh, targets)
    mask = length_mask(lengths, xs.shape[1])
    xs = jnp.where(mask, xs, 0)  # as in forward: padding must not reach the sums below
    z, h = _forward(w_ih, w_hh, xs, mask)
    errors = jnp.where(mask, h - targets, 0)
    fired = mask & (z > 0)
    # Factor carrying lam_{t+1} back to step t: W_hh [z_{t+1} > 0], zero after the last step.
    carried = jnp.concatenate([jnp.where(fired[:, 1:], w_hh, 0), jnp.zeros_like(z[:, :1])], 1)

    def step(adjoint_next, inputs):
        error, factor = inputs
        adjoint = error + factor * adjoint_next
        return adjoint, adjoint

    _, adjoints = jax.lax.scan(
        step, jnp.zeros(xs.shape[0], z.dtype), (errors.T, carried.T), reverse=True
    )
    deltas = jnp.where(fired, adjoints.T, 0)
    previous = jnp.concatenate([jnp.zeros_like(h[:, :1]), h[:, :-1]], axis=1)
    return jnp.sum(deltas * xs), jnp.sum(deltas * previous)


def _checked(xs, lengths, w_ih=0.0, w_hh=0.0, targets=None):
    """``xs`` and ``lengths`` checked, and the scalar weights and the targets of ``xs``'s shape."""
    xs = checks.floating_array("xs", xs, shapes=("(batch, time)",))
    for name, w in (("w_ih", w_ih), ("w_hh", w_hh)):
        if isinstance(w, (str, bytes)) or w is None or jnp.ndim(w) != 0:
            raise checks.InputError(f"{name} must be a scalar weight; received {w!r:.60}.", name)
    if targets is not None and jnp.shape(targets) != xs.shape:
        raise checks.InputError(f"targets must have the shape of xs, {xs.shape}; received {jnp.shape(targets)}.",
                                "targets")
    return xs, checks.lengths(lengths, *xs.shape)
