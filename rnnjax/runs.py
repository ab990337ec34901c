"""Training runs of the two seed tasks: settings, saved files, and reading input sequences."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from rnnjax.data import Batch, count_batch, l1_batch
from rnnjax.models import L1Norm, RunningCount
from rnnjax.recurrence import Method
from rnnjax.train import FitResult, fit, weights_by_path

__all__ = ["Task", "TASKS", "train_task", "l1_check", "count_check", "write_atomically", "save_run",
           "load_params", "read_sequence"]


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


def train_task(
    task: str,
    *,
    seed: int,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    length: int | None = None,
    tol: float = 1e-9,
    progress: bool = False,
) -> FitResult:
    """Trains a task's network with Adam on a fresh batch each step until both weights are
    within ``tol`` of 1 (None settings take the task's defaults); ``seed`` fixes everything.

    The default ``tol`` of 1e-9 is below float32's spacing at 1, so it asks for 1.0 itself:
    a 10,000-step L1 norm is 3e-4 off when ``W_hh`` is one ulp away from 1.
    """
    spec = TASKS[task]
    batch_size, length = batch_size or spec.batch_size, length or spec.length
    return fit(
        spec.model(),
        optax.adam(lr or spec.lr, b2=ADAM_B2),
        lambda key: spec.batch(key, batch_size, length),
        seed=seed,
        max_steps=steps or spec.steps,
        target_weight=1.0,
        weight_tol=tol,
        progress=progress,
    )


def l1_check(params: Any, sequence: np.ndarray, method: Method = "auto") -> tuple[float, float, float]:
    """Returns ``(predicted, exact, relative_error)`` of the L1 norm of one sequence; ``exact``
    is the float64 sum of ``|x|``."""
    predicted = float(jax.jit(L1Norm(method=method).apply)(params, jnp.asarray(sequence, jnp.float32)[None])[0])
    exact = float(np.abs(np.asarray(sequence, np.float64)).sum())
    return predicted, exact, abs(predicted - exact) / max(exact, np.finfo(np.float64).tiny)


def count_check(params: Any, bits: np.ndarray, method: Method = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(predicted, exact)`` running counts, each ``(batch, time)``, of ``bits``
    ``(batch, time)``."""
    bits = np.asarray(bits, np.float32)
    predicted = jax.jit(RunningCount(method=method).apply)(params, jnp.asarray(bits))
    return np.asarray(predicted), np.cumsum(bits, axis=1)


def write_atomically(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Writes ``path`` through a temporary file in the same folder, then renames it into place,
    so no reader ever sees half a file; the file gets the usual permissions (0666 less umask)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_run(out: str | os.PathLike, task: str, settings: dict, result: FitResult) -> list[Path]:
    """Saves ``params.msgpack``, ``metrics.json`` and ``training.png`` under ``out``; returns them."""
    from rnnjax.plot import plot_training  # matplotlib loads only when a run is saved

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = jax.device_get(result.state.params)
    metrics = {
        "task": task,
        "settings": settings,
        "steps": result.steps,
        "stop_reason": result.stop_reason,
        "final_loss": float(result.history["loss"][-1]),
        "weights": {k: np.asarray(v).tolist() for k, v in weights_by_path(params).items()},
        "initial_weights": {k: np.asarray(v).tolist()
                            for k, v in weights_by_path(result.initial_params).items()},
        "history": {k: v.tolist() for k, v in result.history.items()},
    }
    paths = [out / "params.msgpack", out / "metrics.json", out / "training.png"]
    write_atomically(paths[0], lambda f: f.write(serialization.msgpack_serialize(params)))
    write_atomically(paths[1], lambda f: json.dump(metrics, f, indent=1), mode="w")
    write_atomically(paths[2], lambda f: plot_training(result.history, f, title=task))
    return paths


def load_params(run: str | os.PathLike, task: str) -> Any:
    """Reads the parameters that ``save_run`` wrote for ``task`` under the folder ``run``."""
    run = Path(run)
    try:
        saved_task = json.loads((run / "metrics.json").read_text())["task"]
        params = serialization.msgpack_restore((run / "params.msgpack").read_bytes())
    except FileNotFoundError as e:
        raise ValueError(f"--params {run}: no {Path(e.filename).name} there; expected the "
                         "folder that 'rnnjax train --out' wrote") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--params {run}: not a saved rnnjax run ({type(e).__name__}: {e})") from None
    if saved_task != task:
        raise ValueError(f"--params {run}: that run trained the {saved_task!r} network, not {task!r}")
    try:
        shapes = {k: np.shape(v) for k, v in weights_by_path(params).items()}
    except (KeyError, TypeError, AttributeError):
        shapes = None
    if shapes != {"cell/W_ih": (1, 1), "cell/W_hh": (1, 1)}:
        raise ValueError(f"--params {run}: expected weights cell/W_ih and cell/W_hh of shape (1, 1); "
                         f"found {shapes}")
    return jax.tree.map(jnp.asarray, params)


def read_sequence(path: str | os.PathLike) -> np.ndarray:
    """Reads one sequence of numbers from ``.npy``, ``.csv`` (commas or newlines) or ``.txt``
    (whitespace); returns a 1-D float64 array, or raises ``ValueError`` naming what is wrong."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv", ".txt"):
        raise ValueError(f"--input {path}: expected a .npy, .csv or .txt file; received '{suffix or path.name}'")
    try:
        values = _load_npy(path) if suffix == ".npy" else _parse_numbers(path.read_text(), path)
    except FileNotFoundError:
        raise ValueError(f"--input {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--input {path}: cannot be read ({e})") from None
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise ValueError(f"--input {path}: expected real numbers; received dtype {values.dtype}")
    if values.ndim > 1 and sum(n > 1 for n in values.shape) > 1:
        raise ValueError(f"--input {path}: expected one sequence; received an array of shape {values.shape}")
    values = values.astype(np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError(f"--input {path}: holds no numbers")
    if not np.isfinite(values).all():
        raise ValueError(f"--input {path}: {int((~np.isfinite(values)).sum())} values are NaN or infinite")
    return values


def _load_npy(path: Path) -> np.ndarray:
    try:
        values = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as e:
        raise ValueError(f"--input {path}: not a valid .npy file ({e})") from None
    if not isinstance(values, np.ndarray):
        raise ValueError(f"--input {path}: holds an .npz archive; expected one array (np.save)")
    return values


def _parse_numbers(text: str, path: Path) -> np.ndarray:
    values = []
    for line_number, line in enumerate(text.splitlines(), 1):
        for token in line.replace(",", " ").split():
            try:
                values.append(float(token))
            except ValueError:
                raise ValueError(f"--input {path}: line {line_number}: {token!r} is not a number") from None
    return np.asarray(values, np.float64)
