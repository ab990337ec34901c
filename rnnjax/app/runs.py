"""Saved runs: a folder with a run's checkpoints, ``metrics.json`` and ``training.png``.

``train_run`` trains a seed task into such a folder: an orbax checkpoint every N steps
(``rnnjax.training.checkpoints``), and at the end the final checkpoint, then the metrics and the plot,
each file written under a temporary name and renamed into place. ``metrics.json`` exists only
for a run that has ended (converged or not); an interrupted or killed run has checkpoints alone,
and ``train_run(..., resume=True)`` continues it exactly. ``load_run`` reads any checkpoint
back for evaluation and says whether the run behind it converged.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

import rnnjax
from rnnjax.app import settings as table
from rnnjax.app.folders import CHECKPOINTS, METRICS, PLOT, write_atomically
from rnnjax.app.tasks import (DEAD_SEED_TRIES, TASKS, network_params, task_settings, task_start, tolerances,
                              train_until_live, watched)
from rnnjax.app.tasks import converged as task_converged
from rnnjax.core.cell import ReLUCell
from rnnjax.core.checks import SEED_LIMIT, InputError
from rnnjax.core.recurrence import resolve_method
from rnnjax.training.checkpoints import (checkpoint_info, checkpoint_steps, delete_checkpoints, loads_strict_json,
                                         restore_checkpoint, save_checkpoint)
from rnnjax.training.fit import FitResult, LoopOptions, weights_by_path
from rnnjax.training.recipes import RECIPES
from rnnjax.training.stopping import CONVERGED, STOP_REASONS

__all__ = ["CHECKPOINT_EVERY", "Run", "LoadedRun", "train_run", "load_run"]

CHECKPOINT_EVERY = 1000  # steps; a save takes 50-300 ms on a 2-core CPU, 1000 steps about 0.4 s
# Settings a resumed run may change: they alter neither the steps already taken nor the next ones.
RESUMABLE = ("steps", "checkpoint_every")


class Run(NamedTuple):
    """What ``train_run`` did.

    Attributes:
      task: the task's name.
      settings: every setting used (``task_settings`` and "checkpoint_every").
      first_seed: the seed asked for.
      seed: the seed of ``result``; seeds before it (``dead_seeds``) drew a dead ReLU.
      dead_seeds: the seeds abandoned as dead, in order.
      result: the ``FitResult`` of ``seed``; its parameters are the trained ones
        (``rnnjax.app.tasks.network_params`` gives the network's weights).
      resumed_at: the steps at which this run was resumed, oldest first.
      paths: the files and checkpoint written at the end ([] without a folder).
      devices: how many devices each batch was spread over.
    """

    task: str
    settings: dict
    first_seed: int
    seed: int
    dead_seeds: list[int]
    result: FitResult
    resumed_at: list[int]
    paths: list[Path]
    devices: int = 1


class LoadedRun(NamedTuple):
    """A checkpoint read back by ``load_run``.

    Attributes:
      params: the network's variables (the weights it computes with, whatever its recipe trained).
      step: the checkpoint's step.
      converged: True when every number the task watches is within its tolerance of 1
        (``rnnjax.app.tasks.converged``).
      status: for a run that did not converge, why: its stop reason, or that it never ended.
    """

    params: Any
    step: int
    converged: bool
    status: str


def _run_info(task: str, settings: dict, first_seed: int, dead_seeds: list[int], resumed_at: list[int]) -> dict:
    return {"task": task, "settings": settings, "first_seed": first_seed, "dead_seeds": dead_seeds,
            "resumed_at": resumed_at}


def _resume_point(out: Path, task: str, given: dict, seed: int | None) -> tuple[dict, FitResult]:
    """Reads the latest checkpoint under ``out``; returns its run info and its state, with the
    settings ``given`` checked against the run's (only ``RESUMABLE`` may change)."""
    folder = out / CHECKPOINTS
    steps = checkpoint_steps(folder)
    if not steps:
        raise InputError(f"{out}: holds no complete checkpoint to resume; start afresh with `overwrite`", "out")
    try:
        info = checkpoint_info(folder, steps[-1])
        run = info["run"]
        _check_run_info(run, folder / str(steps[-1]))
        if run["task"] != task:
            raise InputError(f"{out}: holds a run of the {run['task']!r} network, not {task!r}", "out")
        if seed is not None and seed != run["first_seed"]:
            raise InputError(f"seed {seed}: the run in {out} started from seed {run['first_seed']}; a resumed "
                             "run keeps its seed", "seed")
        settings = {**run["settings"], **{k: v for k, v in given.items() if k in RESUMABLE}}
        for name, value in given.items():
            if value != settings[name]:
                raise InputError(f"{name} {value}: the run in {out} trains with {settings[name]}; a resumed run "
                                 "keeps its settings", name)
        _check_not_ended(out, settings, steps[-1])
        template = task_start(task, _training_settings(settings), seed=info["seed"])
        start = restore_checkpoint(folder, steps[-1], template)
        return {**run, "settings": settings, "seed": info["seed"]}, start
    except InputError as e:  # about a setting, or about the checkpoint in out
        error = _pointing_to_older(e, folder, steps[-1], "move that step folder aside to resume from {}")
        raise InputError(str(error), e.name if e.name in table.SETTINGS else "out") from None


def _check_not_ended(out: Path, settings: dict, step: int) -> None:
    """Refuses to resume a run that ended at ``step`` (its metrics say so), unless it ran out of
    budget and ``settings`` give it more."""
    metrics = _read_metrics(out)
    if metrics is not None and metrics.get("steps") == step:
        reason = metrics.get("stop_reason")
        if reason != "budget":
            raise InputError(f"{out}: that run already ended ({STOP_REASONS.get(reason, reason)}, step {step}); "
                             "nothing to resume", "out")
        if settings["steps"] <= step:
            raise InputError(f"{out}: that run spent its budget of {step} steps; give a larger `steps` to "
                             "continue it", "out")
    if step > settings["steps"]:
        raise InputError(f"steps {settings['steps']}: that run has taken {step} steps already", "steps")


def _pointing_to_older(error: InputError, folder: Path, step: int, use: str) -> InputError:
    """``error``, about the checkpoint at ``step``, with where to find the one before it (``use``
    formatted with its folder), if there is one."""
    older = [s for s in checkpoint_steps(folder) if s < step]
    if not older or not str(error).startswith(str(folder / str(step))):
        return error
    return InputError(f"{error}; the checkpoint before it may be whole: {use.format(folder / str(older[-1]))}",
                      error.name)


def _check_run_info(run: Any, where: Path) -> None:
    """Refuses run info that ``train_run`` did not write (a foreign or damaged checkpoint): its
    record must have the fields ``train_run`` writes, and every setting a value the settings
    table accepts, so nothing is built from a damaged one."""
    fields = {"task": lambda v: isinstance(v, str) and v in TASKS, "settings": lambda v: isinstance(v, dict),
              "first_seed": _is_seed, "dead_seeds": lambda v: isinstance(v, list) and len(v) < DEAD_SEED_TRIES
              and all(map(_is_seed, v)),
              "resumed_at": lambda v: isinstance(v, list) and all(_is_int(step, 0, 2**31 - 1) for step in v)}
    if not isinstance(run, dict) or not all(name in run and ok(run[name]) for name, ok in fields.items()):
        raise InputError(f"{where}: not a checkpoint of an rnnjax run (its run record is not one "
                         "'rnnjax train' writes)", "path")
    settings = run["settings"]
    bad = table.check_record(settings)
    if not bad and settings["b2"] != RECIPES[settings["recipe"]].b2:
        bad = ["b2"]
    if not bad:
        try:
            table.check_run(settings, task=run["task"])
        except InputError as e:
            bad = [e.name]
    if bad:
        raise InputError(f"{where}: damaged checkpoint (run/metadata: settings out of range: {', '.join(bad)})",
                         "path")


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _is_seed(value: Any) -> bool:
    return _is_int(value, 0, SEED_LIMIT - 1)


def _training_settings(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k != "checkpoint_every"}


class _Record(NamedTuple):
    """What ``train_run`` writes into every checkpoint of a run, and how it goes on."""

    settings: dict
    first_seed: int
    dead_seeds: list[int]
    resumed_at: list[int]
    start: FitResult | None  # the state a resumed run goes on from
    seed: int  # the seed to train (first) from


def _begin(task: str, out: Path | None, given: dict, seed: int | None, resume: bool,
           checkpoint_every: int | None, devices: int | None) -> _Record:
    """The record of a new run, or of the run in ``out`` to resume."""
    seed = None if seed is None else table.check("seed", seed)
    if not resume:
        settings = {**task_settings(task, **given), "checkpoint_every": checkpoint_every or CHECKPOINT_EVERY}
        table.check_run(settings, task=task, devices=devices)
        first_seed = 0 if seed is None else seed
        return _Record(settings, first_seed, [], [], None, first_seed)
    if checkpoint_every:
        given["checkpoint_every"] = checkpoint_every
    run, start = _resume_point(out, task, given, seed)
    table.check_run(run["settings"], task=task, devices=devices, resumed=True)
    for name in (METRICS, PLOT):  # a run resumed after its budget ends anew
        (out / name).unlink(missing_ok=True)
    return _Record(run["settings"], run["first_seed"], list(run["dead_seeds"]), [*run["resumed_at"], start.steps],
                   start, run["seed"])


def train_run(
    task: str,
    *,
    seed: int | None = None,
    given: dict | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    keep: int | None = 5,
    interrupt: Callable[[], bool] | None = None,
    progress: bool = False,
    on_dead: Callable[[int, FitResult, dict], None] | None = None,
    devices: int | None = None,
) -> Run:
    """Trains ``task`` from ``seed`` (a dead init draws again from the next seed), saving
    checkpoints in ``out`` every ``checkpoint_every`` steps and, at the end, the final checkpoint,
    ``metrics.json`` and ``training.png``; an interrupted run saves its checkpoint alone.

    Args:
      task: a key of ``TASKS``.
      seed: the first seed to try (None: 0, or the resumed run's).
      given: settings chosen by the user (``task_settings`` keywords); the rest are the task's.
        With ``resume`` they must equal the run's, except "steps".
      out: the run folder (``rnnjax.app.folders.prepare_run_folder`` checks it first); None
        saves nothing.
      resume: continue the run in ``out`` from its latest checkpoint.
      checkpoint_every: steps between checkpoints (None: ``CHECKPOINT_EVERY``, or the resumed
        run's).
      keep: how many checkpoints to keep (None: all).
      interrupt, progress: see ``rnnjax.training.fit.LoopOptions``.
      on_dead: called with ``(seed, result, settings)`` for each dead seed.
      devices: spread each batch over this many devices (None: all; see ``fit``).

    Returns:
      A ``Run``.

    Example:
      >>> import tempfile, pathlib
      >>> out = pathlib.Path(tempfile.mkdtemp()) / "run"
      >>> run = train_run("count", seed=2, given={"recipe": "notebook", "steps": 40}, out=out, checkpoint_every=20)
      >>> run.dead_seeds, run.seed, run.result.stop_reason  # seeds 2 and 3 draw a dead ReLU
      ([2, 3], 4, 'budget')
      >>> sorted(p.name for p in out.iterdir()), [p.name for p in sorted((out / "checkpoints").iterdir())]
      (['checkpoints', 'metrics.json', 'training.png'], ['20', '40'])
      >>> train_run("count", given={"steps": 300}, out=out, resume=True).result[2:4]
      (290, 'weights')
      >>> load_run(out, "count").converged
      True
    """
    given = {k: v for k, v in (given or {}).items() if v is not None}
    out = None if out is None else Path(out)
    folder = None if out is None else out / CHECKPOINTS
    record = _begin(task, out, given, seed, resume, checkpoint_every, devices)
    settings = record.settings

    def save(seed: int, result: FitResult) -> Path:
        info = _run_info(task, settings, record.first_seed, record.dead_seeds, record.resumed_at)
        return save_checkpoint(folder, result, seed=seed, run=info, keep=keep)

    def dead(seed: int, result: FitResult) -> None:
        record.dead_seeds.append(seed)
        if folder is not None:  # a dead seed's checkpoints lead nowhere
            delete_checkpoints(folder)
        if on_dead is not None:
            on_dead(seed, result, settings)

    loop = LoopOptions(progress=progress, interrupt=interrupt, checkpoint_every=settings["checkpoint_every"])
    seed, result = train_until_live(
        task, first_seed=record.seed, settings=_training_settings(settings),
        tries=DEAD_SEED_TRIES - len(record.dead_seeds), start=record.start, on_dead=dead,
        on_checkpoint=None if folder is None else save, loop=loop, devices=devices)
    used = devices or max(d for d in range(1, len(jax.devices()) + 1) if settings["batch_size"] % d == 0)
    run = Run(task, settings, record.first_seed, seed, record.dead_seeds, result, record.resumed_at, [], used)
    return run if out is None else run._replace(paths=_finish(run, out, save))


def _finish(run: Run, out: Path, save: Callable[[int, FitResult], Path]) -> list[Path]:
    """Saves the final checkpoint and, for a run that ended, ``metrics.json`` and the plot."""
    paths = [save(run.seed, run.result)]
    if run.result.stop_reason != "interrupted":
        from rnnjax.app.plot import plot_training  # matplotlib loads only when a run is saved

        metrics = json.dumps(_run_metrics(run), indent=1, allow_nan=False)
        write_atomically(out / METRICS, lambda f: f.write(metrics), mode="w")
        title = f"{run.task}, recipe {run.settings['recipe']}"
        tol = tolerances(run.task, run.settings["tol"])
        write_atomically(out / PLOT, lambda f: plot_training(run.result.history, f, target=1.0, tol=tol,
                                                             stop_reason=run.result.stop_reason, title=title))
        paths += [out / METRICS, out / PLOT]
    return paths


def _finite_or_none(values: np.ndarray) -> list:
    """Strict JSON has no NaN or infinity: those become null."""
    return [v.item() if v.dtype == bool or np.isfinite(v) else None for v in np.asarray(values)]


def _run_metrics(run: Run) -> dict:
    """Returns ``metrics.json``'s contents: every setting used, the outcome, and the history."""
    result = run.result
    loss = result.history["loss"]
    final, initial = (network_params(run.settings, jax.device_get(p)) for p in (result.state.params,
                                                                              result.initial_params))
    metrics = {
        "task": run.task,
        "converged": result.stop_reason in CONVERGED,
        "stop_reason": result.stop_reason,
        "steps": result.steps,
        "seed": run.seed,
        "first_seed": run.first_seed,
        "dead_seeds": run.dead_seeds,
        "settings": run.settings,
        "method": resolve_method(ReLUCell(1), "auto", time=run.settings["length"]),
        "versions": {"rnnjax": rnnjax.__version__, "jax": jax.__version__, "backend": jax.default_backend()},
        "devices": run.devices,
        "resumed_at": run.resumed_at,
        "final_loss": _finite_or_none(loss[-1:])[0] if len(loss) else None,
        "skipped_steps": int(result.history["skipped"].sum()),
        "weights": {k: np.asarray(v).tolist() for k, v in weights_by_path(final).items()},
        "initial_weights": {k: np.asarray(v).tolist() for k, v in weights_by_path(initial).items()},
        "watched": watched(run.task, final),
        "history": {k: _finite_or_none(v) if v.dtype.kind in "fb" else v.tolist() for k, v in result.history.items()},
    }
    if result.stop_reason == "diverged":
        metrics["diverged_at_step"] = result.steps + 1
    return metrics


def _read_metrics(run_folder: Path) -> dict | None:
    """Returns the run's ``metrics.json`` (None when it has none or it cannot be read)."""
    try:
        metrics = loads_strict_json((run_folder / METRICS).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("stop_reason"), str) or not (
            isinstance(metrics.get("steps"), int) and not isinstance(metrics["steps"], bool)):
        return None  # not one train_run wrote: as if the run had not ended
    return metrics


def load_run(path: str | os.PathLike, task: str) -> LoadedRun:
    """Reads the parameters of a ``task`` run back for evaluation; nothing is compiled.

    ``path`` is a run folder (its latest checkpoint), its ``checkpoints`` folder, or one step
    folder in it (``<run>/checkpoints/<step>``). Raises ``InputError`` (about ``path``) when it
    is none of these, or the checkpoint is foreign, damaged or of another task.
    """
    folder, step = _checkpoint_of(Path(path))
    try:
        info = checkpoint_info(folder, step)
        _check_run_info(info["run"], folder / str(step))
        if info["run"]["task"] != task:
            raise InputError(f"{path}: that run trained the {info['run']['task']!r} network, not {task!r}", "path")
        settings = info["run"]["settings"]
        template = task_start(task, _training_settings(settings), seed=info["seed"], abstract=True)
        params = network_params(settings, jax.device_get(restore_checkpoint(folder, step, template).state.params))
    except InputError as e:  # about the checkpoint that path names
        raise InputError(str(_pointing_to_older(e, folder, step, "{}")), "path") from None
    metrics = _read_metrics(folder.parent)
    if metrics is None:
        status = f"interrupted or killed at step {step}, before it ended"
    elif metrics.get("steps") != step:
        status = (f"a checkpoint at step {step}; the run ended at step {metrics.get('steps')}, "
                  f"stop reason: {metrics.get('stop_reason')}")
    else:
        status = f"stop reason: {metrics.get('stop_reason')}, after {step} steps"
    return LoadedRun(params, step, task_converged(task, settings, params), status)


def _checkpoint_of(path: Path) -> tuple[Path, int]:
    """``(checkpoint folder, step)`` of the checkpoint ``path`` names (see ``load_run``)."""
    if not path.exists():
        raise InputError(f"{path}: no such folder", "path")
    if not path.is_dir():
        raise InputError(f"{path}: is a file; expected a run folder written by 'rnnjax train --out' (or one of "
                         f"its {CHECKPOINTS}/<step> folders)", "path")
    if (path / "_CHECKPOINT_METADATA").is_file():
        if not path.name.isdigit():
            raise InputError(f"{path}: a checkpoint folder must be named by its step", "path")
        return path.parent, int(path.name)
    folder = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    steps = checkpoint_steps(folder)
    if not steps:
        raise InputError(f"{path}: holds no rnnjax checkpoint; expected a folder written by 'rnnjax train --out'",
                         "path")
    return folder, steps[-1]
