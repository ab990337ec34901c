"""rnnjax.rnn against a float64 NumPy loop, masking, both methods, and bad input."""

import chex
import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from reference import numpy_rnn

from rnnjax import ReLUCell, rnn
from rnnjax.core import checks
from rnnjax.core.masking import length_mask

METHODS = ("sequential", "parallel")


def draw_case(seed, batch, time, features, diagonal=False, initial=False):
    """Random inputs, lengths (0 and full always among them), weights of both signs."""
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(batch, time, 2)).astype(np.float32)
    lengths = rng.integers(0, time + 1, size=batch)
    lengths[0], lengths[-1] = 0, time
    w_ih = rng.uniform(-1.2, 1.2, size=(2, features)).astype(np.float32)
    shape = (features,) if diagonal else (features, features)
    w_hh = rng.uniform(-1.2, 1.2, size=shape).astype(np.float32)
    h0 = rng.uniform(0, 2, size=(batch, features)).astype(np.float32) if initial else None
    params = {"params": {"W_ih": jnp.asarray(w_ih), "W_hh": jnp.asarray(w_hh)}}
    return ReLUCell(features, diagonal=diagonal), params, xs, lengths, h0


# jitted so that repeated shapes reuse compiled code and the tests stay fast
_rnn = jax.jit(rnn, static_argnames=("cell", "method"))


def run(cell, params, xs, lengths, h0, method):
    h0 = None if h0 is None else jnp.asarray(h0)
    lengths = None if lengths is None else jnp.asarray(lengths)
    return _rnn(cell, params, jnp.asarray(xs), lengths, initial_state=h0, method=method)


# A few fixed shapes, (batch, time, features): each compiles once; hypothesis varies the values,
# lengths, weights and initial states, which the jitted functions take as traced arguments.
SHAPES = [(4, 17, 3), (2, 1, 1), pytest.param(3, 40, 1, marks=pytest.mark.slow)]


