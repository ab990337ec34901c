"""Seed sweeps: each seed is fit's run, the training matches a float64 NumPy loop, the outcomes
and summary, the recipes' rates on a few seeds, the plot, and bad input."""

import json

import chex
import jax
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import numpy_rnn, numpy_scalar_adam

from rnnjax.training.data import count_batch, l1_batch
from rnnjax.training.models import L1Norm, RunningCount
from rnnjax.training.recipes import RECIPES, sweep_recipe
from rnnjax.training.stopping import within
from rnnjax.training.sweep import OUTCOMES, loss_landscape, summarize, sweep
from rnnjax.app.sweep_plot import plot_sweep
from rnnjax.training.fit import fit


def l1_data(key, batch_size=8):
    return l1_batch(key, batch_size, 10)


def count_data(key, batch_size=8):
    return count_batch(key, batch_size, 5)


def seed_batches(seed, data, steps, fresh):
    """The batches fit draws for ``seed``: batch i from fold_in(data_key, i)."""
    data_key = jax.random.split(jax.random.key(seed))[1]
    return [data(jax.random.fold_in(data_key, i if fresh else 0)) for i in range(steps)]


def test_each_seed_is_fits_run():
    optimizer = optax.adam(0.1, b2=0.9999)
    result = sweep(L1Norm(), optimizer, l1_data, seeds=2, first_seed=1, steps=300)
    assert result.seeds.tolist() == [1, 2]
    assert result.outcome.tolist() == ["converged", "dead"]  # seed 2 draws W_ih <= 0
    for i, seed in enumerate(result.seeds):
        stopped = fit(L1Norm(), optimizer, l1_data, seed=int(seed), max_steps=300,
                      target_weight=1.0, weight_tol=1e-3)
        w = stopped.state.params["params"]["cell"]
        if result.outcome[i] == "converged":
            assert stopped.stop_reason == "weights" and stopped.steps == result.converged_at[i]
            at_stop = [result.trajectories[k][i, stopped.steps] for k in ("cell/W_ih", "cell/W_hh")]
            chex.assert_trees_all_close(at_stop, [w["W_ih"][0, 0], w["W_hh"][0, 0]], rtol=1e-6)
        else:
            assert stopped.stop_reason == "dead" and result.converged_at[i] == -1
            # a dead ReLU never moves: the sweep ends where it started, where fit stopped
            chex.assert_trees_all_equal(result.final_params["params"]["cell"]["W_ih"][i], w["W_ih"])
            assert result.final_weights["cell/W_ih"][i] == result.initial_weights["cell/W_ih"][i] <= 0


@pytest.mark.parametrize("recipe, model, data, per_step", [
    ("squared", RunningCount(), count_data, True),
    pytest.param("notebook", L1Norm(), l1_data, False, marks=pytest.mark.slow),
])
def test_training_matches_a_float64_numpy_loop(recipe, model, data, per_step):
    steps, recipe = 20, RECIPES[recipe]  # longer, float32 rounding grows past 1e-4 (Adam amplifies it)
    if recipe.decay_steps:  # decay within the 20 steps, then hold
        recipe = recipe._replace(decay_steps=12)
    result = sweep_recipe(recipe, model, data, seeds=3, first_seed=3, steps=steps, chunk=8)  # 8 does not divide 20: the last chunk runs 4 steps
    for i, seed in enumerate(result.seeds):
        batches = [(np.abs(b.xs) if not per_step else b.xs, b.lengths, b.targets)
                   for b in seed_batches(int(seed), data, steps, recipe.fresh_batches)]
        init_key = jax.random.split(jax.random.key(int(seed)))[0]  # as fit draws the init
        drawn = model.init(init_key, batches[0][0], batches[0][1])["params"]["cell"]
        expected = numpy_scalar_adam(
            drawn["W_ih"][0, 0], drawn["W_hh"][0, 0], batches, per_step=per_step, lr=recipe.lr,
            b2=recipe.b2, decay_steps=recipe.decay_steps, final_lr=recipe.final_lr,
            square_input=recipe.name == "squared")
        got = np.stack([result.trajectories["cell/W_ih"][i, 1:], result.trajectories["cell/W_hh"][i, 1:]], 1)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


TRACES = []


class CountedL1Norm(L1Norm):
    """L1Norm that counts how often it is traced."""

    def __call__(self, xs, lengths=None):
        TRACES.append(1)
        return super().__call__(xs, lengths)


@pytest.fixture(scope="module")
def l1_sweep():
    TRACES.clear()
    return sweep(CountedL1Norm(), optax.adam(0.1), l1_data, seeds=10, steps=200, chunk=50,
                 tracked=3)


def test_outcomes_and_summary(l1_sweep):
    result = l1_sweep
    chex.assert_shape([result.trajectories["cell/W_ih"], result.trajectories["loss"]],
                      [(3, 201), (3, 200)])
    assert set(result.outcome) <= set(OUTCOMES)
    dead = result.initial_weights["cell/W_ih"] <= 0
    assert (result.outcome[dead] == "dead").all() and not (result.outcome[~dead] == "dead").any()
    converged = result.outcome == "converged"
    assert (result.converged_at[converged] > 0).all() and (result.converged_at[~converged] == -1).all()
    summary = summarize(result)
    text = json.dumps(summary, allow_nan=False)  # strict JSON
    assert json.loads(text)["counts"] == {k: int((result.outcome == k).sum()) for k in OUTCOMES}
    assert sum(summary["fractions"].values()) == pytest.approx(1.0)
    assert summary["seeds_per_second"] > 0 and summary["steps"] == 200


