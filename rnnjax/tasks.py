"""The two seed tasks: their networks, batches and settings; training them; checking them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rnnjax.data import Batch, count_batch, l1_batch
from rnnjax.models import L1Norm, RunningCount
from rnnjax.recurrence import Method
from rnnjax.train import FitResult, fit, fit_start

__all__ = ["Task", "TASKS", "ADAM_B2", "DEAD_SEED_TRIES", "task_settings", "task_start", "train_task",
           "train_until_live", "l1_check", "count_check"]


class Task(NamedTuple):
    """A seed task: its network, its batches, and the settings it trains with by default."""

    model: Callable[..., nn.Module]
    batch: Callable[[jax.Array, int, int], Batch]  # (key, batch_size, length) -> Batch
    lr: float = 0.1
    batch_size: int = 8
    length: int = 10  # the longest length (l1) or every sequence's length (count)
    steps: int = 5000


TASKS = {
    "l1": Task(L1Norm, l1_batch),
    "count": Task(RunningCount, count_batch, length=5),
}

# Adam's second-moment decay. With the default 0.999 the estimate shrinks with the gradients
# near the optimum until the steps overshoot; 0.9999 took every live seed of 40 to exactly 1.0
# (benchmarks/NOTES.md, "Training").
ADAM_B2 = 0.9999

# A dead init (W_ih <= 0) is a property of the draw: runs that meet one draw again from the
# next seed, at most this many times in a row. Of seeds 0-199, 102 are dead and at most 6 come
# in a row; 20 in a row has odds of about one in a million.
DEAD_SEED_TRIES = 20


def task_settings(
    task: str,
    *,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    length: int | None = None,
    tol: float = 1e-9,
    skip_nonfinite: int = 0,
    dead_steps: int = 25,
) -> dict[str, Any]:
    """Returns every setting a run of ``task`` trains with: those given, the task's for the rest.

    The default ``tol`` of 1e-9 is below float32's spacing at 1, so it asks for 1.0 itself:
    a 10,000-step L1 norm is 3e-4 off when ``W_hh`` is one ulp away from 1.

    Example:
      >>> task_settings("count", lr=0.05)["length"]
      5
    """
    spec = TASKS[task]
    return {"steps": steps or spec.steps, "lr": lr or spec.lr, "b2": ADAM_B2,
            "batch_size": batch_size or spec.batch_size, "length": length or spec.length,
            "tol": tol, "skip_nonfinite": skip_nonfinite, "dead_steps": dead_steps}


@functools.lru_cache(maxsize=16)
def _parts(task: str, lr: float, b2: float, batch_size: int, length: int):
    """The model, optimizer and batch function of a task: the same objects for the same
    settings, so that every seed's fit reuses one compiled step."""
    spec = TASKS[task]
    return spec.model(), optax.adam(lr, b2=b2), lambda key: spec.batch(key, batch_size, length)


def _fit_parts(task: str, settings: dict):
    return _parts(task, settings["lr"], settings["b2"], settings["batch_size"], settings["length"])


def task_start(task: str, settings: dict, *, seed: int) -> FitResult:
    """Returns where a run of ``task`` with ``settings`` starts from ``seed`` (``fit_start``):
    the template to restore its checkpoints into."""
    return fit_start(*_fit_parts(task, settings), seed=seed, skip_nonfinite=settings["skip_nonfinite"])


def train_task(task: str, *, seed: int, settings: dict | None = None, progress: bool = False,
               **fit_options) -> FitResult:
    """Trains a task's network with Adam on a fresh batch each step until both weights are
    within ``settings["tol"]`` of 1 (``task_settings``; None takes the defaults).

    Args:
      task: a key of ``TASKS``.
      seed: fixes the init and every batch.
      settings: from ``task_settings``.
      progress: show a progress bar.
      **fit_options: ``start``, ``checkpoint_every``, ``on_checkpoint``, ``interrupt`` (see ``fit``).

    Returns:
      ``fit``'s ``FitResult``.
    """
    settings = settings or task_settings(task)
    return fit(*_fit_parts(task, settings), seed=seed, max_steps=settings["steps"], target_weight=1.0,
               weight_tol=settings["tol"], skip_nonfinite=settings["skip_nonfinite"],
               dead_steps=settings["dead_steps"], progress=progress, **fit_options)


