"""Orbax checkpoints of a fit: exact round trip, and a damaged, cut or foreign one refused whole."""

import json
import shutil

import chex
import jax
import numpy as np
import optax
import pytest

from rnnjax import RunningCount
from rnnjax.training.checkpoints import (checkpoint_info, checkpoint_steps, delete_checkpoints, restore_checkpoint,
                                save_checkpoint)
from rnnjax.training.data import count_batch
from rnnjax.training.fit import LoopOptions, StepOptions, fit, fit_start

SEED = 0
ADAM = optax.adam(0.1)
RUN = {"task": "count", "note": "anything the caller records"}


def draw(key):
    return count_batch(key, 8, 5)


def template(skip_nonfinite=0):
    return fit_start(RunningCount(), ADAM, draw, seed=SEED, options=StepOptions(skip_nonfinite=skip_nonfinite))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint folder with the snapshots at steps 20, 40 and 60 and the fit they came from."""
    folder = tmp_path_factory.mktemp("checkpoints")
    result = fit(RunningCount(), ADAM, draw, seed=SEED, max_steps=60,
                 loop=LoopOptions(checkpoint_every=20, on_checkpoint=lambda r: save_checkpoint(folder, r, seed=SEED, run=RUN)))
    return folder, result


def assert_same(one, two):
    assert one.steps == two.steps
    chex.assert_trees_all_equal(one.state, two.state)
    chex.assert_trees_all_equal(one.history, two.history)


def test_a_checkpoint_restores_bitwise_and_the_fit_goes_on_as_before(saved):
    folder, result = saved
    assert checkpoint_steps(folder) == [20, 40, 60]
    info = checkpoint_info(folder, 40)
    assert (info["seed"], info["steps"], info["run"]) == (SEED, 40, RUN)
    restored = restore_checkpoint(folder, 60, template())
    assert_same(restored, result)
    assert restored.stop_reason == "running"
    middle = restore_checkpoint(folder, 20, template())
    assert_same(fit(RunningCount(), ADAM, draw, seed=SEED, max_steps=60, start=middle), result)


def test_step_zero_and_keep(tmp_path):
    start = template()
    save_checkpoint(tmp_path, start, seed=SEED, run=RUN, keep=2)
    assert_same(restore_checkpoint(tmp_path, 0, template()), start)
    for steps in (10, 20, 30):
        result = fit(RunningCount(), ADAM, draw, seed=SEED, max_steps=steps)
        save_checkpoint(tmp_path, result, seed=SEED, run=RUN, keep=2)
    assert checkpoint_steps(tmp_path) == [20, 30]
    save_checkpoint(tmp_path, result, seed=SEED, run={"other": 1}, keep=2)  # step 30 is kept as it was
    assert checkpoint_info(tmp_path, 30)["run"] == RUN
    delete_checkpoints(tmp_path)
    assert not tmp_path.exists() and not list(tmp_path.parent.glob(f".{tmp_path.name}.deleted-*"))


def damaged_copies(folder, step, tmp_path):
    """Yields ``(what, copy)``: the checkpoint folder with one file of the step flipped in the
    middle or cut to half, for every file of the step."""
    files = sorted(p.relative_to(folder) for p in (folder / str(step)).rglob("*") if p.is_file())
    assert len(files) > 5
    for n, name in enumerate(files):
        for how in ("flip", "half"):
            copy = tmp_path / f"{n}-{how}"
            shutil.copytree(folder, copy)
            target = copy / name
            data = target.read_bytes()
            middle = len(data) // 2
            if how == "flip" and data:
                target.write_bytes(data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1:])
            else:
                target.write_bytes(data[:middle])
            yield f"{how} {name}", copy


@pytest.mark.slow
def test_a_damaged_checkpoint_is_refused_whole_or_read_exactly(saved, tmp_path):
    folder, result = saved
    refused = 0
    for what, copy in damaged_copies(folder, 60, tmp_path):
        try:
            restored = restore_checkpoint(copy, 60, template())
        except ValueError as e:
            message = str(e)
            assert "\n" not in message and f"{copy}/60" in message, (what, message)
            refused += 1
        else:  # a file whose bytes do not matter (e.g. a timestamp): the contents are exact
            assert_same(restored, result)
        shutil.rmtree(copy)
    assert refused >= 10


def test_a_foreign_checkpoint_is_refused(saved, tmp_path):
    folder, _ = saved
    with pytest.raises(ValueError, match=r"/60: its arrays do not fit this network and optimizer"):
        restore_checkpoint(folder, 60, template(skip_nonfinite=2))  # another optimizer state
    with pytest.raises(ValueError, match=r"/7: not an rnnjax checkpoint \(no run/metadata\)"):
        checkpoint_info(folder, 7)
    import orbax.checkpoint as ocp

    other = tmp_path / "other"
    with ocp.CheckpointManager(other, item_names=("state", "run"),
                               options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False)) as m:
        m.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.ones(3)}),
                                          run=ocp.args.JsonSave({"format": "someone else's"})))
    with pytest.raises(ValueError, match=r"/5: not an rnnjax checkpoint \(expected format 'rnnjax.checkpoint/1'\)"):
        restore_checkpoint(other, 5, template())
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    metadata = copy / "60" / "run" / "metadata"
    info = json.loads(metadata.read_text())
    metadata.write_text(json.dumps({**info, "seed": 4}))  # the data key no longer matches
    with pytest.raises(ValueError, match=r"/60: damaged checkpoint \(its SHA-256 digest does not match"):
        restore_checkpoint(copy, 60, template())
    metadata.write_text(json.dumps({**info, "steps": "60"}))
    with pytest.raises(ValueError, match=r"/60: damaged checkpoint \(run/metadata: bad steps\)"):
        checkpoint_info(copy, 60)


def test_restoring_does_not_depend_on_jax_arrays_left_over(saved):
    folder, result = saved
    restored = restore_checkpoint(folder, 40, template())
    assert isinstance(restored.history["loss"], np.ndarray) and restored.history["loss"].shape == (40,)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(restored.state))


def test_a_file_that_cannot_be_written_is_named_and_nothing_is_left_half_written(tmp_path):
    from rnnjax.app.folders import write_atomically

    path = tmp_path / "metrics.json"
    path.write_text("old")

    def fill_the_disk(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as info:
        write_atomically(path, fill_the_disk)
    assert (info.value.errno, info.value.strerror, info.value.filename) == (28, "No space left on device", str(path))
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    with pytest.raises(OSError) as info:
        write_atomically(tmp_path / "missing" / "metrics.json", lambda f: None)
    assert info.value.filename == str(tmp_path / "missing" / "metrics.json")
