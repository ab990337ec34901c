"""flax's own ``nn.RNN`` and ``nn.Bidirectional`` tests (flax 0.12, tests/linen/
linen_recurrent_test.py), ported to run against ``rnnjax.RNN``, next to ``nn.RNN`` where a test
compares. All pass as written except the padded outputs, which rnnjax zeroes on purpose."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax import RNN, ReLUCell
from rnnjax.core.recurrence import flip_sequences

BATCH, TIME, IN, OUT = 3, 4, 5, 6


def _cell_params_checked(variables, channels_in, channels_out, bias_size=None):
    for layer_params in variables["params"]["cell"].values():
        if "bias" in layer_params:
            assert layer_params["bias"].shape == (bias_size or channels_out,)
        assert layer_params["kernel"].shape[-2] in [channels_in, channels_out]
        assert layer_params["kernel"].shape[-1] == (bias_size or channels_out)


@pytest.mark.parametrize("batch_dims, unroll", [((10,), None), pytest.param((10, 11), None, marks=pytest.mark.slow),
                                               pytest.param((10,), 10, marks=pytest.mark.slow)])
def test_basic_forward_multiple_batch_dims_and_unroll(batch_dims, unroll):
    layer = RNN(nn.LSTMCell(15), return_carry=True, unroll=unroll)
    xs = jnp.ones((*batch_dims, 40, 5))
    variables = layer.init(jax.random.key(0), xs)
    carry, ys = layer.apply(variables, xs)
    chex.assert_shape(ys, (*batch_dims, 40, 15))
    chex.assert_shape(jax.tree.leaves(carry), [(*batch_dims, 15)] * 2)
    _cell_params_checked(variables, 5, 15)


def test_time_major():
    layer = RNN(nn.LSTMCell(15), time_major=True, return_carry=True)
    xs = jnp.ones((40, 10, 5))
    variables = layer.init(jax.random.key(0), xs)
    carry, ys = layer.apply(variables, xs)
    for leaf in jax.tree.leaves(carry):
        assert not np.allclose(leaf, 0)
        chex.assert_shape(leaf, (10, 15))
    chex.assert_shape(ys, (40, 10, 15))
    _cell_params_checked(variables, 5, 15)


@pytest.mark.slow
def test_spatial_dimensions_conv_lstm():
    layer = RNN(nn.ConvLSTMCell(15, (3, 3)))
    xs = jnp.ones((10, 40, 32, 32, 5))
    variables = layer.init(jax.random.key(0), xs)
    carry, ys = layer.apply(variables, xs, return_carry=True)
    for leaf in jax.tree.leaves(carry):
        assert not np.allclose(leaf, 0)
        assert leaf.shape[:-1] == (10, 32, 32) and leaf.shape[-1] in [5, 15]
    chex.assert_shape(ys, (10, 40, 32, 32, 15))
    _cell_params_checked(variables, 5, 15, bias_size=60)
    reference = nn.RNN(nn.ConvLSTMCell(15, (3, 3))).apply(variables, xs)
    chex.assert_trees_all_close(ys, reference, atol=1e-6)


def _step_by_step(cell, params, xs, carry, order):
    """The cell applied one step at a time in ``order``: flax's reference loop."""
    outputs = {}
    for t in order:
        carry, outputs[t] = cell.apply({"params": params}, carry, xs[:, t])
    return carry, outputs


@pytest.mark.parametrize("cell", [nn.LSTMCell(OUT), nn.GRUCell(OUT), ReLUCell(OUT)],
                         ids=lambda cell: type(cell).__name__)
def test_numerical_equivalence(cell):
    layer = RNN(cell, return_carry=True)
    xs = jax.random.uniform(jax.random.key(1), (BATCH, TIME, IN))
    (carry, ys), variables = layer.init_with_output(jax.random.key(0), xs)
    start = cell.initialize_carry(jax.random.key(0), xs[:, 0].shape)
    cell_carry, outputs = _step_by_step(cell, variables["params"]["cell"], xs, start, range(TIME))
    for t in range(TIME):
        np.testing.assert_allclose(outputs[t], ys[:, t], rtol=1e-5)
    chex.assert_trees_all_close(cell_carry, carry, rtol=1e-5)