def test_steps_run_in_a_few_compiled_programs(l1_sweep):
    # init, the shapes of the watched weights, and one program for all 4 chunks of 50 steps:
    # never one per step or per seed
    assert len(TRACES) <= 5


def test_diverged_seeds_are_reported():
    result = sweep(RunningCount(), optax.sgd(1e6), count_data, seeds=6, steps=20)
    live = result.initial_weights["cell/W_ih"] > 0
    assert (result.outcome[live] == "diverged").all() and (result.outcome[~live] == "dead").all()


@pytest.mark.slow
def test_recipe_rates_on_a_few_seeds():
    """benchmarks/SWEEPS.md has the 1,000-seed rates; 32 seeds show the same split here."""
    notebook = sweep_recipe(RECIPES["notebook"], RunningCount(), count_data, seeds=32)
    live = notebook.initial_weights["cell/W_ih"] > 0
    assert 8 <= live.sum() <= 24
    assert (notebook.outcome[live] == "converged").all() and (notebook.outcome[~live] == "dead").all()
    squared = sweep_recipe(RECIPES["squared"], L1Norm(), l1_data, seeds=32)
    assert (squared.outcome == "converged").all()
    assert summarize(squared)["within_tol_at_end"] == 1.0
    assert np.mean(squared.final_weights["cell/W_hh"] == 1.0) > 0.9  # exactly 1.0 in float32


def test_loss_landscape_matches_numpy():
    batch = l1_batch(jax.random.key(0), 6, 7)
    grid_ih, grid_hh = np.array([-0.5, 0.7, 1.0, 1.6]), np.array([-1.2, 0.3, 1.0])
    landscape = loss_landscape(L1Norm(), batch, grid_ih, grid_hh)
    xs = np.abs(np.asarray(batch.xs, np.float64))[..., None]
    for j, w_hh in enumerate(grid_hh):
        for i, w_ih in enumerate(grid_ih):
            final, _ = numpy_rnn([[w_ih]], [[w_hh]], xs, batch.lengths)
            expected = np.mean((final[:, 0] - np.asarray(batch.targets, np.float64)) ** 2)
            assert landscape[j, i] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert landscape[2, 2] < 1e-10


def test_plot_writes_a_png(l1_sweep, tmp_path):
    grid = np.linspace(-1, 2, 7)
    path = tmp_path / "sweep.png"
    with open(path, "wb") as f:
        plot_sweep(l1_sweep, f, landscape=(grid, grid, loss_landscape(L1Norm(), l1_data(jax.random.key(0)),
                                                                       grid, grid)))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs, match", [
    ({"seeds": 0, "steps": 5}, r"seeds must be a positive integer; received 0"),
    ({"seeds": 2, "steps": 2.5}, r"steps must be a positive integer; received 2.5"),
    ({"seeds": 2, "steps": 5, "first_seed": 2**31 - 1}, r"first_seed \+ seeds - 1 must be a seed, an integer in "
                                                        r"\[0, 2\*\*31\); received 2147483648"),
    ({"seeds": 2, "steps": 5, "devices": 99}, r"devices must be an integer from 1 to \d+; received 99"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sweep(L1Norm(), optax.adam(0.1), l1_data, **kwargs)


def test_a_shared_batch_trains_every_seed_on_it():
    batch = count_data(jax.random.key(7))
    result = sweep(RunningCount(), optax.adam(0.1), batch, seeds=2, first_seed=0, steps=30)
    alone = fit(RunningCount(), optax.adam(0.1), batch, seed=0, max_steps=30)
    assert alone.stop_reason == "budget"  # seed 0 is live
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], result.final_params),
                                alone.state.params, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="since compensation (issue 32) a vmapped sweep's run is no longer bitwise "
                   "fit's: seed 10 reaches exactly 1.0 at step 380 in the sweep, 515 alone; to be found")
def test_a_tolerance_below_float32s_smallest_asks_for_the_target_itself():
    """tol 1e-50 is 0 in float32; "within 1e-50 of 1" still holds for a weight of exactly 1.0,
    in a sweep as in a single run (the default recipe reaches 1.0 exactly)."""
    from rnnjax.app.tasks import sweep_task, task_settings, train_task

    runs = {tol: sweep_task("l1", seeds=2, first_seed=10, settings=task_settings("l1", steps=600, tol=tol))[1]
            for tol in (1e-9, 1e-38, 1e-50)}
    assert (runs[1e-9].outcome == "converged").all()
    for result in runs.values():
        np.testing.assert_array_equal(result.converged_at, runs[1e-9].converged_at)
        assert summarize(result)["within_tol_at_end"] == summarize(runs[1e-9])["within_tol_at_end"]
    single = train_task("l1", seed=10, settings=task_settings("l1", steps=600, tol=1e-50))
    assert single.stop_reason == "weights" and single.steps == runs[1e-9].converged_at[0]


@given(error=st.floats(0, 1, width=32), tol=st.floats(1e-60, 1.0, exclude_min=True),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_within_is_the_exact_comparison_whatever_the_tolerance(error, tol, dtype):
    weight = np.asarray(1.0 + error if dtype == np.float64 else np.float32(1) - np.float32(error) / 2, dtype)
    exact = abs(float(weight) - 1.0) < tol
    assert bool(within({"w": weight}, 1.0, tol)) == exact
    if dtype == np.float32:  # as the sweep's compiled program decides it
        assert bool(jax.jit(lambda w: within({"w": w}, 1.0, tol))(jax.numpy.asarray(weight))) == exact
