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

from rnnjax.app import settings as table
from rnnjax.core import checks
from rnnjax.core.checks import SEED_LIMIT, InputError
from rnnjax.core.compensated import Precision
from rnnjax.core.recurrence import Method
from rnnjax.training.data import Batch, count_batch, l1_batch
from rnnjax.training.fit import FitResult, LoopOptions, StepOptions, fit, fit_start, weight_elements
from rnnjax.training.models import L1Norm, L1NormLearned, RunningCount
from rnnjax.training.recipes import RECIPES, Recipe, network_watch
from rnnjax.training.stopping import within
from rnnjax.training.sweep import SweepResult, sweep

__all__ = ["Task", "TASKS", "DEFAULT_RECIPE", "DEAD_SEED_TRIES", "SLOPE_TOL", "L1_EVAL_TOL", "task_settings",
           "Parts", "parts", "task_start", "train_task", "train_until_live", "sweep_task", "network_params",
           "watched", "converged", "tolerances", "l1_check", "count_check"]


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
# not trust a result: the 2 ulps (2 * float32's eps) that compensated evaluation keeps at any
# length up to 1e8 (docs/accuracy.md), plus for l1-learned the SLOPE_TOL its converged slopes
# may be off by. A count is trusted while it rounds right.
L1_EVAL_TOL = {"l1": 2.4e-7, "l1-learned": 2.4e-7 + SLOPE_TOL}

# The recipe `train`, `demo` and `sweep` use unless told otherwise: it converged from all 1,000
# random inits of each task's weights that benchmarks/SWEEPS.md measured (rnnjax.training.recipes).
DEFAULT_RECIPE = "squared"

# A dead init (W_ih <= 0; only the "notebook" recipe has them) is a property of the draw: runs
# that meet one draw again from the next seed, at most this many times in a row. Of seeds
# 0-199, 102 are dead and at most 6 come in a row; 20 in a row has odds of about one in a million.
DEAD_SEED_TRIES = 20


def task_settings(task: str, **given: Any) -> dict[str, Any]:
    """Returns every setting a run of ``task`` trains with (``rnnjax.app.settings.RECORDED``
    but "checkpoint_every"): those ``given`` (None: not given), each checked by its row of the
    settings table, and the recipe's, the task's or the table's default for the rest.

    The default ``tol`` of 1e-9 is below float32's spacing at 1, so it asks for 1.0 itself:
    a 10,000-step L1 norm is 3e-4 off when ``W_hh`` is one ulp away from 1.

    Example:
      >>> settings = task_settings("count", lr=0.05)
      >>> settings["recipe"], settings["length"], settings["steps"], settings["tol"]
      ('squared', 5, 3000, 1e-09)
    """
    table.check("task", task)
    names = [name for name in table.RECORDED if name not in ("b2", "checkpoint_every")]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise InputError(f"task_settings takes {names}; received {unknown}.", unknown[0])
    given = {name: table.check(name, value) for name, value in given.items() if value is not None}
    recipe = RECIPES[given.get("recipe", DEFAULT_RECIPE)]
    defaults = {"recipe": recipe.name, "steps": recipe.steps, "lr": recipe.lr, "batch_size": recipe.batch_size,
                "length": TASKS[task].length, **{name: _table_default(name) for name in
                                                 ("tol", "skip_nonfinite", "dead_steps")}}
    settings = {name: given.get(name, defaults[name]) for name in names}
    return {**settings, "lr": float(settings["lr"]), "tol": float(settings["tol"]), "b2": recipe.b2}


def _table_default(name: str) -> Any:
    default = table.SETTINGS[name].default
    return default["train"] if isinstance(default, dict) else default


class _Draw(NamedTuple):
    """``key -> Batch`` of a task, hashable by value (a fit's compiled program is cached on it)."""

    batch: Callable[[jax.Array, int, int], Batch]
    batch_size: int
    length: int

    def __call__(self, key: jax.Array) -> Batch:
        return self.batch(key, self.batch_size, self.length)


class Parts(NamedTuple):
    """What a task is trained with, for given settings. Equal settings give equal parts, so that
    every seed's fit reuses one compiled program."""

    network: Any  # a Reparametrized model: what is trained, and the weights it computes with
    optimizer: Any
    draw: _Draw
    watch: Callable[[Any], dict]  # trained parameters -> the numbers that must reach 1
    fresh_batches: bool


def parts(task: str, settings: dict) -> Parts:
    """The parts ``task`` trains with under ``settings`` (``task_settings``)."""
    spec, recipe = TASKS[task], RECIPES[settings["recipe"]]
    network = recipe.network(spec.model())
    return Parts(network, recipe.optimizer(settings["lr"]), _Draw(spec.batch, settings["batch_size"],
                                                                   settings["length"]),
                 network_watch(spec.watch, recipe.transform), recipe.fresh_batches)


