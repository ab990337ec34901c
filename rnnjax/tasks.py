"""The seed tasks: their networks, batches and recipes; training them, one seed or a sweep of
many; checking them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.data import Batch, count_batch, l1_batch
from rnnjax.models import L1Norm, L1NormLearned, RunningCount
from rnnjax.recipes import RECIPES, Recipe
from rnnjax.recurrence import Method
from rnnjax.sweep import SweepResult, sweep
from rnnjax.train import SEED_LIMIT, FitResult, fit, fit_start, weight_elements

__all__ = ["Task", "TASKS", "DEFAULT_RECIPE", "DEAD_SEED_TRIES", "SLOPE_TOL", "task_settings", "task_start",
           "train_task", "train_until_live", "sweep_task", "network_params", "watched", "converged", "l1_check",
           "count_check", "COUNT_MAX_LENGTH", "MAX_STEP_NUMBERS", "L1_EVAL_TOL"]


class Task(NamedTuple):
    """A seed task: its network, its batches, the numbers that must reach 1, and its dead inits."""

    model: Callable[..., nn.Module]
    batch: Callable[[jax.Array, int, int], Batch]  # (key, batch_size, length) -> Batch
    length: int = 10  # the longest length (l1) or every sequence's length (count)
    watch: Callable[[Any], dict] = weight_elements  # network weights -> {name: scalar}
    # An init that cannot be trained, seen before any step (watched numbers -> True), and why.
    # fit itself finds the dead ReLU of l1 and count: every gradient 0.
    dead_at_init: Callable[[dict], bool] | None = None
    dead_reason: str = "a dead ReLU (inputs are >= 0, so W_ih <= 0 keeps every gradient 0)"
    # tol -> each watched number's tolerance, where they differ (None: tol for every one)
    tolerances: Callable[[float], dict[str, float]] | None = None


TASKS = {
    "l1": Task(L1Norm, l1_batch),
    "count": Task(RunningCount, count_batch, length=5),
    # Its weights are not unique: it is judged by the function it computes (slopes and W_hh).
    # An init whose dense units face the same sign of x has a dead half: 452 of 474 such inits
    # of 1,000 never learn the other sign (benchmarks/SWEEPS.md), so it is drawn again.
    "l1-learned": Task(L1NormLearned, l1_batch, watch=L1NormLearned.function_weights,
                       dead_at_init=lambda w: w["slope_pos"] == 0 or w["slope_neg"] == 0,
                       dead_reason="both dense units face the same sign of x, so the inputs of the "
                                   "other sign reach no unit and give no gradient",
                       # A slope 1e-6 off scales the output by 1e-6 at any length; W_hh's error
                       # compounds over the steps, so only it is held to tol (1.0 exactly).
                       tolerances=lambda tol: {"slope_pos": max(tol, SLOPE_TOL), "slope_neg": max(tol, SLOPE_TOL),
                                               "cell/W_hh": tol}),
}

SLOPE_TOL = 1e-6

# The relative error of the L1 norm, against the float64 sum, beyond which `rnnjax eval` does
# not trust a result: the 1e-6 that "auto" keeps at any length up to 1e8, plus for l1-learned
# the SLOPE_TOL its converged slopes may be off by. A count is trusted while it rounds right.
L1_EVAL_TOL = {"l1": 1e-6, "l1-learned": 1e-6 + SLOPE_TOL}

# The most numbers one training step's inputs may hold (train: batch size x length; sweep: seeds
# x batch size x length), refused before anything is compiled: beyond it the arrays do not fit a
# machine's memory, and compiling for them ran for minutes before failing.
MAX_STEP_NUMBERS = 10**8

# The recipe `train`, `demo` and `sweep` use unless told otherwise: it converged from all 1,000
# random inits of each task's weights that benchmarks/SWEEPS.md measured (rnnjax.recipes).
DEFAULT_RECIPE = "squared"

# A dead init (W_ih <= 0; only the "notebook" recipe has them) is a property of the draw: runs
# that meet one draw again from the next seed, at most this many times in a row. Of seeds
# 0-199, 102 are dead and at most 6 come in a row; 20 in a row has odds of about one in a million.
DEAD_SEED_TRIES = 20


def task_settings(
    task: str,
    *,
    recipe: str | None = None,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    length: int | None = None,
    tol: float = 1e-9,
    skip_nonfinite: int = 0,
    dead_steps: int = 25,
) -> dict[str, Any]:
    """Returns every setting a run of ``task`` trains with: those given, the recipe's and the
    task's for the rest.

    The default ``tol`` of 1e-9 is below float32's spacing at 1, so it asks for 1.0 itself:
    a 10,000-step L1 norm is 3e-4 off when ``W_hh`` is one ulp away from 1.

    Example:
      >>> settings = task_settings("count", lr=0.05)
      >>> settings["recipe"], settings["length"], settings["steps"]
      ('squared', 5, 3000)
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}; received {task!r}")
    spec, chosen = TASKS[task], _recipe(recipe)
    return {"recipe": chosen.name, "steps": steps or chosen.steps, "lr": float(lr or chosen.lr), "b2": chosen.b2,
            "batch_size": batch_size or chosen.batch_size, "length": length or spec.length,
            "tol": float(tol), "skip_nonfinite": skip_nonfinite, "dead_steps": dead_steps}