def train_until_live(
    task: str,
    *,
    first_seed: int,
    settings: dict | None = None,
    tries: int = DEAD_SEED_TRIES,
    start: FitResult | None = None,
    on_dead: Callable[[int, FitResult], None] | None = None,
    on_checkpoint: Callable[[int, FitResult], None] | None = None,
    **train_options,
) -> tuple[int, FitResult]:
    """Trains from ``first_seed``; on a dead ReLU calls ``on_dead(seed, result)`` and draws again
    from the next seed, at most ``tries`` seeds in all.

    Args:
      task, settings: see ``train_task``.
      first_seed: the first seed to try.
      tries: how many seeds to try.
      start: continues the first seed's run (see ``fit``).
      on_dead: called with ``(seed, result)`` for each dead seed but the last try.
      on_checkpoint: called with ``(seed, snapshot)`` (see ``fit``).
      **train_options: ``progress``, ``checkpoint_every``, ``interrupt``.

    Returns:
      ``(seed, result)`` of the last seed tried: its stop_reason is "dead" only when every try was.
    """
    if tries < 1:
        raise ValueError(f"tries must be positive; received {tries}")
    for seed in range(first_seed, first_seed + tries):
        checkpoint = None if on_checkpoint is None else functools.partial(on_checkpoint, seed)
        result = train_task(task, seed=seed, settings=settings, start=start, on_checkpoint=checkpoint,
                            **train_options)
        start = None
        if result.stop_reason != "dead" or seed == first_seed + tries - 1:
            break
        if on_dead is not None:
            on_dead(seed, result)
    return seed, result


_FLOAT32_MAX = float(np.finfo(np.float32).max)


@functools.lru_cache(maxsize=8)
def _apply(model: nn.Module):
    return jax.jit(model.apply)


def l1_check(params: Any, sequence: np.ndarray, method: Method = "auto") -> tuple[float, float, float]:
    """Returns ``(predicted, exact, relative_error)`` of the L1 norm of one sequence; ``exact``
    is the float64 sum of ``|x|``. Raises ``ValueError`` when that is beyond float32's range."""
    exact = float(np.abs(np.asarray(sequence, np.float64)).sum())
    if not exact <= _FLOAT32_MAX:
        raise ValueError(f"the L1 norm of this sequence, {exact:.4g}, is beyond float32's range "
                         f"({_FLOAT32_MAX:.4g}), where the network computes")
    predicted = float(_apply(L1Norm(method=method))(params, jnp.asarray(sequence, jnp.float32)[None])[0])
    return predicted, exact, abs(predicted - exact) / max(exact, np.finfo(np.float64).tiny)


def count_check(params: Any, bits: np.ndarray, method: Method = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(predicted, exact)`` running counts, each ``(batch, time)``, of ``bits``
    ``(batch, time)`` of 0s and 1s, at most ``2**24`` long (float32 counts are exact up to there)."""
    bits = np.asarray(bits, np.float32)
    if not np.isin(bits, (0.0, 1.0)).all():
        raise ValueError(f"bits must be 0 or 1; received values from {bits.min():g} to {bits.max():g}")
    if bits.ndim != 2 or bits.shape[1] > 2**24:
        raise ValueError(f"bits must be (batch, time) with time at most 2**24 = 16,777,216 (float32 "
                         f"counts are exact up to there); received shape {bits.shape}")
    predicted = _apply(RunningCount(method=method))(params, jnp.asarray(bits))
    return np.asarray(predicted), np.cumsum(bits, axis=1)
