"""Batches for the two seed tasks, drawn from a JAX key (jit them with static sizes)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from rnnjax.core import checks, compensated
from rnnjax.core.masking import length_mask

__all__ = ["Batch", "l1_batch", "count_batch"]

_MOST = 2**31 - 1  # numbers in one batch: JAX indexes an array with 32-bit integers


class Batch(NamedTuple):
    """A padded batch of scalar sequences.

    Attributes:
      xs: ``(batch, time)`` float32 inputs, zero past each length.
      lengths: ``(batch,)`` int32 lengths.
      targets: ``(batch,)`` for sequence-level tasks, ``(batch, time)`` for per-step tasks.
    """

    xs: jax.Array
    lengths: jax.Array
    targets: jax.Array


def l1_batch(key: jax.Array, batch_size: int, max_length: int) -> Batch:
    """Draws standard-normal sequences of random lengths and their L1 norms.

    Args:
      key: a JAX random key.
      batch_size: number of sequences.
      max_length: the longest length; lengths are uniform in ``[1, max_length]``.

    Returns:
      A ``Batch``: ``xs`` ``(batch_size, max_length)`` zero-padded, ``lengths``
      ``(batch_size,)``, ``targets`` ``(batch_size,)``, the sum of ``|x|`` over each sequence.

    Example:
      >>> import jax
      >>> batch = l1_batch(jax.random.key(0), batch_size=8, max_length=10)
      >>> batch.xs.shape, batch.lengths.shape, batch.targets.shape
      ((8, 10), (8,), (8,))
    """
    key = checks.key("key", key)
    batch_size = checks.integer("batch_size", batch_size)
    max_length = checks.integer("max_length", max_length)
    checks.integer("batch_size x max_length", batch_size * max_length, high=_MOST)
    length_key, value_key = jax.random.split(key)
    lengths = jax.random.randint(length_key, (batch_size,), 1, max_length + 1, jnp.int32)
    # The numbers of a (batch_size, max_length) draw (threefry's counters are the flat index),
    # drawn and masked as one flat run, which XLA vectorises (it does not across a minor axis of
    # max_length under vmap: a 1,000-seed sweep spends most of its time drawing).
    values = jax.random.normal(value_key, (batch_size * max_length,), jnp.float32)
    xs = jnp.where(length_mask(lengths, max_length).reshape(-1), values, 0.0)
    xs = xs.reshape(batch_size, max_length)
    return Batch(xs, lengths, _sum_over_time(jnp.abs(xs)))


def _sum_over_time(values: jax.Array) -> jax.Array:
    """Sums ``(batch, time)`` non-negative values over time, rounded once, as ``L1Norm`` with
    both weights 1 computes it (``precision="compensated"``, its default: the same loop), so
    that the network reproduces these targets bit for bit.

    A plain float32 sum would not do: its order is XLA's choice (it moves a target by an ulp
    between ``fit``, a sweep and a sharded batch), and it rounds at every step, so the
    compensated network at the exact weights would miss it by an ulp and train away from them.
    """
    inputs = values[..., None]
    final_state, _ = compensated.loop(jnp.ones((1,), values.dtype), inputs, jnp.zeros_like(inputs),
                                      jnp.full(values.shape[:1], values.shape[1], jnp.int32),
                                      jnp.zeros((values.shape[0], 1), values.dtype))
    return final_state[:, 0]


def count_batch(key: jax.Array, batch_size: int, length: int) -> Batch:
    """Draws binary sequences (each bit 1 with probability 1/2) and their running counts.

    Args:
      key: a JAX random key.
      batch_size: number of sequences.
      length: the length of every sequence.

    Returns:
      A ``Batch``: ``xs`` ``(batch_size, length)`` of 0.0 and 1.0, ``lengths`` all ``length``,
      ``targets`` ``(batch_size, length)``, the number of ones up to and including each step.

    Example:
      >>> import jax
      >>> batch = count_batch(jax.random.key(0), batch_size=4, length=5)
      >>> bool((batch.targets[:, -1] == batch.xs.sum(axis=1)).all())
      True
    """
    key = checks.key("key", key)
    batch_size = checks.integer("batch_size", batch_size)
    length = checks.integer("length", length)
    checks.integer("batch_size x length", batch_size * length, high=_MOST)
    xs = jax.random.bernoulli(key, 0.5, (batch_size, length)).astype(jnp.float32)
    lengths = jnp.full((batch_size,), length, jnp.int32)
    return Batch(xs, lengths, jnp.cumsum(xs, axis=1))