@pytest.mark.parametrize("batch, time, features", SHAPES)
@given(seed=st.integers(0, 2**32 - 1), initial=st.booleans())
def test_sequential_matches_numpy(batch, time, features, seed, initial):
    cell, params, xs, lengths, h0 = draw_case(seed, batch, time, features, initial=initial)
    final_state, states = run(cell, params, xs, lengths, h0, "sequential")
    expected = numpy_rnn(params["params"]["W_ih"], params["params"]["W_hh"], xs, lengths, h0)
    chex.assert_shape(final_state, (batch, features))
    chex.assert_shape(states, (batch, time, features))
    chex.assert_trees_all_close((final_state, states), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch, time, features", SHAPES)
@given(seed=st.integers(0, 2**32 - 1), initial=st.booleans())
def test_parallel_matches_numpy_and_sequential(batch, time, features, seed, initial):
    diagonal = features > 1  # the parallel method takes scalar and diagonal cells
    cell, params, xs, lengths, h0 = draw_case(seed, batch, time, features, diagonal, initial)
    parallel = run(cell, params, xs, lengths, h0, "parallel")
    expected = numpy_rnn(params["params"]["W_ih"], params["params"]["W_hh"], xs, lengths, h0)
    chex.assert_trees_all_close(parallel, expected, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(parallel, run(cell, params, xs, lengths, h0, "sequential"),
                                rtol=1e-5, atol=1e-5)


def loss(params, xs, h0, lengths, cell, method):
    """A loss that touches every output: the final state and a nonlinear function of all states."""
    final_state, states = rnn(cell, params, xs, lengths, initial_state=h0, method=method)
    return jnp.sum(final_state**2) + jnp.sum(jnp.sin(states))


grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnames=("cell", "method"))


@pytest.mark.parametrize("time, diagonal", [pytest.param(30, False, marks=pytest.mark.slow), (9, True)])
@given(seed=st.integers(0, 2**32 - 1))
def test_parallel_gradients_match_the_float64_loop(time, diagonal, seed):
    """Against the loop in float64, not the float32 loop: each float32 method can be within the
    tolerance of exact and twice it from the other (seed 1,989,764,020, T = 30: d/dW_hh 35.13070
    parallel, 35.13157 sequential, 35.13119 exact)."""
    cell, params, xs, lengths, h0 = draw_case(seed, 4, time, 3 if diagonal else 1, diagonal, True)
    args = (params, jnp.asarray(xs), jnp.asarray(h0), jnp.asarray(lengths), cell)
    with jax.enable_x64(True):
        args64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), args[:3])
        exact = jax.tree.map(np.asarray, grads(*args64, *args[3:], method="sequential"))
    chex.assert_trees_all_close(grads(*args, method="parallel"),
                                jax.tree.map(lambda a: a.astype(np.float32), exact),
                                rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("method", METHODS)
def test_states_are_zero_and_final_state_frozen_past_each_length(method):
    cell, params, xs, lengths, _ = draw_case(0, 6, 12, 1)
    final_state, states = run(cell, params, xs, lengths, None, method)
    for b, length in enumerate(lengths):
        assert np.all(np.asarray(states[b, length:]) == 0)
        expected = states[b, length - 1] if length else jnp.zeros(1)
        chex.assert_trees_all_equal(final_state[b], expected)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("padding", [np.nan, 1e30, -np.inf])
def test_padding_changes_neither_results_nor_gradients(method, padding):
    cell, params, xs, lengths, h0 = draw_case(1, 5, 9, 1, initial=True)
    mask = np.arange(9)[None] < lengths[:, None]
    padded = np.where(mask[..., None], xs, padding).astype(np.float32)
    args = (jnp.asarray(h0), jnp.asarray(lengths), cell)
    for fn in (lambda p, x: run(cell, p, x, lengths, h0, method),
               lambda p, x: grads(p, x, *args, method=method)):
        clean, dirty = fn(params, jnp.asarray(xs)), fn(params, jnp.asarray(padded))
        chex.assert_tree_all_finite(dirty)
        chex.assert_trees_all_equal(clean, dirty)


class DenseThenRNN(nn.Module):
    """A dense layer in front of ``rnn``: it sees the padding, unless ``zero_padding`` zeroes it."""

    zero_padding: bool

    @nn.compact
    def __call__(self, xs, lengths):
        if self.zero_padding:  # the README's one line
            xs = jnp.where(length_mask(lengths, xs.shape[1])[..., None], xs, 0)
        units = nn.relu(nn.Dense(2, use_bias=False)(xs))
        cell = ReLUCell(features=1)
        weights = self.param("cell", lambda key: cell.init(key, jnp.zeros((1, 1)), units[:1, 0])["params"])
        final_state, _ = rnn(cell, {"params": weights}, units, lengths)
        return final_state[:, 0]


def test_a_layer_in_front_of_rnn_needs_the_padding_zeroed_first():
    # rnn's promise covers its own inputs: a layer before it computes on the padding, and a NaN
    # there makes its kernel's gradient NaN (0 * NaN), though rnn's outputs are right
    _, _, xs, lengths, _ = draw_case(3, 5, 9, 1)
    mask = np.arange(9)[None] < lengths[:, None]
    nan_padded, zero_padded = (jnp.asarray(np.where(mask[..., None], xs, p), jnp.float32) for p in (np.nan, 0.0))
    lengths = jnp.asarray(lengths)

    def kernel_grad(model, xs):  # and the outputs
        variables = model.init(jax.random.key(0), zero_padded, lengths)
        grads = jax.grad(lambda v: jnp.sum(model.apply(v, xs, lengths) ** 2))(variables)
        return grads["params"]["Dense_0"]["kernel"], model.apply(variables, xs, lengths)

    bare, masked = DenseThenRNN(zero_padding=False), DenseThenRNN(zero_padding=True)
    grad, out = kernel_grad(bare, nan_padded)
    assert bool(jnp.isnan(grad).all())
    chex.assert_trees_all_equal(out, kernel_grad(bare, zero_padded)[1])  # the outputs ignore the padding
    grad, out = kernel_grad(masked, nan_padded)
    chex.assert_tree_all_finite(grad)
    chex.assert_trees_all_equal((grad, out), kernel_grad(bare, zero_padded))


def test_lengths_none_means_full_and_jit_needs_no_retrace():
    cell, params, xs, _, _ = draw_case(2, 3, 7, 2)
    full = jnp.full((3,), 7)
    chex.assert_trees_all_equal(run(cell, params, xs, None, None, "sequential"),
                                run(cell, params, xs, full, None, "sequential"))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(xs, lengths):
        return rnn(cell, params, xs, lengths)

    for seed in range(3):
        _, _, xs, lengths, _ = draw_case(seed, 3, 7, 2)
        chex.assert_trees_all_close(forward(xs, lengths),
                                    run(cell, params, xs, lengths, None, "sequential"))


@pytest.mark.slow
def test_parallel_is_accurate_on_a_million_steps():
    """Tree-order evaluation keeps float32 within 1e-6 of the float64 L1 norm at T = 1e6."""
    xs = np.abs(np.random.default_rng(3).normal(size=(1, 10**6, 1))).astype(np.float32)
    params = {"params": {"W_ih": jnp.ones((1, 1)), "W_hh": jnp.ones((1, 1))}}
    final_state, _ = run(ReLUCell(1), params, xs, None, None, "parallel")
    exact = xs.astype(np.float64).sum()
    assert abs(float(final_state[0, 0]) - exact) / exact < 1e-6


CELL = ReLUCell(1)
PARAMS = {"params": {"W_ih": jnp.ones((1, 1)), "W_hh": jnp.ones((1, 1))}}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"xs": jnp.ones((3,))}, ValueError, r"\(\*batch, time, features\); received shape \(3,\)"),
        ({"xs": jnp.ones((2, 3))}, ValueError, r"xs of shape \(2, 3\).* xs\[\.\.\., None\]"),
        ({"xs": jnp.ones((2, 3, 1, 2))}, ValueError, r"expected weights .*'W_ih': \(2, 1\).*received .*\(1, 1\)"),
        ({"xs": jnp.ones((0, 3, 1))}, ValueError, r"at least one sequence .* \(0, 3, 1\)"),
        ({"xs": jnp.ones((2, 0, 1))}, ValueError, r"one time step; received shape \(2, 0, 1\)"),
        ({"xs": jnp.ones((2, 3, 1), jnp.int32)}, TypeError, r"floating-point .* received dtype int32"),
        ({"lengths": jnp.array([1, 2, 3])}, ValueError, r"shape \(batch,\) = \(2,\) .* received shape \(3,\)"),
        ({"lengths": jnp.array([[1, 2]])}, ValueError, r"received shape \(1, 2\)"),
        ({"xs": jnp.ones((2, 4, 3, 1)), "lengths": jnp.array([1, 2])}, ValueError,
         r"shape \(\*batch,\) = \(2, 4\) .* received shape \(2,\)"),
        ({"lengths": jnp.array([1.0, 2.0])}, TypeError, r"integers; received dtype float32"),
        ({"lengths": jnp.array([1, 4])}, ValueError, r"\[0, 3\] .* from 1 to 4"),
        ({"lengths": jnp.array([-1, 2])}, ValueError, r"\[0, 3\] .* from -1 to 2"),
        ({"initial_state": jnp.ones((2, 2))}, ValueError, r"\(2, 1\); received shape \(2, 2\)"),
        ({"method": "fast"}, ValueError, r"one of \('sequential', 'parallel', 'auto'\); received 'fast'"),
    ],
)
def test_bad_input_names_expected_and_received(kwargs, error, match):
    args = {"xs": jnp.ones((2, 3, 1)), "lengths": None, **kwargs}
    with pytest.raises(error, match=match):
        rnn(CELL, PARAMS, args.pop("xs"), args.pop("lengths"), **args)