def _recipe(recipe: str | Recipe | None) -> Recipe:
    if recipe is None or isinstance(recipe, str):
        if (recipe or DEFAULT_RECIPE) not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)}; received {recipe!r}")
        return RECIPES[recipe or DEFAULT_RECIPE]
    return recipe


class _Parts(NamedTuple):
    network: Any  # a Reparametrized model: what is trained, and the weights it computes with
    optimizer: Any
    draw: Callable[[jax.Array], Batch]
    watch: Callable[[Any], dict]  # trained parameters -> the numbers that must reach 1
    fresh_batches: bool


@functools.lru_cache(maxsize=16)
def _parts(task: str, recipe: Recipe, lr: float, batch_size: int, length: int) -> _Parts:
    """The pieces a task is trained with: the same objects for the same settings, so that every
    seed's fit reuses one compiled step."""
    spec = TASKS[task]
    network = recipe.network(spec.model())
    return _Parts(network, recipe.optimizer(lr), lambda key: spec.batch(key, batch_size, length),
                  lambda params: spec.watch(network.transform(params)), recipe.fresh_batches)


def _fit_parts(task: str, settings: dict) -> _Parts:
    return _parts(task, _recipe(settings["recipe"]), settings["lr"], settings["batch_size"], settings["length"])


def network_params(settings: dict, params: Any) -> Any:
    """Returns the weights the network computes with, from the parameters a run of
    ``settings``'s recipe trained (for "squared", ``W_ih = v*v``)."""
    return _recipe(settings["recipe"]).transform(params)


def watched(task: str, params: Any) -> dict[str, float]:
    """Returns the numbers of ``task`` that must reach 1, from the network's weights."""
    return {k: float(v) for k, v in TASKS[task].watch(params).items()}


def converged(task: str, settings: dict, params: Any) -> bool:
    """True when the network weights ``params`` have every number ``task`` watches within its
    tolerance of 1 (``settings["tol"]``, or ``Task.tolerances`` of it)."""
    tolerance = _tolerances(task, settings["tol"])
    return all(abs(value - 1.0) < (tolerance[name] if isinstance(tolerance, dict) else tolerance)
               for name, value in watched(task, params).items())


def _tolerances(task: str, tol: float) -> float | dict[str, float]:
    spec = TASKS[task]
    return tol if spec.tolerances is None else spec.tolerances(tol)


def task_start(task: str, settings: dict, *, seed: int) -> FitResult:
    """Returns where a run of ``task`` with ``settings`` starts from ``seed`` (``fit_start``):
    the template to restore its checkpoints into."""
    parts = _fit_parts(task, settings)
    return fit_start(parts.network, parts.optimizer, parts.draw, seed=seed, skip_nonfinite=settings["skip_nonfinite"],
                     watch=parts.watch, fresh_batches=parts.fresh_batches, devices=1)


