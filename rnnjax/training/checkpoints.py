"""Checkpoints of a fit, with orbax: written atomically, read back whole or not at all.

A checkpoint folder holds one orbax step folder per saved step, ``<folder>/<step>/``, with two
items: "state" (the ``TrainState``, the per-step history so far and the data key, as exact
arrays) and "run" (JSON: the seed, the number of steps, what the caller records about the run,
e.g. its task and settings, and a SHA-256 digest of all of it). Orbax writes each step to a
temporary folder and renames it into place, so a process killed at any moment leaves every
step saved before it whole; the digest refuses a step whose files were changed or cut short
since, and a restore checks every array's shape and dtype against a template, so nothing is
ever partly loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rnnjax.core.checks import SEED_LIMIT, InputError
from rnnjax.training.fit import FitResult, seed_keys

__all__ = ["FORMAT", "loads_strict_json", "save_checkpoint", "checkpoint_steps", "checkpoint_info", "restore_checkpoint",
           "delete_checkpoints"]

FORMAT = "rnnjax.checkpoint/1"
_FOREIGN = "its arrays do not fit this network and optimizer (a checkpoint of another model or settings)"


def loads_strict_json(text: str) -> Any:
    """``json.loads`` that refuses NaN and Infinity (which Python's json writes and reads, but no
    strict JSON reader does) with a ``ValueError``."""
    def refuse(name: str):
        raise ValueError(f"{name} is not strict JSON")

    return json.loads(text, parse_constant=refuse)


def _manager(folder: Path, *, keep: int | None = None, create: bool = False):
    import orbax.checkpoint as ocp  # orbax takes ~2 s to import: only runs that save or load pay

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=create)
    handlers = {"state": ocp.StandardCheckpointHandler(), "run": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(folder.absolute(), item_handlers=handlers, options=options)


def _arrays(result: FitResult, seed: int) -> dict[str, Any]:
    """The arrays saved for ``result``: orbax cannot save an empty array, so a history is saved
    only from the first step on."""
    arrays = {"train_state": result.state, "data_key": np.asarray(_data_key(seed))}
    if result.steps:
        arrays["history"] = dict(result.history)
    return arrays


@jax.jit
def _data_key(seed: jax.Array) -> jax.Array:
    """The raw bits of ``seed_keys(seed)[1]``: one compiled program, not an eager op each."""
    return jax.random.key_data(seed_keys(seed)[1])


def _shapes(tree) -> dict[str, tuple]:
    """Returns each leaf's path, e.g. "train_state.params.params.cell.W_ih", with its shape and
    dtype; for orbax's metadata of a saved tree as for the tree itself."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="."): (tuple(leaf.shape), np.dtype(leaf.dtype))
            for path, leaf in leaves}


def _digest(arrays: dict[str, Any], info: dict) -> str:
    """SHA-256 of ``info`` (without its digest) and of every array's dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in info.items() if k != "sha256"},
                                       sort_keys=True, allow_nan=False).encode())
    for leaf in jax.tree.leaves(arrays):
        leaf = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{leaf.dtype.str}{leaf.shape}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def save_checkpoint(folder: str | os.PathLike, result: FitResult, *, seed: int, run: dict,
                    keep: int | None = 5) -> Path:
    """Saves ``result`` (state, history) and the data key of ``seed`` as step ``result.steps``.

    A step already saved is left as it is (it holds the same state); the oldest steps beyond
    ``keep`` are deleted (None keeps every step).

    Args:
      folder: the checkpoint folder; created if missing.
      result: a ``FitResult`` from ``fit``, or a snapshot it gave ``on_checkpoint``.
      seed: the seed of the fit.
      run: JSON-serialisable facts about the run (strict JSON: no NaN), returned by
        ``checkpoint_info`` and needed to build the template for ``restore_checkpoint``.
      keep: how many steps to keep.

    Returns:
      The step's folder.

    Example:
      >>> import tempfile, optax
      >>> from rnnjax import RunningCount
      >>> from rnnjax.training.data import count_batch
      >>> from rnnjax.training.fit import fit, fit_start
      >>> draw = lambda key: count_batch(key, 8, 5)
      >>> result = fit(RunningCount(), optax.adam(0.1), draw, seed=0, max_steps=30)
      >>> folder = tempfile.mkdtemp()
      >>> save_checkpoint(folder, result, seed=0, run={"note": "30 steps"}).name
      '30'
      >>> template = fit_start(RunningCount(), optax.adam(0.1), draw, seed=0)
      >>> restored = restore_checkpoint(folder, 30, template)
      >>> restored.steps, bool((restored.history["loss"] == result.history["loss"]).all())
      (30, True)
      >>> checkpoint_info(folder, 30)["run"]
      {'note': '30 steps'}
    """
    import orbax.checkpoint as ocp

    folder = Path(folder)
    arrays = _arrays(result, seed)
    info = {"format": FORMAT, "seed": seed, "steps": result.steps, "run": run}
    info["sha256"] = _digest(arrays, info)
    manager = _manager(folder, keep=keep, create=True)
    try:
        if result.steps not in manager.all_steps():
            manager.save(result.steps, force=True, args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays), run=ocp.args.JsonSave(info)))
    finally:
        manager.close()  # also when a save fails: orbax's threads must not outlive it
    return folder / str(result.steps)


def checkpoint_steps(folder: str | os.PathLike) -> list[int]:
    """Returns the steps saved whole under ``folder``, oldest first ([] if there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir()  # as orbax names them: "100", not "0100"
                  if p.name.isdigit() and p.name == str(int(p.name)) and p.is_dir()
                  and (p / "_CHECKPOINT_METADATA").is_file())


