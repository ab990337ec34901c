"""Which steps of a padded batch are real."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["length_mask", "check_lengths"]


def length_mask(lengths: jax.Array, time: int) -> jax.Array:
    """Returns ``(batch, time)`` booleans, True at the steps before each sequence's length.

    Example:
      >>> import jax.numpy as jnp
      >>> length_mask(jnp.array([2, 0]), 3)
      Array([[ True,  True, False],
             [False, False, False]], dtype=bool)
    """
    return jnp.arange(time)[None] < lengths[:, None]


def check_lengths(lengths: Any, batch: int, time: int, sequences: str = "xs") -> jax.Array:
    """Returns ``lengths`` as int32 in ``[0, time]`` after checking their shape and dtype.

    Concrete lengths outside ``[0, time]`` are refused; traced ones (under ``jit``, where the
    values are unknown) are clipped in their own type: above ``time`` acts as ``time``, below 0
    as 0, and no uint32 or 64-bit value wraps around int32.

    Args:
      lengths: ``(batch,)`` integers.
      batch, time: the sequences' first two axes.
      sequences: the sequences' name, for the messages.

    Raises:
      TypeError: lengths not integers.
      ValueError: another shape, or concrete values outside ``[0, time]``.

    Example:
      >>> import jax.numpy as jnp
      >>> check_lengths(jnp.array([3, 0], jnp.uint8), 2, 5)
      Array([3, 0], dtype=int32)
    """
    if not isinstance(lengths, jax.core.Tracer):  # under jit the values are unknown
        lengths = np.asarray(lengths)  # keeps int64 and uint types, so the range check sees them
        if lengths.dtype == object and all(type(n) is int for n in lengths.flat):  # beyond 64 bits
            lengths = np.asarray(lengths, np.float64)  # its range is what is wrong, not its type
            raise ValueError(f"lengths must lie in [0, {time}] (the time axis of {sequences}); "
                             f"received values from {lengths.min():.4g} to {lengths.max():.4g}.")
    if lengths.shape != (batch,):
        raise ValueError(
            f"lengths must have shape (batch,) = ({batch},) to match {sequences}; "
            f"received shape {lengths.shape}."
        )
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(
            f"lengths must be integers; received dtype {lengths.dtype}. "
            "Convert them with lengths.astype(jnp.int32)."
        )
    if isinstance(lengths, np.ndarray):
        if lengths.min() < 0 or lengths.max() > time:
            raise ValueError(
                f"lengths must lie in [0, {time}] (the time axis of {sequences}); "
                f"received values from {lengths.min()} to {lengths.max()}."
            )
    elif jnp.iinfo(lengths.dtype).bits > 32 or jnp.iinfo(lengths.dtype).max > jnp.iinfo(jnp.int32).max:
        # Traced: clip in the lengths' own type, so that uint32 and 64-bit values cannot wrap
        # around int32 (2**32 + 3 to 3, -2**32 + 3 to 3), as documented: above `time` acts as
        # `time`, below 0 as 0.
        lengths = jnp.clip(lengths, 0, time)
    return jnp.clip(jnp.asarray(lengths).astype(jnp.int32), 0, time)