def train_task(task: str, *, seed: int, settings: dict | None = None, progress: bool = False,
               **fit_options) -> FitResult:
    """Trains a task's network by its recipe until the numbers it watches are within
    ``settings["tol"]`` of 1 (``task_settings``; None takes the defaults; ``Task.tolerances``
    may loosen it for some of them).

    Args:
      task: a key of ``TASKS``.
      seed: fixes the init and every batch.
      settings: from ``task_settings``.
      progress: show a progress bar.
      **fit_options: ``start``, ``checkpoint_every``, ``on_checkpoint``, ``interrupt``,
        ``devices`` (see ``fit``).

    Returns:
      ``fit``'s ``FitResult``; its parameters are the trained ones (``network_params`` gives
      the network's weights).
    """
    settings = settings or task_settings(task)
    parts = _fit_parts(task, settings)
    return fit(parts.network, parts.optimizer, parts.draw, seed=seed, max_steps=settings["steps"], target_weight=1.0,
               weight_tol=_tolerances(task, settings["tol"]), skip_nonfinite=settings["skip_nonfinite"],
               dead_steps=settings["dead_steps"], progress=progress, watch=parts.watch,
               fresh_batches=parts.fresh_batches, **fit_options)


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
    """Trains from ``first_seed``; on a dead init (a dead ReLU, or ``Task.dead_at_init``, seen
    before any step) calls ``on_dead(seed, result)`` and draws again from the next seed, at most
    ``tries`` seeds in all.

    Args:
      task, settings: see ``train_task``.
      first_seed: the first seed to try.
      tries: how many seeds to try.
      start: continues the first seed's run (see ``fit``).
      on_dead: called with ``(seed, result)`` for each dead seed but the last try.
      on_checkpoint: called with ``(seed, snapshot)`` (see ``fit``).
      **train_options: ``progress``, ``checkpoint_every``, ``interrupt``, ``devices``.

    Returns:
      ``(seed, result)`` of the last seed tried: its stop_reason is "dead" only when every try was
      (or the seeds ran out: none is drawn from ``SEED_LIMIT`` on, so that every seed a run
      records can be given again).
    """
    if tries < 1:
        raise ValueError(f"tries must be positive; received {tries}")
    if not 0 <= first_seed < SEED_LIMIT:
        raise ValueError(f"first_seed must be in [0, 2**31); received {first_seed}")
    settings = settings or task_settings(task)
    last = min(first_seed + tries, SEED_LIMIT) - 1
    for seed in range(first_seed, last + 1):
        checkpoint = None if on_checkpoint is None else functools.partial(on_checkpoint, seed)
        result = _dead_at_init(task, settings, seed) if start is None else None
        if result is None:
            result = train_task(task, seed=seed, settings=settings, start=start, on_checkpoint=checkpoint,
                                **train_options)
        start = None
        if result.stop_reason != "dead" or seed == last:
            break
        if on_dead is not None:
            on_dead(seed, result)
    return seed, result


def _dead_at_init(task: str, settings: dict, seed: int) -> FitResult | None:
    """The start of ``seed``, stopped as "dead" at step 0, when ``task`` cannot train it."""
    test = TASKS[task].dead_at_init
    if test is None:
        return None
    start = task_start(task, settings, seed=seed)
    dead = test(watched(task, network_params(settings, start.state.params)))
    return start._replace(stop_reason="dead") if dead else None


