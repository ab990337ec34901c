"""Sweep folders: a seed sweep's summary (``sweep.json``) and picture (``sweep.png``).

``sweep.json`` is strict JSON: the task, every setting used, the summary (``rnnjax.training.sweep.summarize``)
and one row per seed (outcome, steps to converge, the watched numbers at init and at the end, the
final loss). Both files are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

import rnnjax
from rnnjax.app.folders import writable_folder, write_atomically
from rnnjax.app.tasks import TASKS
from rnnjax.core.checks import InputError
from rnnjax.training.models import L1Norm, RunningCount
from rnnjax.training.sweep import SweepResult, loss_landscape, summarize

__all__ = ["SUMMARY", "PICTURE", "prepare_sweep_folder", "save_sweep", "landscape"]

SUMMARY, PICTURE = "sweep.json", "sweep.png"

# The plane the landscape is drawn over: a network with one scalar cell computing the task's
# function there, and the two trajectories drawn on it. l1-learned with slope_pos = slope_neg = s
# computes what L1Norm does with W_ih = s; its trajectories are drawn at the mean of its slopes.
_PLANES = {
    "l1": (L1Norm, ("cell/W_ih", "cell/W_hh")),
    "count": (RunningCount, ("cell/W_ih", "cell/W_hh")),
    "l1-learned": (L1Norm, ("mean slope", "cell/W_hh")),
}


def prepare_sweep_folder(out: str | os.PathLike, *, overwrite: bool = False) -> bool:
    """Checks the folder ``out`` before a sweep: a folder (created if missing) that can be written, that
    holds nothing but a sweep's two files, and those only with ``overwrite``. Returns True when
    this call created it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder", "out")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    strangers = [name for name in entries if name not in (SUMMARY, PICTURE)]
    if strangers:  # a training run, or anything else, is not ours to write into
        raise InputError(f"{out}: holds files that are not a sweep ({strangers[0]!r}); choose another folder",
                         "out")
    if entries and not overwrite:
        raise InputError(f"{out}: already holds a sweep ({entries[0]}); `overwrite` to replace it", "out")
    return writable_folder(out)


def landscape(task: str, settings: dict, result: SweepResult) -> tuple[tuple, tuple[str, str], SweepResult]:
    """Returns ``(landscape, plane, result)`` for ``plot_sweep``: the loss on 1,024 sequences over
    a grid of the plane, the plane's two trajectories, and ``result`` with those trajectories."""
    model, plane = _PLANES[task]
    if plane[0] == "mean slope":
        paths = result.trajectories
        result = result._replace(trajectories={**paths, "mean slope": (paths["slope_pos"] + paths["slope_neg"]) / 2})
    batch = TASKS[task].batch(jax.random.key(0), 1024, settings["length"])
    x, y = np.linspace(-1.5, 3.0, 91), np.linspace(-1.5, 2.0, 71)
    return (x, y, loss_landscape(model(), batch, x, y)), plane, result


def save_sweep(out: str | os.PathLike, task: str, settings: dict, result: SweepResult) -> list[Path]:
    """Writes ``sweep.json`` and ``sweep.png`` under ``out``; returns their paths."""
    from rnnjax.app.sweep_plot import plot_sweep  # matplotlib loads only when a sweep is saved

    out = Path(out)
    report = json.dumps(_report(task, settings, result), indent=1, allow_nan=False)
    grid, plane, drawn = landscape(task, settings, result)
    title = (f"{task}, recipe {settings['recipe']}: {len(result.seeds)} seeds, {result.steps} steps "
             f"(landscape: loss on 1,024 sequences)")
    paths = [out / SUMMARY, out / PICTURE]
    write_atomically(paths[0], lambda f: f.write(report), mode="w")
    write_atomically(paths[1], lambda f: plot_sweep(drawn, f, landscape=grid, plane=plane, title=title))
    return paths


def _report(task: str, settings: dict, result: SweepResult) -> dict[str, Any]:
    def values(array) -> list:  # strict JSON has no NaN or infinity: those become null
        return [float(v) if np.isfinite(v) else None for v in np.asarray(array, np.float64)]

    return {
        "task": task,
        "settings": settings,
        "summary": summarize(result),
        "versions": {"rnnjax": rnnjax.__version__, "jax": jax.__version__, "backend": jax.default_backend()},
        "per_seed": {
            "seed": result.seeds.tolist(),
            "outcome": result.outcome.tolist(),
            "converged_at": result.converged_at.tolist(),
            "initial": {k: values(v) for k, v in result.initial_weights.items()},
            "final": {k: values(v) for k, v in result.final_weights.items()},
            "final_loss": values(result.final_loss),
        },
    }
