"""The jitted training step and fit: convergence on both seed tasks, stop rules, no retracing."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rnnjax import L1Norm, ReLUCell, RunningCount, rnn
from rnnjax.training.data import count_batch, l1_batch
from rnnjax.training.recipes import Reparametrized, square_input_weights
from rnnjax.training.fit import (LoopOptions, StepOptions, _loss, fit, fit_start, init_state, make_train_step, seed_keys,
                                 squared_error, weight_elements)

LIVE_SEED = 0  # its init has W_ih > 0; seed 3's has W_ih <= 0 (a dead ReLU)
DEAD_SEED = 3
ADAM = optax.adam(0.1)  # one object, so that fits share their compiled step


def cell_weights(params):
    w = params["params"]["cell"]
    return float(w["W_ih"][0, 0]), float(w["W_hh"][0, 0])


def test_train_step_never_retraces():
    model, optimizer = L1Norm(), ADAM
    step = make_train_step(model, optimizer)
    state = init_state(model, optimizer, jax.random.key(0), l1_batch(jax.random.key(1), 8, 10))
    chex.clear_trace_counter()
    counted = jax.jit(chex.assert_max_traces(step.__wrapped__, n=1))
    for i in range(5):
        state, metrics = counted(state, l1_batch(jax.random.key(i), 8, 10))
    assert int(state.step) == 5 and np.isfinite(float(metrics["loss"]))
    assert step._cache_size() == 0  # the wrapped original was never called
    for i in range(3):
        state, _ = step(state, l1_batch(jax.random.key(i), 8, 10))
    assert step._cache_size() == 1


def test_squared_error_ignores_steps_past_each_length():
    predictions = jnp.array([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    targets = jnp.array([[1.0, 3.0, 50.0], [3.0, 9.0, 9.0]])
    assert float(squared_error(predictions, targets, jnp.array([2, 1]))) == pytest.approx(5 / 3)
    assert float(squared_error(jnp.ones(2), jnp.zeros(2), jnp.array([1, 1]))) == 1.0


@pytest.mark.slow
def test_l1_network_learns_unit_weights_and_generalises():
    batch = l1_batch(jax.random.key(LIVE_SEED), batch_size=8, max_length=10)
    result = fit(L1Norm(), ADAM, batch, seed=LIVE_SEED, max_steps=3000,
                 target_weight=1.0, weight_tol=1e-5)
    assert result.stop_reason == "weights"
    w_ih, w_hh = cell_weights(result.state.params)
    assert abs(w_ih - 1) < 1e-5 and abs(w_hh - 1) < 1e-5
    assert result.history["weight_error"][-1] < 1e-5 <= result.history["weight_error"][:-1].min()

    # Training on until the weights are exactly 1.0 in float32 (a tolerance below one ulp) is
    # what a 10,000-step sum needs: W_hh one ulp off 1 already costs ~3e-4 relative there.
    result = fit(L1Norm(), ADAM, batch, seed=LIVE_SEED, max_steps=3000,
                 target_weight=1.0, weight_tol=1e-9)
    assert result.stop_reason == "weights" and cell_weights(result.state.params) == (1.0, 1.0)
    model, params = L1Norm(), result.state.params
    assert float(model.apply(params, jnp.array([[3.0, -5.0, 7.0, -2.0]]))[0]) == pytest.approx(17, abs=1e-4)
    xs = jax.random.normal(jax.random.key(12345), (1, 10_000))
    exact = np.abs(np.asarray(xs, np.float64)).sum()
    predicted = float(jax.jit(model.apply)(params, xs)[0])
    assert abs(predicted - exact) / exact < 1e-5


def test_running_count_network_counts_held_out_sequences():
    batch = count_batch(jax.random.key(LIVE_SEED), batch_size=4, length=5)  # seed 003's size
    result = fit(RunningCount(), ADAM, batch, seed=LIVE_SEED, max_steps=3000,
                 target_weight=1.0, weight_tol=1e-6)
    assert result.stop_reason == "weights"
    held_out = count_batch(jax.random.key(999), batch_size=4, length=5)
    outputs = RunningCount().apply(result.state.params, held_out.xs)
    chex.assert_trees_all_close(outputs, held_out.targets, atol=1e-3, rtol=0)


def test_dead_relu_is_reported_not_looped_on():
    batch = l1_batch(jax.random.key(0), 8, 10)
    result = fit(L1Norm(), ADAM, batch, seed=DEAD_SEED, max_steps=10_000,
                 target_weight=1.0, dead_steps=10, loop=LoopOptions(sync_every=7))
    w_ih, _ = cell_weights(result.initial_params)
    assert w_ih <= 0 and result.stop_reason == "dead" and result.steps == 10
    assert np.all(result.history["grad_norm"] == 0) and np.all(result.history["loss"] > 0)
    chex.assert_trees_all_equal(result.state.params, result.initial_params)


def test_fit_is_reproducible_and_honours_budget_and_loss_rules():
    kwargs = dict(seed=LIVE_SEED, max_steps=40, loop=LoopOptions(sync_every=7))
    draw = lambda key: l1_batch(key, 8, 10)  # noqa: E731  a fresh batch every step
    one, two = (fit(L1Norm(), ADAM, draw, **kwargs) for _ in range(2))
    assert one.stop_reason == "budget" and one.steps == 40
    chex.assert_trees_all_equal(one.state.params, two.state.params)
    chex.assert_trees_all_equal(one.history, two.history)
    np.testing.assert_array_equal(one.history["step"], np.arange(1, 41))
    loss_tol = float(np.sort(one.history["loss"])[5])
    stopped = fit(L1Norm(), ADAM, draw, loss_tol=loss_tol, **kwargs)
    assert stopped.stop_reason == "loss" and stopped.history["loss"][-1] <= loss_tol
    assert np.all(stopped.history["loss"][:-1] > loss_tol)
    chex.assert_trees_all_equal(stopped.history["loss"], one.history["loss"][: stopped.steps])


def test_fit_rejects_bad_sizes():
    batch = l1_batch(jax.random.key(0), 2, 3)
    with pytest.raises(ValueError, match=r"max_steps must be a positive integer; received 0\.$"):
        fit(L1Norm(), ADAM, batch, seed=0, max_steps=0)
    with pytest.raises(ValueError, match=r"sync_every must be a positive integer; received 2.5\.$"):
        fit(L1Norm(), ADAM, batch, seed=0, max_steps=5, loop=LoopOptions(sync_every=2.5))
    with pytest.raises(ValueError, match=r"skip_nonfinite must be an integer >= 0; received -1\.$"):
        fit(L1Norm(), ADAM, batch, seed=0, max_steps=5, options=StepOptions(skip_nonfinite=-1))
    start = fit(L1Norm(), ADAM, batch, seed=0, max_steps=5)
    with pytest.raises(ValueError, match=r"start has taken 5 steps, more than max_steps=4\.$"):
        fit(L1Norm(), ADAM, batch, seed=0, max_steps=4, start=start)


def draw_count(key):
    return count_batch(key, 8, 5)


def assert_same_fit(one, two):
    assert (one.steps, one.stop_reason) == (two.steps, two.stop_reason)
    chex.assert_trees_all_equal(one.state, two.state)  # bitwise, optimizer state included
    chex.assert_trees_all_equal(one.history, two.history)


def test_loss_tol_is_checked_on_the_returned_states_own_loss():
    # The case: the rule held at a logged loss of 5.0e-4 while the state returned,
    # one update later, had a loss of 4.9e-3. Now each logged loss is the returned state's own.
    model, optimizer = RunningCount(), ADAM
    batch = count_batch(jax.random.key(0), batch_size=8, length=5)
    result = fit(model, optimizer, batch, seed=LIVE_SEED, max_steps=3000, loss_tol=1e-3)
    assert result.stop_reason == "loss"
    loss = jax.jit(_loss, static_argnums=0)  # as fit computes it: eagerly, a sum may round apart by an ulp
    own_loss = float(loss(model, result.state.params, batch))
    assert own_loss == result.history["loss"][-1] <= 1e-3
    drawn = fit(model, optimizer, draw_count, seed=LIVE_SEED, max_steps=3000, loss_tol=1e-3)
    last_batch = draw_count(jax.random.fold_in(seed_keys(LIVE_SEED)[1], drawn.steps - 1))
    assert float(loss(model, drawn.state.params, last_batch)) == drawn.history["loss"][-1] <= 1e-3


def test_a_diverging_fit_stops_with_the_last_finite_state():
    # At lr 3 the first update takes both weights to ~3.8; over 20 steps the next gradient
    # is ~1e22, whose square (Adam's second moment) overflows float32.
    model, optimizer = RunningCount(), optax.adam(3.0)
    draw = lambda key: count_batch(key, 8, 20)  # noqa: E731
    kwargs = dict(seed=LIVE_SEED, target_weight=1.0)
    result = fit(model, optimizer, draw, max_steps=500, **kwargs)
    assert result.stop_reason == "diverged" and result.steps == 1
    assert all(np.isfinite(v).all() for v in result.history.values())
    chex.assert_tree_all_finite(result.state)
    # The state returned is the one after step `steps`, as a fit with that budget leaves it ...
    assert_same_fit(result._replace(stop_reason="budget"), fit(model, optimizer, draw, max_steps=1, **kwargs))
    # ... and the step after it is the one that is not finite.
    batch = draw(jax.random.fold_in(seed_keys(LIVE_SEED)[1], result.steps))
    state, metrics = make_train_step(model, optimizer)(result.state, batch)
    assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
    assert not np.isfinite(np.asarray(state.opt_state[0].nu["params"]["cell"]["W_hh"])).all()


def nan_sometimes(key):
    """Count batches whose inputs are all NaN one time in five."""
    batch = count_batch(key, 8, 5)
    broken = jax.random.bernoulli(jax.random.fold_in(key, 7), 0.2)
    return batch._replace(xs=jnp.where(broken, jnp.nan, batch.xs))


@pytest.mark.slow
def test_non_finite_updates_are_skipped_and_counted_when_asked():
    kwargs = dict(seed=LIVE_SEED, max_steps=3000, target_weight=1.0, weight_tol=1e-6)
    guarded = fit(RunningCount(), ADAM, nan_sometimes, **kwargs)
    assert guarded.stop_reason == "diverged"
    skipping = fit(RunningCount(), ADAM, nan_sometimes, options=StepOptions(skip_nonfinite=3), **kwargs)
    assert skipping.stop_reason == "weights"
    skipped = skipping.history["skipped"]
    assert skipping.steps == len(skipped) and skipped.sum() > 0
    assert skipped[guarded.steps] and not skipped[:guarded.steps].any()  # the step that diverged
    assert int(skipping.state.opt_state.total_notfinite) == skipped.sum()
    assert np.isnan(skipping.history["loss"][skipped]).all()
    assert np.isfinite(skipping.history["loss"][~skipped]).all()
    # More non-finite steps in a row than allowed: apply_if_finite gives up, and the fit diverges.
    always = lambda key: nan_sometimes(key)._replace(xs=jnp.full((8, 5), jnp.nan))  # noqa: E731
    gave_up = fit(RunningCount(), ADAM, always, options=StepOptions(skip_nonfinite=2), **kwargs)
    assert gave_up.stop_reason == "diverged" and gave_up.steps == 2 and gave_up.history["skipped"].all()


def test_a_fit_continued_from_a_snapshot_ends_bitwise_as_the_uninterrupted_one():
    kwargs = dict(seed=LIVE_SEED, max_steps=3000, target_weight=1.0, weight_tol=1e-9)
    snapshots = []
    whole = fit(RunningCount(), ADAM, draw_count, loop=LoopOptions(checkpoint_every=40, on_checkpoint=snapshots.append), **kwargs)
    assert whole.stop_reason == "weights" and [s.steps for s in snapshots] == list(range(40, whole.steps, 40))
    assert all(s.stop_reason == "running" and len(s.history["loss"]) == s.steps for s in snapshots)
    for snapshot in (snapshots[0], snapshots[-1]):
        assert_same_fit(fit(RunningCount(), ADAM, draw_count, start=snapshot, loop=LoopOptions(sync_every=9),
                            **kwargs), whole)
    polls = iter(range(10**6))
    stopped = fit(RunningCount(), ADAM, draw_count, loop=LoopOptions(interrupt=lambda: next(polls) >= 30), **kwargs)
    assert stopped.stop_reason == "interrupted" and stopped.steps == 30
    assert_same_fit(fit(RunningCount(), ADAM, draw_count, start=stopped, **kwargs), whole)
    # a start that had already converged (a run killed after its final checkpoint) stops there
    assert_same_fit(fit(RunningCount(), ADAM, draw_count, start=whole._replace(stop_reason="running"), **kwargs),
                    whole)


@pytest.mark.slow
def test_stop_rules_do_not_depend_on_how_often_the_host_syncs():
    kwargs = dict(seed=0, max_steps=500, target_weight=1.0)
    for data in (draw_count, l1_batch(jax.random.key(0), 8, 10)):
        model = RunningCount() if data is draw_count else L1Norm()
        runs = [fit(model, ADAM, data, loop=LoopOptions(sync_every=n), **kwargs) for n in (1, 7, 25)]
        for other in runs[1:]:
            assert_same_fit(other, runs[0])


def test_fit_start_is_the_template_of_every_later_state():
    start = fit_start(RunningCount(), ADAM, draw_count, seed=LIVE_SEED, options=StepOptions(skip_nonfinite=2))
    later = fit(RunningCount(), ADAM, draw_count, seed=LIVE_SEED, max_steps=3,
                options=StepOptions(skip_nonfinite=2))
    assert jax.tree.structure(start.state) == jax.tree.structure(later.state)
    assert {k: v.dtype for k, v in start.history.items()} == {k: v.dtype for k, v in later.history.items()}
    chex.assert_trees_all_equal(start.initial_params, later.initial_params)


def test_fit_watches_the_weights_a_reparametrised_network_computes_with():
    network = Reparametrized(L1Norm(), square_input_weights)
    watch = lambda params: weight_elements(network.transform(params))  # noqa: E731
    draw = lambda key: l1_batch(key, 8, 10)  # noqa: E731
    result = fit(network, ADAM, draw, seed=DEAD_SEED, max_steps=3000, target_weight=1.0, weight_tol=1e-3,
                 options=StepOptions(watch=watch))
    v = float(result.initial_params["params"]["cell"]["W_ih"][0, 0])
    assert v < 0 and result.history["cell/W_ih"][0] >= 0  # DEAD_SEED draws v < 0: W_ih = v*v is not dead
    assert result.stop_reason == "weights"
    assert all(abs(w - 1) < 1e-3 for w in watch(result.state.params).values())
    # a tolerance per watched weight: W_hh held to 1e-3, W_ih let off entirely
    loose = fit(network, ADAM, draw, seed=DEAD_SEED, max_steps=3000, target_weight=1.0,
                weight_tol={"cell/W_ih": 10.0, "cell/W_hh": 1e-3}, options=StepOptions(watch=watch))
    assert loose.stop_reason == "weights" and loose.steps <= result.steps
    assert abs(loose.history["cell/W_hh"][-1] - 1) < 1e-3
    with pytest.raises(ValueError, match=r"weight_tol must name every watched weight, \['cell/W_hh', 'cell/W_ih'\]; "
                                         r"received \['cell/W_ih'\]"):
        fit(network, ADAM, draw, seed=0, max_steps=5, target_weight=1.0, weight_tol={"cell/W_ih": 1.0},
            options=StepOptions(watch=watch))


def test_fit_keeps_the_seeds_first_batch_when_batches_are_not_fresh():
    draw = lambda key: count_batch(key, 8, 5)  # noqa: E731
    kept = fit(RunningCount(), ADAM, draw, seed=3, max_steps=30, options=StepOptions(fresh_batches=False))
    first = draw(jax.random.fold_in(seed_keys(3)[1], 0))
    given = fit(RunningCount(), ADAM, first, seed=3, max_steps=30)
    chex.assert_trees_all_equal(kept.state, given.state)
    chex.assert_trees_all_equal(kept.history, given.history)


class WideL1(nn.Module):
    """A user's own model: a 128-unit ReLU cell under rnnjax.rnn and a dense read-out."""

    @nn.compact
    def __call__(self, xs, lengths=None):
        xs = xs[..., None]
        cell = ReLUCell(features=128)
        weights = self.param("cell", lambda key: cell.init(key, cell.initialize_carry(key, xs[:, 0].shape),
                                                             xs[:, 0])["params"])
        final_state, _ = rnn(cell, {"params": weights}, xs, lengths)
        return nn.Dense(1)(final_state)[:, 0]