def _step_options(task: str, settings: dict, devices: int | None) -> StepOptions:
    chosen = parts(task, settings)
    return StepOptions(watch=chosen.watch, fresh_batches=chosen.fresh_batches,
                       skip_nonfinite=settings["skip_nonfinite"], devices=devices)


def network_params(settings: dict, params: Any) -> Any:
    """Returns the weights the network computes with, from the parameters a run of
    ``settings``'s recipe trained (for "squared", ``W_ih = v*v``)."""
    return RECIPES[settings["recipe"]].transform(params)


def watched(task: str, params: Any) -> dict[str, float]:
    """Returns the numbers of ``task`` that must reach 1, from the network's weights."""
    return {k: float(v) for k, v in TASKS[task].watch(params).items()}


def converged(task: str, settings: dict, params: Any) -> bool:
    """True when the network weights ``params`` have every number ``task`` watches within its
    tolerance of 1 (``settings["tol"]``, or ``Task.tolerances`` of it)."""
    return bool(within(TASKS[task].watch(params), 1.0, tolerances(task, settings["tol"])))


def tolerances(task: str, tol: float) -> float | dict[str, float]:
    """Returns the tolerance of each number ``task`` watches, from the run's ``tol``: ``tol``
    itself, or ``Task.tolerances`` of it (one per name)."""
    spec = TASKS[task]
    return tol if spec.tolerances is None else spec.tolerances(tol)


def task_start(task: str, settings: dict, *, seed: int, abstract: bool = False) -> FitResult:
    """Returns where a run of ``task`` with ``settings`` starts from ``seed`` (``fit_start``):
    the template to restore its checkpoints into (``abstract``: shapes only, nothing computed)."""
    chosen = parts(task, settings)
    return fit_start(chosen.network, chosen.optimizer, chosen.draw, seed=seed,
                     options=_step_options(task, settings, devices=1), abstract=abstract)


def train_task(task: str, *, seed: int, settings: dict | None = None, loop: LoopOptions = LoopOptions(),
               start: FitResult | None = None, devices: int | None = None) -> FitResult:
    """Trains a task's network by its recipe until the numbers it watches are within
    ``settings["tol"]`` of 1 (``Task.tolerances`` may loosen it for some of them).

    Args:
      task: a key of ``TASKS``.
      seed: fixes the init and every batch.
      settings: from ``task_settings``; None takes the defaults.
      loop, start: see ``fit``.
      devices: spread each batch over this many devices (None: the most that split it evenly).

    Returns:
      ``fit``'s ``FitResult``; its parameters are the trained ones (``network_params`` gives
      the network's weights).
    """
    settings = settings or task_settings(task)
    chosen = parts(task, settings)
    return fit(chosen.network, chosen.optimizer, chosen.draw, seed=seed, max_steps=settings["steps"],
               target_weight=1.0, weight_tol=tolerances(task, settings["tol"]), dead_steps=settings["dead_steps"],
               options=_step_options(task, settings, devices), loop=loop, start=start)


def train_until_live(
    task: str,
    *,
    first_seed: int,
    settings: dict | None = None,
    tries: int = DEAD_SEED_TRIES,
    start: FitResult | None = None,
    on_dead: Callable[[int, FitResult], None] | None = None,
    on_checkpoint: Callable[[int, FitResult], None] | None = None,
    loop: LoopOptions = LoopOptions(),
    devices: int | None = None,
) -> tuple[int, FitResult]:
    """Trains from ``first_seed``; on a dead init (a dead ReLU, or ``Task.dead_at_init``, seen
    before any step) calls ``on_dead(seed, result)`` and draws again from the next seed, at most
    ``tries`` seeds in all (none from ``2**31`` on, so that every seed a run records can be
    given again).

    Args:
      task, settings, loop, devices: see ``train_task``.
      first_seed: the first seed to try.
      tries: how many seeds to try.
      start: continues the first seed's run (see ``fit``).
      on_dead: called with ``(seed, result)`` for each dead seed but the last try.
      on_checkpoint: called with ``(seed, snapshot)`` every ``loop.checkpoint_every`` steps.

    Returns:
      ``(seed, result)`` of the last seed tried: its stop_reason is "dead" only when every try was.
    """
    first_seed, tries = table.check("first_seed", first_seed), checks.integer("tries", tries)
    settings = settings or task_settings(task)
    last = min(first_seed + tries, SEED_LIMIT) - 1
    for seed in range(first_seed, last + 1):
        seed_loop = loop if on_checkpoint is None else loop._replace(
            on_checkpoint=functools.partial(on_checkpoint, seed))
        result = _dead_at_init(task, settings, seed) if start is None else None
        if result is None:
            result = train_task(task, seed=seed, settings=settings, loop=seed_loop, start=start, devices=devices)
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