def test_parallel_refuses_a_full_recurrent_matrix():
    cell = ReLUCell(3)
    params = cell.init(jax.random.key(0), jnp.zeros((1, 3)), jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"full 3x3 matrix. Use method='sequential'"):
        rnn(cell, params, jnp.ones((1, 4, 2)), method="parallel")
    rnn(cell, params, jnp.ones((1, 4, 2)), method="auto")  # auto falls back to sequential


def test_any_flax_cell_with_an_array_carry_runs_sequentially_with_masking():
    cell = nn.SimpleCell(3, activation_fn=nn.relu)
    xs = jax.random.normal(jax.random.key(0), (2, 5, 2))
    params = cell.init(jax.random.key(1), jnp.zeros((2, 3)), xs[:, 0])
    final_state, states = rnn(cell, params, xs, jnp.array([5, 2]), method="sequential")
    _, full = rnn(cell, params, xs[1:, :2])
    chex.assert_trees_all_close(final_state[1:], full[:, -1])
    chex.assert_trees_all_equal(states[1, 2:], jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="needs a ReLUCell; received SimpleCell"):
        rnn(cell, params, xs, method="parallel")


@pytest.mark.slow
@given(seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1.5, 2.0, 3.0]))
def test_parallel_stays_exact_when_long_spans_of_weights_overflow(seed, scale):
    """W_hh < -1 over 300 steps: span slopes like 2**300 overflow float32, while the loop's
    states stay finite because the ReLU keeps resetting them (a negative weight sends every
    large state to 0). Both methods must agree. (For W_hh > 1 the loop's own states overflow:
    outside the domain, see rnnjax.core.parallel.)"""
    rng = np.random.default_rng(seed)
    w_hh = np.float32(-scale)
    xs = rng.normal(size=(3, 300, 1)).astype(np.float32) - 0.5
    lengths = np.array([300, 171, 0])
    params = {"params": {"W_ih": jnp.ones((1, 1)), "W_hh": jnp.full((1, 1), w_hh)}}
    h0 = rng.uniform(0, 1, size=(3, 1)).astype(np.float32)
    expected = numpy_rnn(params["params"]["W_ih"], params["params"]["W_hh"], xs, lengths, h0)
    assume(all(np.isfinite(e).all() and np.abs(e).max() < 1e30 for e in expected))  # the loop in range
    parallel = run(ReLUCell(1), params, xs, lengths, h0, "parallel")
    chex.assert_tree_all_finite(parallel)
    chex.assert_trees_all_close(parallel, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["sequential", pytest.param("parallel", marks=pytest.mark.slow)])
