"""Saved runs: a folder with a run's checkpoints, ``metrics.json`` and ``training.png``.

``train_run`` trains a seed task into such a folder: an orbax checkpoint every N steps
(``rnnjax.checkpoints``), and at the end the final checkpoint, then the metrics and the plot,
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
from rnnjax.cell import ReLUCell
from rnnjax.checkpoints import (checkpoint_info, checkpoint_steps, delete_checkpoints, loads_strict_json,
                                restore_checkpoint, save_checkpoint)
from rnnjax.recipes import RECIPES
from rnnjax.recurrence import resolve_method
from rnnjax.tasks import (COUNT_MAX_LENGTH, DEAD_SEED_TRIES, MAX_STEP_NUMBERS, TASKS, network_params,
                          task_settings, task_start, train_until_live, watched)
from rnnjax.tasks import converged as task_converged
from rnnjax.train import CONVERGED, SEED_LIMIT, STOP_REASONS, FitResult, weights_by_path

__all__ = ["CHECKPOINTS", "METRICS", "PLOT", "CHECKPOINT_EVERY", "LR_RANGE", "Run", "LoadedRun", "write_atomically",
           "prepare_run_folder", "writable_folder", "train_run", "load_run"]

CHECKPOINTS, METRICS, PLOT = "checkpoints", "metrics.json", "training.png"
CHECKPOINT_EVERY = 1000  # steps; a save takes 50-300 ms on a 2-core CPU, 1000 steps about 0.4 s
_FLAGS = {"length": "--max-length"}  # settings whose command-line flag has another name
# The learning rates a run takes: float32's normal range (below it a rate is 0, and nothing moves).
LR_RANGE = (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max))
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
        (``rnnjax.tasks.network_params`` gives the network's weights).
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
        (``rnnjax.tasks.converged``).
      status: for a run that did not converge, why: its stop reason, or that it never ended.
    """

    params: Any
    step: int
    converged: bool
    status: str


def write_atomically(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Writes ``path`` through a temporary file in the same folder, synced to disk, then renames it
    into place, so no reader ever sees half a file; the file gets the usual permissions (0666
    less umask)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # named by the file meant, not the temporary one
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a crash leaves the old file or the new
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):  # a full disk says nothing of the file it filled
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def _ours(name: str) -> bool:
    """True for the names a run folder holds: its files, and their temporary names."""
    return name in (CHECKPOINTS, METRICS, PLOT) or name.startswith(
        tuple(f".{n}." for n in (CHECKPOINTS, METRICS, PLOT)))


