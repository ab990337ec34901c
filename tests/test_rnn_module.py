"""rnnjax.RNN beyond flax's own tests: the parallel method against a float64 loop in every option
combination, masked gradients equal to nn.RNN's, jit with traced lengths, vmap, dtypes, and
bad input."""

import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import numpy_rnn

from rnnjax import RNN, InputError, ReLUCell

TIME, IN = 6, 2
CELLS = {"scalar": ReLUCell(1), "diagonal": ReLUCell(3, diagonal=True)}


def relu_variables(name, seed):
    """Weights of both signs, some of them past 1 in magnitude."""
    cell = CELLS[name]
    keys = jax.random.split(jax.random.key(seed))
    w_hh_shape = (cell.features,) if cell.diagonal else (1, 1)
    return {"params": {"cell": {"W_ih": jax.random.normal(keys[0], (IN, cell.features)),
                                "W_hh": jax.random.uniform(keys[1], w_hh_shape, minval=-1.3, maxval=1.3)}}}


def padded_inputs(batch_shape, seed):
    """Inputs ``(*batch, time, in)`` with NaN past each length, and lengths from 0 to TIME."""
    keys = jax.random.split(jax.random.key(seed))
    lengths = jax.random.randint(keys[0], batch_shape, 0, TIME + 1).at[(0,) * len(batch_shape)].set(TIME)
    xs = 3 * jax.random.normal(keys[1], (*batch_shape, TIME, IN))
    return jnp.where((jnp.arange(TIME) < lengths[..., None])[..., None], xs, jnp.nan), lengths


def flip(array, lengths):
    """Reverses each sequence ``(batch, time, ...)`` within its length, in NumPy."""
    flipped = array.copy()
    for b, n in enumerate(lengths):
        flipped[b, :n] = array[b, :n][::-1]
    return flipped


def reference(variables, xs, lengths, *, reverse, keep_order):
    """The float64 loop, each sequence alone; ``reverse`` runs it from its last real step."""
    weights = variables["params"]["cell"]
    batch_shape = lengths.shape
    xs = np.asarray(xs, np.float64).reshape(-1, TIME, IN)
    lengths = np.asarray(lengths).reshape(-1)
    final_state, states = numpy_rnn(weights["W_ih"], weights["W_hh"], flip(xs, lengths) if reverse else xs, lengths)
    if reverse and keep_order:
        states = flip(states, lengths)
    return final_state.reshape(*batch_shape, -1), states.reshape(*batch_shape, TIME, -1)


COMBINATIONS = list(itertools.product(CELLS, [(4,), (2, 3)], *[(False, True)] * 4))