def test_lengths_of_any_integer_type(method):
    cell, params, xs, _, _ = draw_case(4, 2, 300, 1)
    expected = numpy_rnn(params["params"]["W_ih"], params["params"]["W_hh"], xs, np.array([100, 127]))
    for dtype in (np.int8, np.uint8, np.int16, np.int64, np.uint32):
        lengths = np.array([100, 127], dtype)
        chex.assert_trees_all_equal(checks.lengths(lengths, 2, 300), jnp.array([100, 127], jnp.int32))
    chex.assert_trees_all_close(rnn(cell, params, jnp.asarray(xs), np.array([100, 127], np.uint8), method=method),
                                expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_traced_64_bit_lengths_beyond_int32_clip_instead_of_wrapping(method):
    # Under jit the values are unknown: below 0 acts as 0, above time as time, as documented;
    # cast to int32 first, -2**32 + 3 would wrap to 3 and 2**32 + 2 to 2.
    params = {"params": {"W_ih": jnp.ones((1, 1)), "W_hh": jnp.ones((1, 1))}}
    with jax.enable_x64(True):
        lengths = jnp.array([-2**32 + 3, -2**31 - 1, 2**32 + 2, 5], jnp.int64)
        final_state = jax.jit(lambda n: rnn(CELL, params, jnp.ones((4, 6, 1)), n, method=method)[0])(lengths)
    chex.assert_trees_all_equal(final_state[:, 0], jnp.array([0.0, 0.0, 6.0, 5.0]))


def test_lengths_too_large_for_int32_are_refused_not_wrapped():
    with pytest.raises(ValueError, match=r"\[0, 3\] .* from 2 to 4294967298"):
        rnn(CELL, PARAMS, jnp.ones((2, 3, 1)), np.array([2, 2**32 + 2]))


@pytest.mark.parametrize("method", METHODS)
def test_a_sequence_of_length_zero_keeps_its_initial_state(method):
    cell, params, xs, _, h0 = draw_case(5, 3, 4, 1, initial=True)
    final_state, states = run(cell, params, xs, np.array([0, 4, 0]), h0, method)
    chex.assert_trees_all_equal(final_state[np.array([0, 2])], jnp.asarray(h0)[np.array([0, 2])])
    chex.assert_trees_all_equal(states[0], jnp.zeros((4, 1)))


@pytest.mark.parametrize("method", METHODS)
def test_low_precision_inputs_run_in_the_weights_precision(method):
    xs = jnp.ones((2, 4, 1), jnp.bfloat16)
    final_state, states = rnn(CELL, PARAMS, xs, initial_state=jnp.zeros((2, 1), jnp.bfloat16),
                              method=method)
    assert final_state.dtype == states.dtype == jnp.float32
    chex.assert_trees_all_equal(final_state, jnp.full((2, 1), 4.0))
