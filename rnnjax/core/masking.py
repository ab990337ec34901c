"""Which steps of a padded batch are real."""

import jax
import jax.numpy as jnp

__all__ = ["length_mask"]


def length_mask(lengths: jax.Array, time: int) -> jax.Array:
    """Returns ``(batch, time)`` booleans, True at the steps before each sequence's length.

    Example:
      >>> import jax.numpy as jnp
      >>> length_mask(jnp.array([2, 0]), 3)
      Array([[ True,  True, False],
             [False, False, False]], dtype=bool)
    """
    return jnp.arange(time)[None] < lengths[:, None]
