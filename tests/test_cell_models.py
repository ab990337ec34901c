"""ReLUCell and the two seed models."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import numpy_rnn

from rnnjax import L1Norm, L1NormLearned, ReLUCell, RunningCount, rnn


def test_cell_has_two_random_weights_and_no_bias():
    cell = ReLUCell(3)
    carry = cell.initialize_carry(jax.random.key(0), (4, 2))
    chex.assert_trees_all_equal(carry, jnp.zeros((4, 3)))
    one, two = (cell.init(jax.random.key(k), carry, jnp.ones((4, 2)))["params"] for k in (1, 2))
    assert set(one) == {"W_ih", "W_hh"}
    chex.assert_shape([one["W_ih"], one["W_hh"]], [(2, 3), (3, 3)])
    assert not np.allclose(one["W_ih"], two["W_ih"])
    bound = 1 / np.sqrt(3)
    assert all(np.abs(np.asarray(w)).max() <= bound for w in one.values())


def test_cell_step_is_relu_of_two_products_and_returns_carry_twice():
    cell = ReLUCell(2, diagonal=True)
    x, h = jnp.array([[1.0, -2.0, 0.5]]), jnp.array([[0.3, 2.0]])
    variables = cell.init(jax.random.key(0), h, x)
    w = variables["params"]
    chex.assert_shape(w["W_hh"], (2,))
    new_carry, output = cell.apply(variables, h, x)
    chex.assert_trees_all_equal(new_carry, output)
    expected = np.maximum(0, np.asarray(x) @ w["W_ih"] + np.asarray(h) * w["W_hh"])
    chex.assert_trees_all_close(new_carry, expected, rtol=1e-6)


def test_cell_works_inside_flax_nn_rnn():
    xs = jax.random.normal(jax.random.key(0), (2, 6, 1))
    layer = nn.RNN(ReLUCell(1))
    variables = layer.init(jax.random.key(1), xs)
    cell_params = {"params": variables["params"]["cell"]}
    chex.assert_trees_all_close(layer.apply(variables, xs), rnn(ReLUCell(1), cell_params, xs)[1])


def ones(model, xs, lengths=None):
    variables = model.init(jax.random.key(0), xs, lengths)
    return jax.tree.map(jnp.ones_like, variables)


@pytest.mark.parametrize("method", ["sequential", pytest.param("parallel", marks=pytest.mark.slow)])
def test_l1norm_with_unit_weights_is_the_l1_norm(method):
    model = L1Norm(method=method)
    xs = jnp.array([[3.0, -5.0, 7.0, -2.0, 99.0], [1.5, -0.5, np.nan, 0.0, 0.0]])
    lengths = jnp.array([4, 2])
    out = model.apply(ones(model, xs, lengths), xs, lengths)
    chex.assert_shape(out, (2,))
    chex.assert_trees_all_close(out, jnp.array([17.0, 2.0]))
    chex.assert_trees_all_close(model.apply(ones(model, xs, lengths), xs[..., None], lengths), out)


def test_l1norm_matches_numpy_for_random_weights():
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(5, 8)).astype(np.float32)
    lengths = np.array([0, 1, 4, 8, 6])
    variables = L1Norm().init(jax.random.key(0), xs, lengths)
    w = variables["params"]["cell"]
    _, states = numpy_rnn(w["W_ih"], w["W_hh"], np.abs(xs)[..., None], lengths)
    expected = [states[b, n - 1, 0] if n else 0.0 for b, n in enumerate(lengths)]
    chex.assert_trees_all_close(L1Norm().apply(variables, xs, lengths), np.array(expected),
                                rtol=1e-5, atol=1e-6)


def test_running_count_outputs_every_step_and_zero_past_lengths():
    model = RunningCount()
    xs = jnp.array([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    out = model.apply(ones(model, xs), xs, jnp.array([4, 2]))
    chex.assert_shape(out, (2, 4))
    chex.assert_trees_all_equal(out, jnp.array([[1.0, 1.0, 2.0, 3.0], [0.0, 1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("model", [L1Norm(), RunningCount()])
@pytest.mark.parametrize(
    "xs, error, match",
    [
        (jnp.ones((2, 3, 2)), ValueError, r"\(batch, time\) or \(batch, time, 1\); received shape \(2, 3, 2\)"),
        (jnp.ones((3,)), ValueError, r"received shape \(3,\)"),
        (jnp.ones((2, 3), jnp.int32), TypeError, r"floating-point array; received dtype int32"),
        (jnp.ones((2, 3), bool), TypeError, r"received dtype bool"),
        (jnp.ones((2, 0)), ValueError, r"one time step; received shape \(2, 0\)"),
    ],
)
def test_models_reject_bad_input(model, xs, error, match):
    with pytest.raises(error, match=match):
        model.init(jax.random.key(0), xs)


def test_models_reject_an_unknown_method():
    with pytest.raises(ValueError, match="received 'quick'"):
        L1Norm(method="quick").init(jax.random.key(0), jnp.ones((1, 3)))


@pytest.mark.parametrize("model, method", [(model, method) for model in (L1Norm, RunningCount, L1NormLearned)
                                           for method in ("sequential", "parallel")
                                           if model is L1NormLearned or method == "sequential"]
                         + [pytest.param(L1Norm, "parallel", marks=pytest.mark.slow),
                            pytest.param(RunningCount, "parallel", marks=pytest.mark.slow)])
def test_outputs_and_gradients_do_not_depend_on_the_padding(model, method):
    """Whatever the padding holds (NaN and infinities included), every model's outputs and its
    gradients with respect to every weight and every input are the same, bit for bit."""
    model = model(method=method)
    xs = np.random.default_rng(0).standard_normal((3, 12)).astype(np.float32)
    lengths = jnp.array([12, 4, 0])
    padding = np.arange(12)[None] >= np.asarray(lengths)[:, None]
    variables = model.init(jax.random.key(3), jnp.asarray(xs), lengths)

    def loss(variables, xs):
        return jnp.sum(jnp.sin(model.apply(variables, xs, lengths)))

    outputs_and_gradients = jax.jit(lambda v, x: (model.apply(v, x, lengths), jax.grad(loss, argnums=(0, 1))(v, x)))
    results = [outputs_and_gradients(variables, np.where(padding, np.float32(fill), xs))
               for fill in (0.0, np.nan, np.inf, -np.inf, 1e30)]
    chex.assert_tree_all_finite(results[0])
    for result in results[1:]:
        chex.assert_trees_all_equal(result, results[0])


@pytest.mark.parametrize("model", [L1Norm, L1NormLearned, RunningCount])
def test_variables_without_the_models_weights_are_refused_quoting_both(model):
    xs = jnp.ones((2, 5))
    variables = model().init(jax.random.key(0), xs)
    shapes = {f"cell/{k}": tuple(v.shape) for k, v in sorted(variables["params"]["cell"].items())}
    if model is L1NormLearned:
        shapes["dense/kernel"] = (1, 2)
    cell = variables["params"]["cell"]
    wrong = [({"params": {}}, {}), ({"params": {"cell": {"W_ih": cell["W_ih"]}}},
                                             {"cell/W_ih": tuple(cell["W_ih"].shape)}),
             ({"params": {**variables["params"], "cell": {**cell, "W_hh": jnp.ones((2, 2))}}},
              {**shapes, "cell/W_hh": (2, 2)})]
    name = model.__name__
    for given, received in wrong:
        message = (f"{name} variables do not fit: expected weights {shapes}; received "
                   f"{dict(sorted(received.items()))}. Pass what {name}().init returns.")
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            model().apply(given, xs)
    with pytest.raises(TypeError, match=rf"^{name} variables must be floating point; received int32 for cell/W_hh"):
        model().apply(jax.tree.map(lambda w: w.astype(jnp.int32), variables), xs)
    with pytest.raises(ValueError, match=rf"^{name} variables must be the variables init returns, \{{'params': "
                                         rf"\{{\.\.\.\}}\}}; received a dict with keys "
                                         rf"\[{', '.join(repr(k) for k in sorted(variables['params']))}\]\. Weights "
                                         r"alone go in as \{'params': weights\}\."):
        model().apply(variables["params"], xs)
    for given, received in ((None, "NoneType"), ([1.0], "list"), ({}, "a dict with keys \\[\\]")):
        with pytest.raises(TypeError, match=rf"^{name} variables must be the variables init returns, "
                                            rf"\{{'params': \{{\.\.\.\}}\}}; received {received}\."):
            model().apply(given, xs)


@pytest.mark.parametrize("kwargs, message", [
    ({"features": 0}, "features must be a positive integer; received 0."),
    ({"features": 1.5}, "features must be a positive integer; received 1.5."),
    ({"features": 2, "param_dtype": jnp.int32}, "param_dtype must be a floating-point dtype"),
])
def test_a_cell_of_no_features_or_integer_weights_is_refused_when_made(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        ReLUCell(**kwargs)
