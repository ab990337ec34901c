"""The bias-free ReLU recurrent cell."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rnnjax.core import checks

__all__ = ["ReLUCell"]

# float32 matrix products on a GPU default to TF32, which rounds inputs to 10 bits of mantissa.
PRECISION = jax.lax.Precision.HIGHEST


def _uniform(bound: float) -> nn.initializers.Initializer:
    """PyTorch's RNN initialiser: U(-bound, bound) with bound = 1/sqrt(features)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class ReLUCell(nn.RNNCellBase):
    """A recurrent cell ``h' = relu(x @ W_ih + h @ W_hh)`` with no bias anywhere.

    Both weights are drawn at init from U(-1/sqrt(features), 1/sqrt(features)), as PyTorch's
    ``nn.RNNCell`` does; nothing is ever set by hand.

    Attributes:
      features: size of the state ``h``.
      diagonal: if True, ``W_hh`` is a vector of shape ``(features,)`` and the recurrence is
        elementwise, ``h * W_hh``. Cells with ``features == 1`` or ``diagonal=True`` can be
        evaluated in parallel over time (``rnnjax.rnn(..., method="parallel")``).
      dtype: dtype of the computation and of the new state; None (the default) promotes the
        inputs, the state and the weights together, as flax's cells do.
      param_dtype: dtype of the weights and of the zero carry.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> cell = ReLUCell(features=3)
      >>> carry = cell.initialize_carry(jax.random.key(0), (2, 5))
      >>> variables = cell.init(jax.random.key(1), carry, jnp.ones((2, 5)))
      >>> new_carry, output = cell.apply(variables, carry, jnp.ones((2, 5)))
      >>> new_carry.shape
      (2, 3)
    """

    features: int
    diagonal: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        checks.integer("features", self.features)
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if (value is not None or name == "param_dtype") and not jnp.issubdtype(value, jnp.floating):
                raise checks.InputError(f"{name} must be a floating-point dtype; received {value}.", name)
        super().__post_init__()

    @nn.compact
    def __call__(self, carry: jax.Array, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Advances one step.

        Args:
          carry: the state ``h``, ``(batch, features)``.
          inputs: the input ``x``, ``(batch, in_features)``.

        Returns:
          ``(new_carry, new_carry)``: the new state twice, in the order ``lax.scan`` expects.
        """
        init = _uniform(1.0 / math.sqrt(self.features))
        w_ih = self.param("W_ih", init, (inputs.shape[-1], self.features), self.param_dtype)
        if self.diagonal:
            w_hh = self.param("W_hh", init, (self.features,), self.param_dtype)
        else:
            w_hh = self.param("W_hh", init, (self.features, self.features), self.param_dtype)
        inputs, carry, w_ih, w_hh = nn.dtypes.promote_dtype(inputs, carry, w_ih, w_hh, dtype=self.dtype)
        recurrent = carry * w_hh if self.diagonal else jnp.dot(carry, w_hh, precision=PRECISION)
        new_carry = nn.relu(jnp.dot(inputs, w_ih, precision=PRECISION) + recurrent)
        return new_carry, new_carry

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]) -> jax.Array:
        """Returns a zero state ``(*batch, features)`` for inputs of shape ``(*batch, in_features)``.

        Args:
          rng: unused (the carry is zeros); kept for flax's ``RNNCellBase`` interface.
          input_shape: shape of one step's input, ``(*batch, in_features)``.
        """
        del rng
        return jnp.zeros((*input_shape[:-1], self.features), self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1
