"""L1NormLearned: |x| from a dense layer and ReLUs only, against float64 NumPy; it trains from
random inits and then computes the L1 norm of long sequences with every method."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import numpy_rnn

from rnnjax import L1NormLearned
from rnnjax.training.data import l1_batch
from rnnjax.training.recipes import RECIPES, sweep_recipe

METHODS = ("sequential", "parallel", "auto")


def numpy_learned(variables, xs, lengths):
    """float64: the dense layer and its ReLU, then the cell, each sequence alone."""
    w = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    units = np.maximum(0.0, np.asarray(xs, np.float64)[..., None] * w["dense"]["kernel"][0])
    final, _ = numpy_rnn(w["cell"]["W_ih"], w["cell"]["W_hh"], np.nan_to_num(units), lengths)
    return final[:, 0]


def variables_with(kernel, w_ih, w_hh):
    return {"params": {"dense": {"kernel": jnp.array([kernel], jnp.float32)},
                       "cell": {"W_ih": jnp.array(w_ih, jnp.float32).reshape(2, 1),
                                "W_hh": jnp.array([[w_hh]], jnp.float32)}}}


@pytest.mark.parametrize("method", ["sequential", pytest.param("parallel", marks=pytest.mark.slow),
                                    pytest.param("auto", marks=pytest.mark.slow)])
def test_matches_numpy_and_computes_the_l1_norm_with_unit_slopes(method):
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(5, 9)).astype(np.float32)
    lengths = np.array([0, 1, 4, 9, 6])
    xs[2, 4:] = np.nan  # padding never reaches the result
    model = L1NormLearned(method=method)
    apply = jax.jit(model.apply)
    for seed in range(3):
        variables = model.init(jax.random.key(seed), xs, lengths)
        chex.assert_shape(variables["params"]["dense"]["kernel"], (1, 2))
        chex.assert_shape(variables["params"]["cell"]["W_ih"], (2, 1))
        chex.assert_trees_all_close(apply(variables, xs, lengths), numpy_learned(variables, xs, lengths),
                                    rtol=1e-5, atol=1e-6)
    # one unit for x > 0 and one for x < 0, scaled differently: only the slopes matter
    variables = variables_with([2.0, -0.5], [0.5, 2.0], 1.0)
    slopes = L1NormLearned.function_weights(variables)
    assert {k: float(v) for k, v in slopes.items()} == {"slope_pos": 1.0, "slope_neg": 1.0, "cell/W_hh": 1.0}
    exact = [np.abs(x[:n].astype(np.float64)).sum() for x, n in zip(xs, lengths)]
    chex.assert_trees_all_close(apply(variables, xs, lengths), np.array(exact), rtol=1e-6)


def test_function_weights_match_numpy():
    for seed in range(5):
        variables = L1NormLearned().init(jax.random.key(seed), jnp.ones((1, 3)))
        k = np.asarray(variables["params"]["dense"]["kernel"][0], np.float64)
        w = np.asarray(variables["params"]["cell"]["W_ih"][:, 0], np.float64)
        got = L1NormLearned.function_weights(variables)
        assert float(got["slope_pos"]) == pytest.approx(np.maximum(k, 0) @ w, abs=1e-6)
        assert float(got["slope_neg"]) == pytest.approx(np.maximum(-k, 0) @ w, abs=1e-6)


def test_no_sign_test_touches_the_inputs():
    """The forward pass holds no abs or sign, and compares only integers (step counters with
    lengths): |x| has to come from relu(k x) alone. Plain precision: compensated evaluation's
    error-free transformations compare and take magnitudes of the cell's products and sums (its
    ReLU decides on the pre-activation's sign), never of x."""
    model = L1NormLearned(method="sequential", precision="plain")
    xs, lengths = jnp.ones((2, 5)), jnp.array([5, 3])
    variables = model.init(jax.random.key(0), xs, lengths)
    jaxpr = jax.make_jaxpr(model.apply)(variables, xs, lengths)
    equations = list(_equations(jaxpr.jaxpr))
    names = {e.primitive.name for e in equations}
    assert not names & {"abs", "sign"}
    comparisons = [e for e in equations if e.primitive.name in {"lt", "le", "gt", "ge", "eq", "ne"}]
    assert comparisons and all(jnp.issubdtype(v.aval.dtype, jnp.integer)
                               for e in comparisons for v in e.invars)


def _equations(jaxpr):
    for equation in jaxpr.eqns:
        yield equation
        for value in equation.params.values():  # the bodies of jit, scan, cond, custom_jvp...
            for item in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.slow
def test_trains_from_random_inits_then_computes_long_l1_norms():
    result = sweep_recipe(RECIPES["squared"], L1NormLearned(), lambda key, n: l1_batch(key, n, 10),
                          seeds=8, data_seed=0, watch=L1NormLearned.function_weights)
    converged = result.outcome == "converged"
    initial = result.initial_weights
    both_ways = (initial["slope_pos"] > 0) & (initial["slope_neg"] > 0)
    # an init whose two units face the same way leaves one sign of x with no unit: it stays so
    assert converged[both_ways].mean() >= 0.5
    final = result.final_weights
    assert np.all((final["slope_pos"][~converged] == 0) | (final["slope_neg"][~converged] == 0))
    exact = np.flatnonzero(converged & (final["cell/W_hh"] == 1.0))
    assert exact.size >= 1
    network = RECIPES["squared"].network(L1NormLearned())
    variables = network.transform(jax.tree.map(lambda a: a[exact[0]], result.final_params))
    sequence = jax.random.normal(jax.random.key(12345), (1, 10_000))
    exact_norm = np.abs(np.asarray(sequence, np.float64)).sum()
    for method in METHODS:
        apply = jax.jit(L1NormLearned(method=method).apply)
        assert float(apply(variables, jnp.array([[3.0, -5.0, 7.0, -2.0]]))[0]) == pytest.approx(17, abs=1e-4)
        assert abs(float(apply(variables, sequence)[0]) - exact_norm) / exact_norm < 1e-5