def sweep_task(
    task: str,
    *,
    seeds: int,
    recipe: str | Recipe | None = None,
    steps: int | None = None,
    lr: float | None = None,
    tol: float = 1e-3,
    first_seed: int = 0,
    data_seed: int | None = None,
    devices: int | None = None,
    progress: bool = False,
) -> tuple[dict, SweepResult]:
    """Trains ``task`` from ``seeds`` seeds at once by its recipe (``rnnjax.sweep``); seed ``s``
    is ``train_task``'s run from ``s`` (without redrawing dead seeds), trained to the end.

    Args:
      task: a key of ``TASKS``.
      seeds: how many seeds, from ``first_seed`` on.
      recipe: a name in ``RECIPES`` (None: ``DEFAULT_RECIPE``) or a ``Recipe``.
      steps, lr: the budget and the peak learning rate (None: the recipe's).
      tol: a seed converged once every watched number is within ``tol`` of 1.
      first_seed, data_seed, devices, progress: see ``sweep``.

    Returns:
      ``(settings, result)``: every setting used (JSON-able), and the ``SweepResult``.

    Example:
      >>> settings, result = sweep_task("count", seeds=4, steps=200)
      >>> settings["recipe"], result.outcome.tolist()
      ('squared', ['converged', 'converged', 'converged', 'converged'])
    """
    chosen = _recipe(recipe)
    settings = {**task_settings(task, steps=steps, lr=lr, tol=tol), "recipe": chosen.name, "b2": chosen.b2,
                "seeds": seeds, "first_seed": first_seed, "data_seed": data_seed}
    for name in ("skip_nonfinite", "dead_steps"):  # fit's stop rules: a sweep trains to the end
        del settings[name]
    parts = _parts(task, chosen, settings["lr"], settings["batch_size"], settings["length"])
    result = sweep(parts.network, parts.optimizer, parts.draw, seeds=seeds, steps=settings["steps"],
                   first_seed=first_seed, fresh_batches=parts.fresh_batches, data_seed=data_seed,
                   weights=parts.watch, tol=tol, devices=devices, progress=progress)
    return {**settings, "devices": result.devices}, result


_FLOAT32_MAX = float(np.finfo(np.float32).max)


@functools.lru_cache(maxsize=8)
def _apply(model: nn.Module):
    return jax.jit(model.apply)


def l1_check(params: Any, sequence: np.ndarray, method: Method = "auto", *,
             task: str = "l1") -> tuple[float, float, float]:
    """Returns ``(predicted, exact, relative_error)`` of the L1 norm of one sequence by the
    network of ``task`` ("l1" or "l1-learned") with weights ``params``; ``exact`` is the float64
    sum of ``|x|``. Raises ``ValueError`` when that is beyond float32's range."""
    exact = float(np.abs(np.asarray(sequence, np.float64)).sum())
    with np.errstate(over="ignore"):
        representable = np.isfinite(np.float32(exact))  # rounds to a finite float32 (3.4028235e38 does)
    if not representable:
        raise ValueError(f"the L1 norm of this sequence, {exact:.9g}, is beyond float32's range "
                         f"(largest {_FLOAT32_MAX:.9g}), where the network computes")
    model = TASKS[task].model(method=method)
    predicted = float(_apply(model)(params, jnp.asarray(sequence, jnp.float32)[None])[0])
    return predicted, exact, abs(predicted - exact) / max(exact, np.finfo(np.float64).tiny)


COUNT_MAX_LENGTH = 2**24  # float32 counts are exact up to here


def count_check(params: Any, bits: np.ndarray, method: Method = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(predicted, exact)`` running counts, each ``(batch, time)``, of ``bits``
    ``(batch, time)`` of 0s and 1s, at most ``2**24`` long (float32 counts are exact up to there)."""
    bits = np.asarray(bits, np.float32)
    if not np.isin(bits, (0.0, 1.0)).all():
        raise ValueError(f"bits must be 0 or 1; received values from {bits.min():g} to {bits.max():g}")
    if bits.ndim != 2 or bits.shape[1] > COUNT_MAX_LENGTH:
        raise ValueError(f"bits must be (batch, time) with time at most 2**24 = 16,777,216 (float32 "
                         f"counts are exact up to there); received shape {bits.shape}")
    predicted = _apply(RunningCount(method=method))(params, jnp.asarray(bits))
    return np.asarray(predicted), np.cumsum(bits, axis=1)