def prepare_run_folder(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> bool:
    """Checks the ``--out`` folder before any training, and empties it for ``overwrite``.

    A missing or empty folder is used; one that holds a run needs ``resume`` (to continue it)
    or ``overwrite`` (to replace it); ``overwrite`` deletes only a run folder's own files.

    Returns:
      True when this call created the folder (it is still empty).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if resume:
        if not (out / CHECKPOINTS).is_dir():
            raise ValueError(f"--out {out}: holds no run to resume (no {CHECKPOINTS} folder)")
        return False
    entries = sorted(out.iterdir()) if out.is_dir() else []
    strangers = [p.name for p in entries if not _ours(p.name)]
    if strangers:
        raise ValueError(f"--out {out}: holds files that are not an rnnjax run ({strangers[0]!r}); "
                         "choose another folder")
    if entries and not overwrite:
        raise ValueError(f"--out {out}: already holds a run; pass --resume to continue it or "
                         "--overwrite to replace it")
    try:
        for entry in entries:
            if entry.name == CHECKPOINTS:
                delete_checkpoints(entry)
            elif entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except OSError as e:
        raise ValueError(f"--out {out}: cannot replace the run there ({e.strerror or e})") from None
    return writable_folder(out)


def writable_folder(out: Path) -> bool:
    """Makes the ``--out`` folder if it is missing and checks that a file can be written there;
    returns True when it was made here (it is then empty)."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return created


def _run_info(task: str, settings: dict, first_seed: int, dead_seeds: list[int], resumed_at: list[int]) -> dict:
    return {"task": task, "settings": settings, "first_seed": first_seed, "dead_seeds": dead_seeds,
            "resumed_at": resumed_at}


def _resume_point(out: Path, task: str, given: dict, first_seed: int | None) -> tuple[dict, FitResult]:
    """Reads the latest checkpoint under ``out``; returns its run info and its state, with the
    settings ``given`` on the command line checked against the run's (only ``RESUMABLE`` may
    change)."""
    folder = out / CHECKPOINTS
    steps = checkpoint_steps(folder)
    if not steps:
        raise ValueError(f"--out {out}: holds no complete checkpoint to resume; start afresh with --overwrite")
    try:
        info = checkpoint_info(folder, steps[-1])
        run = info["run"]
        _check_run_info(run, folder / str(steps[-1]))
        if run["task"] != task:
            raise ValueError(f"--out {out}: holds a run of the {run['task']!r} network, not {task!r}")
        if first_seed is not None and first_seed != run["first_seed"]:
            raise ValueError(f"--seed {first_seed}: the run in {out} started from seed {run['first_seed']}; "
                             "a resumed run keeps its seed")
        settings = dict(run["settings"])
        for name, value in given.items():
            if name in RESUMABLE:
                settings[name] = value
            elif value != settings[name]:
                flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
                raise ValueError(f"{flag} {value}: the run in {out} trains with {settings[name]}; a resumed "
                                 "run keeps its settings")
        metrics = _read_metrics(out)
        if metrics is not None and metrics.get("steps") == steps[-1]:
            reason = metrics.get("stop_reason")
            if reason != "budget":
                raise ValueError(f"--out {out}: that run already ended ({STOP_REASONS.get(reason, reason)}, "
                                 f"step {steps[-1]}); nothing to resume")
            if settings["steps"] <= steps[-1]:
                raise ValueError(f"--out {out}: that run spent its budget of {steps[-1]} steps; "
                                 "pass a larger --steps to continue it")
        template = task_start(task, _training_settings(settings), seed=info["seed"])
        start = restore_checkpoint(folder, steps[-1], template)
        if start.steps > settings["steps"]:
            raise ValueError(f"--steps {settings['steps']}: that run has taken {start.steps} steps already")
        return {**run, "settings": settings, "seed": info["seed"]}, start
    except ValueError as e:
        raise _pointing_to_older(e, folder, steps[-1], "move that step folder aside to resume from {}") from None


def _pointing_to_older(error: ValueError, folder: Path, step: int, use: str) -> ValueError:
    """``error``, about the checkpoint at ``step``, with where to find the one before it (``use``
    formatted with its folder), if there is one."""
    older = [s for s in checkpoint_steps(folder) if s < step]
    if not older or not str(error).startswith(str(folder / str(step))):
        return error
    return ValueError(f"{error}; the checkpoint before it may be whole: {use.format(folder / str(older[-1]))}")


def _check_run_info(run: dict, where: Path) -> None:
    """Refuses run info that ``train_run`` did not write (a foreign or damaged checkpoint): its
    record must have the fields ``train_run`` writes, and every setting a value the command line
    accepts, so nothing is built from a damaged one."""
    settings = run.get("settings")
    expected = set(task_settings("l1")) | {"checkpoint_every"}
    dead_seeds, resumed_at = run.get("dead_seeds"), run.get("resumed_at")
    if (not isinstance(run.get("task"), str) or run["task"] not in TASKS or not isinstance(settings, dict)
            or set(settings) != expected or not _is_int(run.get("first_seed"), 0, SEED_LIMIT - 1)
            or not isinstance(dead_seeds, list) or len(dead_seeds) >= DEAD_SEED_TRIES
            or not all(_is_int(seed, 0, SEED_LIMIT - 1) for seed in dead_seeds)
            or not isinstance(resumed_at, list) or not all(_is_int(step, 0, 2**31 - 1) for step in resumed_at)):
        raise ValueError(f"{where}: not a checkpoint of an rnnjax run (its run record is not one "
                         "'rnnjax train' writes)")
    recipe = RECIPES.get(settings["recipe"]) if isinstance(settings["recipe"], str) else None
    valid = {
        "recipe": recipe is not None,
        "b2": recipe is not None and settings["b2"] == recipe.b2,
        "lr": _is_float(settings["lr"]) and LR_RANGE[0] <= settings["lr"] <= LR_RANGE[1],
        "tol": _is_float(settings["tol"]) and 0 < settings["tol"] < 1,
        **{name: _is_int(settings[name], 1, 2**31 - 1)
           for name in ("steps", "batch_size", "length", "checkpoint_every", "dead_steps")},
        "skip_nonfinite": _is_int(settings["skip_nonfinite"], 0, 2**31 - 1),
    }
    bad = [name for name, ok in valid.items() if not ok]
    if not bad and settings["batch_size"] * settings["length"] > MAX_STEP_NUMBERS:
        bad = ["batch_size x length"]
    if not bad and run["task"] == "count" and settings["length"] > COUNT_MAX_LENGTH:
        bad = ["length"]
    if bad:
        raise ValueError(f"{where}: damaged checkpoint (run/metadata: settings out of range: {', '.join(bad)})")


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_float(value: Any) -> bool:
    """A finite float, as ``train_run`` records lr and tol (JSON gives any integer as an int)."""
    return isinstance(value, float) and math.isfinite(value)


def _training_settings(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k != "checkpoint_every"}


def train_run(
    task: str,
    *,
    first_seed: int | None = None,
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
    """Trains ``task`` from ``first_seed`` (a dead init draws again from the next seed), saving
    checkpoints in ``out`` every ``checkpoint_every`` steps and, at the end, the final checkpoint,
    ``metrics.json`` and ``training.png``; an interrupted run saves its checkpoint alone.

    Args:
      task: a key of ``TASKS``.
      first_seed: the first seed to try (None: 0, or the resumed run's).
      given: settings chosen by the user (``task_settings`` keywords); the rest are the task's.
        With ``resume`` they must equal the run's, except "steps" and "checkpoint_every".
      out: the run folder (``prepare_run_folder`` checks it first); None saves nothing.
      resume: continue the run in ``out`` from its latest checkpoint.
      checkpoint_every: steps between checkpoints (None: ``CHECKPOINT_EVERY``, or the resumed
        run's).
      keep: how many checkpoints to keep (None: all).
      interrupt: see ``fit``.
      progress: show a progress bar.
      on_dead: called with ``(seed, result, settings)`` for each dead seed.
      devices: spread each batch over this many devices (None: all; see ``fit``).

    Returns:
      A ``Run``.

    Example:
      >>> import tempfile, pathlib
      >>> out = pathlib.Path(tempfile.mkdtemp()) / "run"
      >>> run = train_run("count", given={"recipe": "notebook", "steps": 40}, out=out, checkpoint_every=20)
      >>> run.dead_seeds, run.seed, run.result.stop_reason  # seeds 0-2 draw a dead ReLU
      ([0, 1, 2], 3, 'budget')
      >>> sorted(p.name for p in out.iterdir()), [p.name for p in sorted((out / "checkpoints").iterdir())]
      (['checkpoints', 'metrics.json', 'training.png'], ['20', '40'])
      >>> train_run("count", given={"steps": 300}, out=out, resume=True).result[2:4]
      (261, 'weights')
      >>> load_run(out, "count").converged
      True
    """
    given = {k: v for k, v in (given or {}).items() if v is not None}
    out = None if out is None else Path(out)
    folder = None if out is None else out / CHECKPOINTS
    if resume:
        if checkpoint_every:
            given["checkpoint_every"] = checkpoint_every
        run, start = _resume_point(out, task, given, first_seed)
        settings, first_seed, seed = run["settings"], run["first_seed"], run["seed"]
        dead_seeds, resumed_at = list(run["dead_seeds"]), [*run["resumed_at"], start.steps]
        count = len(jax.devices()) if devices is None else devices
        if settings["batch_size"] % count:
            raise ValueError(f"--devices {count}: the run's batch of {settings['batch_size']} sequences does not "
                             f"split evenly over {count} devices; give a --devices that divides {settings['batch_size']}")
        for name in (METRICS, PLOT):  # a run resumed after its budget ends anew
            (out / name).unlink(missing_ok=True)
    else:
        settings = {**task_settings(task, **given), "checkpoint_every": checkpoint_every or CHECKPOINT_EVERY}
        first_seed = first_seed or 0
        seed, start, dead_seeds, resumed_at = first_seed, None, [], []

    def save(seed: int, result: FitResult) -> Path:
        info = _run_info(task, settings, first_seed, dead_seeds, resumed_at)
        return save_checkpoint(folder, result, seed=seed, run=info, keep=keep)

    def dead(seed: int, result: FitResult) -> None:
        dead_seeds.append(seed)
        if folder is not None:  # a dead seed's checkpoints lead nowhere
            delete_checkpoints(folder)
        if on_dead is not None:
            on_dead(seed, result, settings)

    seed, result = train_until_live(
        task, first_seed=seed, settings=_training_settings(settings),
        tries=DEAD_SEED_TRIES - len(dead_seeds), start=start, on_dead=dead, progress=progress,
        checkpoint_every=settings["checkpoint_every"], on_checkpoint=None if folder is None else save,
        interrupt=interrupt, devices=devices)
    run = Run(task, settings, first_seed, seed, dead_seeds, result, resumed_at, [],
              len(jax.devices()) if devices is None else devices)
    if out is None:
        return run
    paths = [save(seed, result)]
    if result.stop_reason != "interrupted":
        from rnnjax.plot import plot_training  # matplotlib loads only when a run is saved

        metrics = json.dumps(_run_metrics(run), indent=1, allow_nan=False)
        write_atomically(out / METRICS, lambda f: f.write(metrics), mode="w")
        title = f"{task}, recipe {settings['recipe']}"
        write_atomically(out / PLOT, lambda f: plot_training(result.history, f, title=title))
        paths += [out / METRICS, out / PLOT]
    return run._replace(paths=paths)


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
    """Reads a checkpoint of a ``task`` run for evaluation.

    ``path`` is a run folder (its latest checkpoint), its ``checkpoints`` folder, or one step
    folder in it (``<run>/checkpoints/<step>``). Raises ``ValueError`` naming ``--params`` when
    it is none of these or the checkpoint is foreign, damaged or of another task.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--params {path}: no such folder")
    if not path.is_dir():
        raise ValueError(f"--params {path}: is a file; expected a run folder written by "
                         f"'rnnjax train --out' (or one of its {CHECKPOINTS}/<step> folders)")
    if (path / "_CHECKPOINT_METADATA").is_file():
        if not path.name.isdigit():
            raise ValueError(f"--params {path}: a checkpoint folder must be named by its step")
        folder, step = path.parent, int(path.name)
    else:
        folder = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
        steps = checkpoint_steps(folder)
        if not steps:
            raise ValueError(f"--params {path}: holds no rnnjax checkpoint; expected a folder "
                             "written by 'rnnjax train --out'")
        step = steps[-1]
    where = folder / str(step)
    try:
        info = checkpoint_info(folder, step)
        _check_run_info(info["run"], where)
        if info["run"]["task"] != task:
            raise ValueError(f"--params {path}: that run trained the {info['run']['task']!r} network, not {task!r}")
        settings = info["run"]["settings"]
        template = task_start(task, _training_settings(settings), seed=info["seed"])
        params = network_params(settings, restore_checkpoint(folder, step, template).state.params)
    except ValueError as e:
        raise _pointing_to_older(e, folder, step, "--params {}") from None
    converged = task_converged(task, settings, params)
    metrics = _read_metrics(folder.parent)
    if metrics is None:
        status = f"interrupted or killed at step {step}, before it ended"
    elif metrics.get("steps") != step:
        status = (f"a checkpoint at step {step}; the run ended at step {metrics.get('steps')}, "
                  f"stop reason: {metrics.get('stop_reason')}")
    else:
        status = f"stop reason: {metrics.get('stop_reason')}, after {step} steps"
    return LoadedRun(params, step, converged, status)