def sweep_task(task: str, *, seeds: int, settings: dict | None = None, first_seed: int = 0,
               data_seed: int | None = None, devices: int | None = None,
               progress: bool = False) -> tuple[dict, SweepResult]:
    """Trains ``task`` from ``seeds`` seeds at once by its recipe (``rnnjax.training.sweep``);
    seed ``s`` is ``train_task``'s run from ``s`` (without redrawing dead seeds), trained to
    the end, and converged once every watched number is within ``settings["tol"]`` of 1.

    Args:
      task: a key of ``TASKS``.
      seeds: how many seeds, from ``first_seed`` on.
      settings: ``task_settings(task, ...)``; None: ``task_settings(task, tol=1e-3)``.
      first_seed, data_seed, devices, progress: see ``sweep``.

    Returns:
      ``(settings, result)``: every setting used (JSON-able), and the ``SweepResult``.

    Example:
      >>> settings, result = sweep_task("count", seeds=4, settings=task_settings("count", steps=200, tol=1e-3))
      >>> settings["recipe"], result.outcome.tolist()
      ('squared', ['converged', 'converged', 'converged', 'converged'])
    """
    settings = settings or task_settings(task, tol=_sweep_tol())
    chosen = parts(task, settings)
    result = sweep(chosen.network, chosen.optimizer, chosen.draw, seeds=seeds, steps=settings["steps"],
                   first_seed=first_seed, fresh_batches=chosen.fresh_batches, data_seed=data_seed,
                   watch=chosen.watch, tol=settings["tol"], devices=devices, progress=progress)
    recorded = {k: v for k, v in settings.items() if k not in ("skip_nonfinite", "dead_steps")}  # fit's alone
    return {**recorded, "seeds": seeds, "first_seed": first_seed, "data_seed": data_seed,
            "devices": result.devices}, result


def _sweep_tol() -> float:
    return table.SETTINGS["tol"].default["sweep"]


_FLOAT32_MAX = float(np.finfo(np.float32).max)


@functools.lru_cache(maxsize=8)
def _apply(model: nn.Module):
    return jax.jit(model.apply)


def l1_check(params: Any, sequence: np.ndarray, method: Method = "auto", *,
             task: str = "l1", precision: Precision = "compensated") -> tuple[float, float, float]:
    """Returns ``(predicted, exact, relative_error)`` of the L1 norm of one sequence by the
    network of ``task`` ("l1" or "l1-learned") with weights ``params``; ``exact`` is the float64
    sum of ``|x|``. Raises ``InputError`` when that is beyond float32's range."""
    exact = float(np.abs(np.asarray(sequence, np.float64)).sum())
    with np.errstate(over="ignore"):
        representable = np.isfinite(np.float32(exact))  # rounds to a finite float32 (3.4028235e38 does)
    if not representable:
        raise InputError(f"the L1 norm of this sequence, {exact:.9g}, is beyond float32's range "
                         f"(largest {_FLOAT32_MAX:.9g}), where the network computes", "sequence")
    model = TASKS[task].model(method=method, precision=precision)
    predicted = float(_apply(model)(params, jnp.asarray(sequence, jnp.float32)[None])[0])
    return predicted, exact, abs(predicted - exact) / max(exact, np.finfo(np.float64).tiny)


def count_check(params: Any, bits: np.ndarray, method: Method = "auto",
                precision: Precision = "compensated") -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(predicted, exact)`` running counts, each ``(batch, time)``, of ``bits``
    ``(batch, time)`` of 0s and 1s, at most ``2**24`` long (float32 counts are exact up to there)."""
    bits = np.asarray(bits, np.float32)
    if not np.isin(bits, (0.0, 1.0)).all():
        raise InputError(f"bits must be 0 or 1; received values from {bits.min():g} to {bits.max():g}", "bits")
    if bits.ndim != 2 or bits.shape[1] > table.COUNT_MAX_LENGTH:
        raise InputError(f"bits must be (batch, time) with time at most 2**24 = 16,777,216 (float32 counts are "
                         f"exact up to there); received shape {bits.shape}", "bits")
    predicted = _apply(RunningCount(method=method, precision=precision))(params, jnp.asarray(bits))
    return np.asarray(predicted), np.cumsum(bits, axis=1)
