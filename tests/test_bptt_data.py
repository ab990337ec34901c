"""The hand-derived BPTT reference, and the batch generators."""

import math

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from rnnjax import bptt, rnn
from rnnjax.core.cell import ReLUCell
from rnnjax.training.data import count_batch, l1_batch
from rnnjax.training.models import L1Norm


def autodiff_loss(w_ih, w_hh, xs, targets, lengths):
    """The same loss as bptt.loss, computed through rnnjax.rnn (an independent path)."""
    params = {"params": {"W_ih": w_ih.reshape(1, 1), "W_hh": w_hh.reshape(1, 1)}}
    _, states = rnn(ReLUCell(1), params, xs[..., None], lengths, method="sequential")
    mask = jnp.arange(xs.shape[1])[None] < lengths[:, None]
    return 0.5 * jnp.sum(jnp.where(mask, states[..., 0] - targets, 0) ** 2)


hand = jax.jit(bptt.grad)
auto = jax.jit(jax.grad(autodiff_loss, argnums=(0, 1)))


@pytest.mark.parametrize("time", [1, 12])
@given(seed=st.integers(0, 2**32 - 1))
def test_hand_derived_bptt_equals_jax_grad(time, seed):
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        xs = jnp.asarray(rng.normal(size=(6, time)))
        targets = jnp.asarray(rng.normal(size=(6, time)) + 1)
        lengths = jnp.asarray(rng.integers(0, time + 1, size=6))
        w_ih, w_hh = (jnp.asarray(rng.uniform(-1.5, 1.5)) for _ in range(2))
        expected = auto(w_ih, w_hh, xs, targets, lengths)
        chex.assert_trees_all_close(hand(w_ih, w_hh, xs, targets, lengths), expected,
                                    rtol=1e-6, atol=1e-12)


def test_bptt_ignores_padding_even_nan():
    xs = jnp.array([[1.0, 2.0, jnp.nan], [0.5, jnp.nan, jnp.nan]])
    lengths = jnp.array([2, 1])
    clean = bptt.grad(0.7, -0.3, jnp.nan_to_num(xs), jnp.ones((2, 3)), lengths)
    chex.assert_trees_all_equal(bptt.grad(0.7, -0.3, xs, jnp.ones((2, 3)), lengths), clean)
    chex.assert_tree_all_finite(clean)
    autodiff = jax.grad(bptt.loss, argnums=(0, 1))(0.7, -0.3, xs, jnp.ones((2, 3)), lengths)
    chex.assert_trees_all_close(autodiff, clean, rtol=1e-6)


def test_l1_batch_is_padded_and_labelled():
    batch = l1_batch(jax.random.key(0), 64, 10)
    chex.assert_shape([batch.xs, batch.lengths, batch.targets], [(64, 10), (64,), (64,)])
    xs, lengths = np.asarray(batch.xs), np.asarray(batch.lengths)
    assert lengths.min() >= 1 and lengths.max() <= 10 and len(set(lengths)) > 5
    for x, n, target in zip(xs, lengths, np.asarray(batch.targets)):
        assert np.all(x[n:] == 0) and np.all(x[:n] != 0)
        np.testing.assert_allclose(target, np.abs(x[:n].astype(np.float64)).sum(), rtol=1e-6)


def test_l1_batch_values_are_the_normals_of_its_key():
    # drawn as one flat run for speed; they must be the numbers of a (batch, time) draw
    key = jax.random.key(7)
    batch = l1_batch(key, 6, 9)
    values = np.asarray(jax.random.normal(jax.random.split(key)[1], (6, 9), jnp.float32))
    inside = np.arange(9)[None] < np.asarray(batch.lengths)[:, None]
    chex.assert_trees_all_equal(np.asarray(batch.xs), np.where(inside, values, 0.0))


@pytest.mark.slow
@pytest.mark.parametrize("max_length", [1, 10, 17, 300])
def test_l1_targets_are_the_sum_rounded_once_in_every_program(max_length):
    # The exact sum of |x| rounded once to float32, in whatever program draws them: eagerly,
    # jitted, vmapped over seeds; and the network with both weights 1 computes exactly that.
    keys = jax.random.split(jax.random.key(11), 40)
    swept = jax.jit(jax.vmap(lambda k: l1_batch(k, 8, max_length)))(keys)
    for i in (0, 13, 39):
        batch = l1_batch(keys[i], 8, max_length)
        exact = [math.fsum(row) for row in np.abs(np.asarray(batch.xs, np.float64))]
        chex.assert_trees_all_equal(np.asarray(batch.targets), np.asarray(exact, np.float64).astype(np.float32))
        chex.assert_trees_all_equal(jax.tree.map(lambda a: a[i], swept), batch)
        chex.assert_trees_all_equal(jax.jit(l1_batch, static_argnums=(1, 2))(keys[i], 8, max_length),
                                    batch)
        model = L1Norm(method="sequential")
        ones = {"params": {"cell": {"W_ih": jnp.ones((1, 1)), "W_hh": jnp.ones((1, 1))}}}
        chex.assert_trees_all_equal(model.apply(ones, batch.xs, batch.lengths), batch.targets)


def test_numpy_integer_sizes_are_accepted():
    assert l1_batch(jax.random.key(0), np.int64(3), np.int32(4)).xs.shape == (3, 4)


def test_count_batch_targets_are_running_counts():
    batch = count_batch(jax.random.key(0), 16, 5)
    xs = np.asarray(batch.xs)
    assert set(np.unique(xs)) <= {0.0, 1.0}
    chex.assert_trees_all_equal(batch.lengths, jnp.full((16,), 5, jnp.int32))
    chex.assert_trees_all_equal(np.asarray(batch.targets), np.cumsum(xs, axis=1))


@pytest.mark.parametrize("fn", [l1_batch, count_batch])
@pytest.mark.parametrize("sizes, match", [((0, 5), "batch_size .* received 0"),
                                          ((4, -1), "must be a positive integer; received -1"),
                                          ((4, 2.5), "received 2.5"),
                                          ((np.int64(0), 3), r"received np.int64\(0\)")])
def test_batches_reject_bad_sizes(fn, sizes, match):
    with pytest.raises(ValueError, match=match):
        fn(jax.random.key(0), *sizes)


def test_bptt_and_the_loss_refuse_weights_and_targets_that_do_not_fit():
    from rnnjax import InputError, squared_error

    xs = jnp.ones((2, 3))
    for args, name in [((jnp.ones((1, 1)), 1.0, xs, jnp.zeros((2, 3))), "w_ih"), (("1", 1.0, xs, jnp.zeros((2, 3))), "w_ih"),
                       ((1.0, 1.0, xs, jnp.zeros(3)), "targets")]:
        with pytest.raises(InputError, match=rf"^{name} must") as error:
            bptt.grad(*args)
        assert error.value.name == name
    with pytest.raises(InputError, match=r"^targets must have the predictions' shape \(3,\); received \(4,\)"):
        squared_error(jnp.ones(3), jnp.ones(4), None)
    with pytest.raises(InputError, match=r"^lengths must lie in \[0, 3\]"):
        squared_error(jnp.ones((1, 3)), jnp.ones((1, 3)), jnp.array([5]))