def checkpoint_info(folder: str | os.PathLike, step: int) -> dict:
    """Returns what ``save_checkpoint`` recorded at ``step``: "seed", "steps", "run", ...

    Raises ``InputError`` naming the step folder when it is not an rnnjax checkpoint.
    """
    where = Path(folder) / str(step)
    try:
        info = loads_strict_json((where / "run" / "metadata").read_text())
    except FileNotFoundError:
        raise InputError(f"{where}: not an rnnjax checkpoint (no run/metadata)", "folder") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also a 5,000-digit number
        raise InputError(f"{where}: damaged checkpoint (run/metadata: {str(e)[:120] or type(e).__name__})", "folder") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise InputError(f"{where}: not an rnnjax checkpoint (expected format {FORMAT!r})", "folder")
    kinds = {"seed": int, "steps": int, "run": dict, "sha256": str}
    wrong = [k for k, kind in kinds.items() if not isinstance(info.get(k), kind) or isinstance(info.get(k), bool)]
    if not wrong and not 0 <= info["seed"] < SEED_LIMIT:
        wrong = ["seed"]
    if wrong or info["steps"] != step:
        raise InputError(f"{where}: damaged checkpoint (run/metadata: bad {', '.join(wrong) or 'steps'})", "folder")
    return info


def restore_checkpoint(folder: str | os.PathLike, step: int, template: FitResult) -> FitResult:
    """Reads step ``step`` back into the structure of ``template`` (``train.fit_start`` of the
    same model, optimizer, data and seed), ready for ``fit(..., start=...)``.

    Every array must have the template's shape and dtype (the history: one row per step), the
    data key must be the seed's, and the digest must match; otherwise ``InputError`` names
    the step folder and what is wrong, and nothing is returned.

    Returns:
      A ``FitResult`` with stop_reason "running" and ``template.initial_params``.
    """
    folder, info = Path(folder), checkpoint_info(folder, step)
    where = folder / str(step)
    history = {k: np.zeros(step, v.dtype) for k, v in template.history.items()}
    target = _arrays(template._replace(steps=step, history=history), info["seed"])
    restored, failure = _read(folder, step, target)
    if failure is None and _shapes(restored) != _shapes(target):  # what was read, not what was said
        failure = _FOREIGN
    if failure:
        raise InputError(f"{where}: {failure}", "folder")
    if _digest(restored, info) != info["sha256"]:
        raise InputError(f"{where}: damaged checkpoint (its SHA-256 digest does not match its contents)", "folder")
    if not np.array_equal(restored["data_key"], target["data_key"]) or int(restored["train_state"].step) != step:
        raise InputError(f"{where}: damaged checkpoint (its data key or step disagrees with its seed or folder)", "folder")
    return FitResult(restored["train_state"], template.initial_params, step, "running",
                     restored.get("history", history))


def _read(folder: Path, step: int, target: dict) -> tuple[dict | None, str | None]:
    """Returns ``(arrays, None)`` restored into ``target``'s structure, or ``(None, why not)``."""
    import orbax.checkpoint as ocp

    manager = None
    try:
        manager = _manager(folder)
        if _shapes(manager.item_metadata(step)["state"].tree) != _shapes(target):
            return None, _FOREIGN
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return restored["state"], None
    except Exception as e:  # orbax and tensorstore raise many kinds; each means the same here
        message = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        failure = f"cannot be read ({type(e).__name__}: {message})"
    finally:
        if manager is not None:
            manager.close()
    return None, failure


def delete_checkpoints(folder: str | os.PathLike) -> None:
    """Deletes ``folder`` and every checkpoint in it: first renamed away (atomic), then removed,
    so a process killed meanwhile never leaves a half-deleted step where a step is looked for."""
    folder = Path(folder)
    if folder.exists():
        doomed = tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.deleted-")
        os.replace(folder, doomed)
        shutil.rmtree(doomed)