def check_both_methods(cell_name, batch_shape, reverse, keep_order, time_major, return_carry, seed=0):
    variables = relu_variables(cell_name, seed)
    xs, lengths = padded_inputs(batch_shape, seed)
    expected_carry, expected = reference(variables, xs, lengths, reverse=reverse, keep_order=keep_order)
    if time_major:
        xs, expected = jnp.moveaxis(xs, len(batch_shape), 0), np.moveaxis(expected, len(batch_shape), 0)
    for method in ("sequential", "parallel"):
        layer = RNN(CELLS[cell_name], method=method, reverse=reverse, keep_order=keep_order,
                    time_major=time_major, return_carry=return_carry)
        result = layer.apply(variables, xs, seq_lengths=lengths)
        carry, outputs = result if return_carry else (expected_carry, result)
        chex.assert_shape(outputs, expected.shape)
        chex.assert_trees_all_close((carry, outputs), (expected_carry, expected), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("combination", [("diagonal", (2, 3), True, True, True, True)], ids=str)
def test_parallel_and_sequential_equal_the_float64_loop(combination):
    check_both_methods(*combination)


@pytest.mark.slow
@pytest.mark.parametrize("combination", COMBINATIONS, ids=str)
def test_parallel_and_sequential_equal_the_float64_loop_in_every_combination(combination):
    """cell x batch axes x reverse x keep_order x time_major x return_carry, both methods."""
    check_both_methods(*combination, seed=len(str(combination)))


@pytest.mark.parametrize("cell", [ReLUCell(3, diagonal=True), nn.LSTMCell(3), pytest.param(nn.GRUCell(3), marks=pytest.mark.slow)],
                         ids=lambda cell: type(cell).__name__)
def test_masked_gradients_equal_flax_and_ignore_nan_padding(cell):
    """The loss sees the real steps only: nn.RNN's gradient then equals ours on zero padding,
    and ours is the same on NaN padding (nn.RNN's is NaN there)."""
    xs, lengths = padded_inputs((4,), seed=1)
    zero_padded = jnp.nan_to_num(xs, nan=0.0)
    real = (jnp.arange(TIME) < lengths[:, None])[..., None]
    variables = nn.RNN(cell).init(jax.random.key(0), zero_padded, seq_lengths=lengths)

    def loss(layer, variables, xs):
        carry, outputs = layer.apply(variables, xs, seq_lengths=lengths)
        return jnp.sum(jnp.where(real, outputs, 0) ** 2) + sum(jnp.sum(c) for c in jax.tree.leaves(carry))

    grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
    ours = RNN(cell, return_carry=True)
    expected = grad(nn.RNN(cell, return_carry=True), variables, zero_padded)
    chex.assert_trees_all_close(grad(ours, variables, zero_padded), expected, rtol=1e-5, atol=1e-6)
    on_nan = grad(ours, variables, xs)
    chex.assert_trees_all_close(on_nan[0], expected[0], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(jnp.where(real, on_nan[1], 0), jnp.where(real, expected[1], 0), rtol=1e-5, atol=1e-6)
    assert not jnp.any(on_nan[1][~real[..., 0]])  # padding's gradient is 0, not NaN


@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_jit_with_traced_lengths_compiles_once(method):
    layer = RNN(ReLUCell(3, diagonal=True), method=method)
    variables = relu_variables("diagonal", 0)
    xs = jnp.nan_to_num(padded_inputs((4,), 0)[0])  # every step real for some lengths below

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(variables, xs, lengths):
        return layer.apply(variables, xs, seq_lengths=lengths)

    chex.clear_trace_counter()
    for lengths in ([6, 0, 3, 1], [1, 2, 3, 4], [6, 6, 6, 6]):
        lengths = jnp.array(lengths)
        expected = reference(variables, xs, lengths, reverse=False, keep_order=False)[1]
        chex.assert_trees_all_close(apply(variables, xs, lengths), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_vmap_over_a_leading_axis_equals_a_second_batch_axis():
    layer = RNN(ReLUCell(3, diagonal=True), method="parallel", return_carry=True)
    variables = relu_variables("diagonal", 2)
    xs, lengths = padded_inputs((2, 3), 2)
    mapped = jax.vmap(lambda x, n: layer.apply(variables, x, seq_lengths=n))(xs, lengths)
    chex.assert_trees_all_close(mapped, layer.apply(variables, xs, seq_lengths=lengths), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_float64_matches_the_loop_to_float64_rounding(method):
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda w: w.astype(jnp.float64), relu_variables("diagonal", 3))
        xs, lengths = padded_inputs((4,), 3)
        xs = xs.astype(jnp.float64)
        carry, outputs = RNN(ReLUCell(3, diagonal=True, param_dtype=jnp.float64), method=method,
                             return_carry=True).apply(variables, xs, seq_lengths=lengths)
        assert carry.dtype == outputs.dtype == jnp.float64
        expected = reference(variables, xs, lengths, reverse=False, keep_order=False)
        chex.assert_trees_all_close((carry, outputs), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make_cell", [lambda dtype: ReLUCell(3, diagonal=True, dtype=dtype, param_dtype=dtype),
                                       lambda dtype: nn.GRUCell(3, dtype=dtype, param_dtype=dtype)],
                         ids=["ReLUCell", "GRUCell"])
def test_a_bfloat16_cell_returns_bfloat16_as_under_nn_rnn(make_cell):
    cell = make_cell(jnp.bfloat16)
    xs, lengths = padded_inputs((4,), 4)
    xs = jnp.nan_to_num(xs)
    # drawn in float32 (flax's orthogonal init has no bfloat16), then cast
    variables = nn.RNN(make_cell(jnp.float32)).init(jax.random.key(0), xs, seq_lengths=lengths)
    variables = jax.tree.map(lambda w: w.astype(jnp.bfloat16), variables)
    real = (jnp.arange(TIME) < lengths[:, None])[..., None]
    expected_carry, expected = nn.RNN(cell, return_carry=True).apply(variables, xs, seq_lengths=lengths)
    methods = ("sequential", "parallel") if isinstance(cell, ReLUCell) else ("sequential",)
    for method in methods:
        carry, outputs = RNN(cell, method=method, return_carry=True).apply(variables, xs, seq_lengths=lengths)
        assert jax.tree.leaves(carry)[0].dtype == outputs.dtype == jnp.bfloat16
        # bfloat16 keeps 8 bits: the two loops round alike, the parallel scan (float32 inside) better
        chex.assert_trees_all_close(outputs.astype(jnp.float32), jnp.where(real, expected, 0).astype(jnp.float32),
                                    rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("cell", [nn.GRUCell(3, param_dtype=jnp.complex64), nn.SimpleCell(3, param_dtype=jnp.complex64)],
                         ids=lambda cell: type(cell).__name__)
def test_complex_cells_run_sequentially_as_under_nn_rnn(cell):
    xs, lengths = padded_inputs((4,), 5)
    xs = (jnp.nan_to_num(xs) * (1 + 0.5j)).astype(jnp.complex64)
    real = (jnp.arange(TIME) < lengths[:, None])[..., None]
    variables = nn.RNN(cell).init(jax.random.key(0), xs, seq_lengths=lengths)
    expected = nn.RNN(cell).apply(variables, xs, seq_lengths=lengths)
    outputs = RNN(cell).apply(variables, xs, seq_lengths=lengths)  # "auto" takes the loop
    assert outputs.dtype == jnp.complex64
    chex.assert_trees_all_close(outputs, jnp.where(real, expected, 0), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match=r"method='parallel' needs real inputs; received dtype complex64\. "
                                         r"Use method='sequential'\."):
        RNN(ReLUCell(1), method="parallel").init(jax.random.key(0), xs[..., :1])


@pytest.mark.parametrize("arguments, match", [
    ({"inputs": jnp.ones((4,))}, r"^inputs must have shape \(\*batch, time, features\); received shape \(4,\)\."),
    ({"inputs": jnp.ones((4, 6, 1), jnp.int32)}, r"^inputs must be a floating-point or complex array; received dtype int32\."),
    ({"seq_lengths": jnp.ones((2,), jnp.int32)},
     r"^seq_lengths must have shape \(batch,\) = \(4,\) to match inputs; received shape \(2,\)\."),
    ({"seq_lengths": jnp.array([1, 2, 3, 7])}, r"^seq_lengths must lie in \[0, 6\]"),
    ({"initial_carry": jnp.ones((4, 2))}, r"^initial_carry must have shape \(\*batch, features\) = \(4, 1\); "
                                          r"received shape \(4, 2\)\."),
    ({"init_key": 3}, r"^init_key must be one JAX random key, jax\.random\.key\(seed\); received int\."),
    ({"method": "fast"}, r"^method must be one of \('sequential', 'parallel', 'auto'\); received 'fast'\."),
], ids=lambda value: next(iter(value)) if isinstance(value, dict) else "")
def test_bad_input_names_the_argument_and_the_shapes(arguments, match):
    """One error from the boundary; flax's init adds JAX's note on filtered frames after it."""
    arguments = {"inputs": jnp.ones((4, 6, 1)), **arguments}
    layer = RNN(ReLUCell(1), method=arguments.pop("method", "auto"))
    with pytest.raises(InputError, match=match):
        layer.init(jax.random.key(0), arguments.pop("inputs"), **arguments)
