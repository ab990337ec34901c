"""The stop rules of a training run, shared by ``fit`` (which stops at the first that holds)
and ``sweep`` (which records when each seed converged and trains on).

``stop_code`` is one pure, jittable function of what a step produced; ``within`` is the one
convergence predicate. Both run inside the compiled step, so the host only reads a code a step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.core import checks

__all__ = ["STOP_REASONS", "CONVERGED", "DIVERGED", "StopRules", "within", "stop_code", "reason"]

STOP_REASONS = {  # why a run stopped (FitResult.stop_reason), in words
    "weights": "every watched weight within tolerance of the target",
    "loss": "loss under tolerance",
    "dead": "dead ReLU: every gradient is 0",
    "diverged": "diverged: a non-finite loss, gradient or weight",
    "budget": "step budget spent, NOT converged",
    "interrupted": "interrupted",
    "running": "still running",
}
CONVERGED = ("weights", "loss")  # the stop reasons of a run that reached its goal
# stop_code's values: 0 is "no rule holds"; code i > 0 is _CODES[i - 1].
_CODES = ("diverged", "weights", "loss", "dead")
DIVERGED = 1  # stop_code of a step that made a non-finite loss, gradient or weight


class StopRules(NamedTuple):
    """When a run has reached its goal, or cannot.

    Attributes:
      max_steps: the step budget.
      target_weight: if set, the run converged once every watched weight is within
        ``weight_tol`` of it.
      weight_tol: a positive number, or a mapping from each watched weight's name to its own.
      loss_tol: if set, the run converged once its loss is at most this.
      dead_steps: the run is "dead" after this many steps in a row with every gradient exactly 0
        and a positive loss.
    """

    max_steps: int
    target_weight: float | None = None
    weight_tol: float | tuple[tuple[str, float], ...] = 1e-5
    loss_tol: float | None = None
    dead_steps: int = 25

    @classmethod
    def checked(cls, *, max_steps: Any, target_weight: Any = None, weight_tol: Any = 1e-5,
                loss_tol: Any = None, dead_steps: Any = 25) -> StopRules:
        """Builds the rules from public arguments, checking each (a mapping ``weight_tol`` is
        stored as sorted pairs, so the rules are hashable)."""
        if isinstance(weight_tol, Mapping):
            tolerances = tuple(sorted((str(name), _tolerance(f"weight_tol[{name!r}]", tol))
                                      for name, tol in weight_tol.items()))
        else:
            tolerances = _tolerance("weight_tol", weight_tol)
        return cls(max_steps=checks.integer("max_steps", max_steps),
                   target_weight=None if target_weight is None else checks.number(
                       "target_weight", target_weight, low=-np.inf, high=np.inf),
                   weight_tol=tolerances,
                   loss_tol=None if loss_tol is None else checks.number("loss_tol", loss_tol, low=-np.inf,
                                                                         high=np.inf),
                   dead_steps=checks.integer("dead_steps", dead_steps))


def _tolerance(name: str, value: Any) -> float:
    return checks.number(name, value, low=0, high=np.inf, open_low=True)


def within(watched: dict[str, jax.Array], target: float, tol: float | tuple | Mapping) -> jax.Array:
    """True when every element of every watched array is within ``tol`` of ``target`` (False
    for NaN); ``tol`` is one number, or one per name (a mapping or its sorted pairs). JAX arrays
    give a JAX boolean (jittable), NumPy ones a NumPy boolean in their own dtype.

    Decided exactly for any ``tol``, also one below the weights' dtype (``1e-50`` in float32:
    only ``target`` itself is within): ``|w - target| < tol`` is ``<=`` the largest value of
    that dtype below ``tol``, where a comparison with ``tol`` cast to the dtype would round.

    Example:
      >>> import jax.numpy as jnp
      >>> bool(within({"w": jnp.float32(1 + 2**-23)}, 1.0, 1e-9)), bool(within({"w": jnp.float32(1)}, 1.0, 1e-50))
      (False, True)
    """
    tolerances = dict(tol) if isinstance(tol, (tuple, Mapping)) else {}
    xp = jnp if any(isinstance(w, jax.Array) for w in watched.values()) else np  # NumPy keeps float64
    return xp.all(xp.stack([
        xp.all(xp.abs(w - target) <= _largest_below(tolerances.get(name, tol), xp.result_type(w)))
        for name, w in watched.items()]))


def _largest_below(bound: float, dtype: Any) -> np.ndarray:
    """The largest value of ``dtype`` less than ``bound`` (a Python float; 0 gives a negative
    number, so that nothing is within a tolerance of 0)."""
    rounded = np.asarray(bound, dtype)
    return rounded if float(rounded) < bound else np.nextafter(rounded, np.asarray(-np.inf, dtype))


def _largest_at_most(bound: float, dtype: Any) -> np.ndarray:
    """The largest value of ``dtype`` at most ``bound``: ``x <= bound`` decided exactly."""
    rounded = np.asarray(bound, dtype)
    return rounded if float(rounded) <= bound else np.nextafter(rounded, np.asarray(-np.inf, dtype))


def stop_code(rules: StopRules, *, diverged: jax.Array, watched: dict[str, jax.Array], loss: jax.Array,
              dead_run: jax.Array) -> jax.Array:
    """Which rule holds after a step, as an int32 (0: none; see ``reason``), checked in the order
    diverged, weights, loss, dead.

    Args:
      rules: the ``StopRules``.
      diverged: the step made a loss, gradient or weight that is not finite.
      watched: the weights the target applies to, after the step.
      loss: the loss after the step, on that step's batch.
      dead_run: how many steps in a row, this one included, had every gradient 0 and a loss > 0.
    """
    near = (jnp.zeros((), bool) if rules.target_weight is None
            else within(watched, rules.target_weight, rules.weight_tol))
    low_loss = (jnp.zeros((), bool) if rules.loss_tol is None
                else loss <= _largest_at_most(rules.loss_tol, jnp.result_type(loss)))
    holds = jnp.stack([diverged, near, low_loss, dead_run >= rules.dead_steps])
    return jnp.where(jnp.any(holds), jnp.argmax(holds) + 1, 0).astype(jnp.int32)


def reason(code: int) -> str | None:
    """The stop reason of a ``stop_code`` value (None for 0)."""
    return _CODES[code - 1] if code else None
