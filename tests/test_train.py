"""The jitted training step and fit: convergence on both seed tasks, stop rules, no retracing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rnnjax import L1Norm, RunningCount
from rnnjax.data import count_batch, l1_batch
from rnnjax.train import fit, init_state, make_train_step, squared_error

LIVE_SEED = 3  # its init has W_ih > 0; seed 0's has W_ih <= 0 (a dead ReLU)


def cell_weights(params):
    w = params["params"]["cell"]
    return float(w["W_ih"][0, 0]), float(w["W_hh"][0, 0])


def test_train_step_never_retraces():
    model, optimizer = L1Norm(), optax.adam(0.1)
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


def test_l1_network_learns_unit_weights_and_generalises():
    batch = l1_batch(jax.random.key(LIVE_SEED), batch_size=8, max_length=10)
    result = fit(L1Norm(), optax.adam(0.1), batch, seed=LIVE_SEED, max_steps=3000,
                 target_weight=1.0, weight_tol=1e-5, progress=False)
    assert result.stop_reason == "weights"
    w_ih, w_hh = cell_weights(result.state.params)
    assert abs(w_ih - 1) < 1e-5 and abs(w_hh - 1) < 1e-5
    assert result.history["weight_error"][-1] < 1e-5 <= result.history["weight_error"][:-1].min()

    # Training on until the weights are exactly 1.0 in float32 (a tolerance below one ulp) is
    # what a 10,000-step sum needs: W_hh one ulp off 1 already costs ~3e-4 relative there.
    result = fit(L1Norm(), optax.adam(0.1), batch, seed=LIVE_SEED, max_steps=3000,
                 target_weight=1.0, weight_tol=1e-9, progress=False)
    assert result.stop_reason == "weights" and cell_weights(result.state.params) == (1.0, 1.0)
    model, params = L1Norm(), result.state.params
    assert float(model.apply(params, jnp.array([[3.0, -5.0, 7.0, -2.0]]))[0]) == pytest.approx(17, abs=1e-4)
    xs = jax.random.normal(jax.random.key(12345), (1, 10_000))
    exact = np.abs(np.asarray(xs, np.float64)).sum()
    predicted = float(jax.jit(model.apply)(params, xs)[0])
    assert abs(predicted - exact) / exact < 1e-5


def test_running_count_network_counts_held_out_sequences():
    batch = count_batch(jax.random.key(LIVE_SEED), batch_size=4, length=5)  # seed 003's size
    result = fit(RunningCount(), optax.adam(0.1), batch, seed=LIVE_SEED, max_steps=3000,
                 target_weight=1.0, weight_tol=1e-6, progress=False)
    assert result.stop_reason == "weights"
    held_out = count_batch(jax.random.key(999), batch_size=4, length=5)
    outputs = RunningCount().apply(result.state.params, held_out.xs)
    chex.assert_trees_all_close(outputs, held_out.targets, atol=1e-3, rtol=0)


def test_dead_relu_is_reported_not_looped_on():
    batch = l1_batch(jax.random.key(0), 8, 10)
    result = fit(L1Norm(), optax.adam(0.1), batch, seed=0, max_steps=10_000,
                 target_weight=1.0, progress=False, sync_every=10)
    w_ih, _ = cell_weights(result.initial_params)
    assert w_ih <= 0 and result.stop_reason == "dead" and result.steps == 10
    assert np.all(result.history["grad_norm"] == 0) and np.all(result.history["loss"] > 0)
    chex.assert_trees_all_equal(result.state.params, result.initial_params)


def test_fit_is_reproducible_and_honours_budget_and_loss_rules():
    kwargs = dict(seed=LIVE_SEED, max_steps=40, progress=False, sync_every=7)
    draw = lambda key: l1_batch(key, 8, 10)  # noqa: E731  a fresh batch every step
    one, two = (fit(L1Norm(), optax.adam(0.1), draw, **kwargs) for _ in range(2))
    assert one.stop_reason == "budget" and one.steps == 40
    chex.assert_trees_all_equal(one.state.params, two.state.params)
    chex.assert_trees_all_equal(one.history, two.history)
    np.testing.assert_array_equal(one.history["step"], np.arange(1, 41))
    loss_tol = float(np.sort(one.history["loss"])[5])
    stopped = fit(L1Norm(), optax.adam(0.1), draw, loss_tol=loss_tol, **kwargs)
    assert stopped.stop_reason == "loss" and stopped.history["loss"][-1] <= loss_tol
    assert np.all(stopped.history["loss"][:-1] > loss_tol)
    chex.assert_trees_all_equal(stopped.history["loss"], one.history["loss"][: stopped.steps])


def test_fit_rejects_a_bad_budget():
    with pytest.raises(ValueError, match="received 0 and 25"):
        fit(L1Norm(), optax.adam(0.1), l1_batch(jax.random.key(0), 2, 3), seed=0, max_steps=0)
