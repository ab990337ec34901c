"""Seeds and batches spread over 4 simulated CPU devices give the single-device results.

XLA reads ``--xla_force_host_platform_device_count`` once, when JAX starts, so the 4-device
tests run in a second pytest process started with it; in a process that already has 4 devices
they run directly.
"""

import os
import subprocess
import sys
import tempfile
import warnings

import chex
import jax
import numpy as np
import optax
import pytest

from rnnjax.app.cli import main
from rnnjax.app.tasks import task_settings, train_task
from rnnjax.core.checks import InputError
from rnnjax.training.data import l1_batch
from rnnjax.training.devices import device_mesh, replicate, shard_leading_axis
from rnnjax.training.fit import init_state, make_train_step
from rnnjax.training.models import L1Norm
from rnnjax.training.recipes import RECIPES, sweep_recipe


def four_devices(test):
    """The tests that need 4 devices: the slow tier runs them (test_on_four_simulated_cpu_devices)."""
    return pytest.mark.slow(pytest.mark.skipif(
        jax.device_count() < 4, reason="needs 4 devices: XLA_FLAGS=--xla_force_host_platform_device_count=4")(test))


def test_device_counts_jax_does_not_see_are_refused_naming_them():
    count = jax.device_count()
    for devices in (0, count + 1, 2.0, True):
        with pytest.raises(InputError, match=rf"^devices must be an integer from 1 to {count}; received "
                                             rf"{devices!r}\. JAX sees {count} cpu device\(s\)") as info:
            device_mesh(devices)
        assert info.value.name == "devices"
    assert device_mesh(count).size == device_mesh().size == count
    with pytest.raises(InputError, match=r"^every array must have a first axis divisible by the 1 devices; "
                                         r"received shape \(\)"):
        shard_leading_axis({"x": np.float32(1)}, device_mesh(1))


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() >= 4, reason="this process has the devices: the tests run here")
def test_on_four_simulated_cpu_devices():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    # -s: a message XLA's runtime writes before it aborts reaches run.stderr (pytest's capture
    # would lose it with the process).
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__, "-k", "four_devices"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if run.returncode < 0:
        # Killed by a signal inside XLA's simulated-device runtime: seen once in CI (SIGABRT while
        # fit dispatched a step; 26 runs on a machine of the same kind passed). One rerun; a
        # second crash or any failing assertion fails the test.
        warnings.warn(f"the 4-device tests were killed by signal {-run.returncode}; rerunning once:\n"
                      + run.stderr[-4000:])
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout and "skipped" not in run.stdout, run.stdout


def l1_data(key, batch_size):
    return l1_batch(key, batch_size, 10)


@four_devices
def test_four_devices_sweep_equals_one_device():
    # 10 seeds on 4 devices: padded to 12, 3 a device
    one, four = (sweep_recipe(RECIPES["notebook"], L1Norm(), l1_data, seeds=10, steps=120, chunk=40,
                              devices=n, progress=False) for n in (1, 4))
    assert (one.devices, four.devices) == (1, 4)
    for field in ("initial_weights", "final_weights", "final_params", "final_loss", "trajectories"):
        # the gradient summed over devices rounds apart, and training carries it on: 1e-4 over 60 steps
        chex.assert_trees_all_close(getattr(four, field), getattr(one, field), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(four.outcome, one.outcome)
    np.testing.assert_array_equal(four.converged_at, one.converged_at)


@four_devices
def test_four_devices_train_step_on_a_sharded_batch():
    model, optimizer = L1Norm(), optax.adam(0.1)
    step = make_train_step(model, optimizer)
    mesh = device_mesh(4)
    alone = init_state(model, optimizer, jax.random.key(3), l1_data(jax.random.key(0), 8))
    spread = replicate(alone, mesh)
    for i in range(20):
        batch = l1_data(jax.random.key(i), 8)
        alone, alone_metrics = step(alone, batch)
        spread, spread_metrics = step(spread, shard_leading_axis(batch, mesh))
    weights = spread.params["params"]["cell"]["W_ih"]
    assert len(weights.sharding.device_set) == 4 and weights.sharding.is_fully_replicated
    chex.assert_trees_all_close(spread.params, alone.params, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(spread_metrics, alone_metrics, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"divisible by the 4 devices; received shape \(6, 10\)"):
        shard_leading_axis(l1_data(jax.random.key(0), 6), mesh)


@four_devices
def test_four_devices_fit_equals_one_device(capsys):
    settings = task_settings("l1", steps=60)
    one, four = (train_task("l1", seed=0, settings=settings, devices=n) for n in (1, 4))
    weights = four.state.params["params"]["cell"]["W_ih"]
    assert len(weights.sharding.device_set) == 4 and weights.sharding.is_fully_replicated
    assert (one.steps, one.stop_reason) == (four.steps, four.stop_reason) == (60, "budget")
    chex.assert_trees_all_close(four.state.params, one.state.params, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(four.history, one.history, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"divisible by the 4 devices; received shape \(6, 10\)"):
        train_task("l1", seed=0, settings=task_settings("l1", steps=5, batch_size=6), devices=4)
    # the command names its flags: the default batch of 8 over 3 devices, 6 over 4
    for flags, match in [(["--devices", "3"], "--batch-size 8 does not split evenly over 3 devices; give a "
                                              "--batch-size that is a multiple of 3, or --devices that divide 8"),
                         (["--devices", "4", "--batch-size", "6"], "--batch-size 6 does not split evenly over 4")]:
        assert main(["train", "l1", "--steps", "5", *flags]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.splitlines()) == 1 and match in captured.err, captured.err
    # a resumed run keeps its batch of 8, which 3 devices do not split: the flag is named
    with tempfile.TemporaryDirectory() as out:
        assert main(["train", "l1", "--steps", "5", "--out", out]) == 1  # out of budget
        capsys.readouterr()
        assert main(["train", "l1", "--steps", "10", "--out", out, "--resume", "--devices", "3"]) == 2
        assert capsys.readouterr().err == ("rnnjax: error: --batch-size 8 does not split evenly over 3 devices; give "
                                           "--devices that divide 8\n")