def test_fit_on_a_real_model_keeps_only_what_its_rules_and_result_need():
    steps = 200
    result = fit(WideL1(), ADAM, lambda key: l1_batch(key, 8, 10), seed=0, max_steps=steps, target_weight=1.0)
    assert result.stop_reason == "budget" and result.steps == steps
    assert sum(np.size(w) for w in jax.tree.leaves(result.state.params)) > 16_000
    # one number a column a step, whatever the number of weights
    assert sorted(result.history) == ["grad_norm", "loss", "skipped", "step", "weight_error"]
    assert all(v.shape == (steps,) for v in result.history.values())
    assert np.isfinite(result.history["loss"]).all() and result.history["loss"][-20:].mean() < result.history["loss"][:20].mean()


def test_equal_settings_share_one_compiled_program_whatever_objects_carry_them():
    from rnnjax.app.tasks import task_settings, train_task
    from rnnjax.training.fit import _program

    before = _program.cache_info()
    for seed in (0, 1, 2):  # a settings dict, a model, a draw and a watch built anew each time
        train_task("count", seed=seed, settings=task_settings("count", steps=3, lr=0.05))
    after = _program.cache_info()
    assert after.misses - before.misses == 1 and after.hits - before.hits >= 2


def test_what_is_not_a_model_an_optimizer_or_data_is_refused_naming_it():
    from rnnjax import InputError

    batch = count_batch(jax.random.key(0), 8, 5)
    for kwargs, name in [({"model": RunningCount}, "model"), ({"optimizer": optax.adam}, "optimizer"),
                         ({"data": (batch.xs, batch.lengths)}, "data"), ({"data": lambda key: batch.xs}, "data")]:
        arguments = {"model": RunningCount(), "optimizer": ADAM, "data": batch, **kwargs}
        with pytest.raises(InputError, match=rf"^{name} must (be|give)") as error:
            fit(arguments["model"], arguments["optimizer"], arguments["data"], seed=0, max_steps=2)
        assert error.value.name == name
    with pytest.raises(InputError, match=r"^key must be one JAX random key"):
        count_batch(0, 8, 5)
    with pytest.raises(InputError, match=r"^batch_size x length must be"):
        count_batch(jax.random.key(0), 2**20, 2**20)