def test_numerical_equivalence_with_mask():
    seq_lengths = jax.random.randint(jax.random.key(0), (BATCH,), minval=1, maxval=TIME + 1)
    layer = RNN(nn.LSTMCell(OUT), return_carry=True)
    xs = jnp.ones((BATCH, TIME, IN))
    (carry, ys), variables = layer.init_with_output(jax.random.key(0), xs, seq_lengths=seq_lengths)
    cell_carry = layer.cell.initialize_carry(jax.random.key(0), xs[:, 0].shape)
    carries = []
    for t in range(TIME):
        cell_carry, y = layer.cell.apply({"params": variables["params"]["cell"]}, cell_carry, xs[:, t])
        valid = (t < seq_lengths)[:, None]
        # flax: ys[:, t] == y everywhere; rnnjax: y where the step is real, 0 in the padding
        np.testing.assert_allclose(ys[:, t], np.where(valid, y, 0), rtol=1e-5)
        carries.append(cell_carry)
    for b, length in enumerate(seq_lengths):
        for carry_t, carry_ in zip(carries[int(length) - 1], carry):
            np.testing.assert_allclose(carry_t[b], carry_[b], rtol=1e-5)


@pytest.mark.parametrize("keep_order", [pytest.param(False, marks=pytest.mark.slow), True])
def test_reverse(keep_order):
    layer = RNN(nn.LSTMCell(OUT), return_carry=True, reverse=True, keep_order=keep_order)
    xs = jax.random.uniform(jax.random.key(1), (BATCH, TIME, IN))
    (carry, ys), variables = layer.init_with_output(jax.random.key(0), xs)
    for b in range(BATCH):
        cell_carry = layer.cell.initialize_carry(jax.random.key(0), xs[:1, 0].shape)
        for i in range(TIME):
            cell_carry, y = layer.cell.apply({"params": variables["params"]["cell"]}, cell_carry,
                                             xs[b, TIME - i - 1][None])
            np.testing.assert_allclose(y[0], ys[b, TIME - i - 1 if keep_order else i], rtol=1e-5)
        chex.assert_trees_all_close(cell_carry, jax.tree.map(lambda leaf: leaf[b:b + 1], carry), rtol=1e-5)


def test_single_batch_equals_the_batch():
    layer = RNN(nn.LSTMCell(OUT), return_carry=True)
    xs = jax.random.uniform(jax.random.key(1), (BATCH, TIME, IN))
    (carry, ys), variables = layer.init_with_output(jax.random.key(0), xs)
    for b in range(BATCH):
        carry_b, ys_b = layer.apply(variables, xs[b:b + 1])
        chex.assert_trees_all_close(ys_b[0], ys[b], rtol=1e-6)
        chex.assert_trees_all_close(carry_b, jax.tree.map(lambda leaf: leaf[b:b + 1], carry), rtol=1e-6)


def test_flip_sequences():
    x = jnp.arange(2 * 5 * 3).reshape((2, 5, 3))
    flipped = flip_sequences(x, jnp.array([4, 2]))
    chex.assert_shape(flipped, (2, 5, 3))
    np.testing.assert_array_equal(flipped[0, :4], x[0, :4][::-1])
    np.testing.assert_array_equal(flipped[1, :2], x[1, :2][::-1])
    np.testing.assert_array_equal(flip_sequences(x[..., 0], jnp.array([4, 2]))[1, :2], [18, 15])


def test_basic_seq_lengths():
    xs = jnp.ones((2, 10, 6))
    layer = RNN(nn.LSTMCell(265))
    variables = layer.init(jax.random.key(0), xs)
    ys = layer.apply(variables, xs, seq_lengths=jnp.array([5, 5]))
    assert (ys[:, 5:] == 0).all() and (ys[:, :5] != 0).any()


@pytest.mark.parametrize("shared", [False, True])
def test_bidirectional(shared):
    cell = nn.LSTMCell(OUT)
    layer = nn.Bidirectional(RNN(cell), RNN(cell if shared else nn.LSTMCell(OUT)))
    ys, variables = layer.init_with_output(jax.random.key(0), jnp.ones((BATCH, TIME, IN)))
    chex.assert_shape(ys, (BATCH, TIME, OUT * 2))


def test_bidirectional_custom_merge_and_carry():
    layer = nn.Bidirectional(RNN(nn.LSTMCell(OUT)), RNN(nn.LSTMCell(OUT)), merge_fn=lambda x, y: x + y)
    ys, _ = layer.init_with_output(jax.random.key(0), jnp.ones((BATCH, TIME, IN)))
    chex.assert_shape(ys, (BATCH, TIME, OUT))
    layer = nn.Bidirectional(RNN(nn.LSTMCell(OUT)), RNN(nn.LSTMCell(OUT)), return_carry=True)
    ((forward, backward), ys), _ = layer.init_with_output(jax.random.key(0), jnp.ones((BATCH, TIME, IN)))
    chex.assert_shape(ys, (BATCH, TIME, OUT * 2))
    assert jax.tree.map(jnp.shape, forward) == jax.tree.map(jnp.shape, backward) == ((BATCH, OUT), (BATCH, OUT))


@pytest.mark.parametrize("cell", [ReLUCell(1), pytest.param(ReLUCell(OUT, diagonal=True), marks=pytest.mark.slow),
                                  nn.GRUCell(OUT)],
                         ids=lambda cell: type(cell).__name__ + str(cell.features))
def test_bidirectional_equals_flax_on_real_steps(cell):
    """The same variables in nn.Bidirectional(nn.RNN, nn.RNN) and with rnnjax.RNN: equal outputs
    on the real steps (zeros past them) and equal carries where a sequence is not empty."""
    xs = jax.random.normal(jax.random.key(1), (BATCH, TIME, IN))
    lengths = jnp.array([TIME, 2, 1])
    flax_layer = nn.Bidirectional(nn.RNN(cell), nn.RNN(cell), return_carry=True)
    ours = nn.Bidirectional(RNN(cell), RNN(cell), return_carry=True)
    variables = flax_layer.init(jax.random.key(0), xs, seq_lengths=lengths)
    assert jax.tree.structure(ours.init(jax.random.key(0), xs, seq_lengths=lengths)) == jax.tree.structure(variables)
    expected_carry, expected = flax_layer.apply(variables, xs, seq_lengths=lengths)
    carry, ys = ours.apply(variables, xs, seq_lengths=lengths)
    real = (jnp.arange(TIME)[None] < lengths[:, None])[..., None]
    chex.assert_trees_all_close(ys, jnp.where(real, expected, 0), atol=1e-6)
    chex.assert_trees_all_close(carry, expected_carry, atol=1e-6)


class _DropoutCell(nn.RNNCellBase):
    """A GRU whose input goes through dropout: a cell that needs random numbers at each step."""

    features: int

    @nn.compact
    def __call__(self, carry, x):
        return nn.GRUCell(self.features)(carry, nn.Dropout(0.5, deterministic=False)(x))

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        return nn.GRUCell(self.features, parent=None).initialize_carry(rng, input_shape)

    @property
    def num_feature_axes(self):
        return 1


def test_a_cell_with_dropout_runs_with_flax_rngs():
    xs = jax.random.normal(jax.random.key(1), (BATCH, TIME, IN))
    options = dict(split_rngs={"params": False, "dropout": True})
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(2)}
    variables = nn.RNN(_DropoutCell(OUT), **options).init(rngs, xs)
    expected = nn.RNN(_DropoutCell(OUT), **options).apply(variables, xs, rngs={"dropout": jax.random.key(3)})
    ys = RNN(_DropoutCell(OUT), **options).apply(variables, xs, rngs={"dropout": jax.random.key(3)})
    chex.assert_trees_all_close(ys, expected, atol=1e-6)
    other = RNN(_DropoutCell(OUT), **options).apply(variables, xs, rngs={"dropout": jax.random.key(4)})
    assert not np.allclose(ys, other)


def test_per_step_variables_as_in_nn_rnn():
    """``variable_axes={'params': 0}``: one set of weights per step, as nn.RNN allows."""
    xs = jax.random.normal(jax.random.key(1), (BATCH, TIME, IN))
    options = dict(variable_axes={"params": 0}, variable_broadcast=False,
                   split_rngs={"params": True}, time_major=False)
    variables = nn.RNN(nn.GRUCell(OUT), **options).init(jax.random.key(0), xs)
    assert variables["params"]["cell"]["ir"]["kernel"].shape == (TIME, IN, OUT)
    chex.assert_trees_all_close(RNN(nn.GRUCell(OUT), **options).apply(variables, xs),
                                nn.RNN(nn.GRUCell(OUT), **options).apply(variables, xs), atol=1e-6)
    with pytest.raises(ValueError, match=r"method='parallel' runs a ReLUCell under nn.scan's default"):
        RNN(ReLUCell(1), method="parallel", **options).init(jax.random.key(0), xs[..., :1])


@pytest.mark.slow
def test_usable_in_setup_and_sequential():
    class Encoder(nn.Module):
        def setup(self):
            self.recurrence = RNN(ReLUCell(4, diagonal=True), method="parallel")
            self.readout = nn.Dense(1)

        def __call__(self, xs, lengths):
            return self.readout(self.recurrence(xs, seq_lengths=lengths))

    xs, lengths = jax.random.normal(jax.random.key(1), (BATCH, TIME, IN)), jnp.array([4, 2, 0])
    variables = Encoder().init(jax.random.key(0), xs, lengths)
    chex.assert_shape(Encoder().apply(variables, xs, lengths), (BATCH, TIME, 1))
    stack = nn.Sequential([RNN(nn.GRUCell(OUT)), RNN(ReLUCell(2))])
    ys, _ = stack.init_with_output(jax.random.key(0), xs)
    chex.assert_shape(ys, (BATCH, TIME, 2))
