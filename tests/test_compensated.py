"""Compensated evaluation (``precision="compensated"``, the default) against exact references.

The claims are those of docs/accuracy.md: the L1 norm (``W_ih = W_hh = 1`` on ``|x|``) within
2 ulps (``2 eps``, relative) of the exact norm, checked with ``fractions``; a general scalar or
diagonal cell within ``u |h_t| + c u**2 S_t`` (plus, in the parallel scan, the refinement's
``K**2 eps eps_solve M_t``) of a float64 loop (float32) or a double-double loop (float64),
both written here. Inputs come in families (constant, spiky, sorted, alternating, N(0, 1),
uniform) at magnitudes 1e-6 to 1e6, for both methods and several block sizes.

Fast by construction: one shape, ``(2, 4096, 2)``, through jitted functions that take values,
lengths and weights as traced arguments (``traced_once``: a second trace fails the test); the
float64 cases, the other block sizes and the long sequences are slow.
"""

import math
from fractions import Fraction

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from rnnjax import L1Norm, ReLUCell, rnn
from rnnjax.core import compensated
from rnnjax.core.parallel import levels, relu_scan, upper_block_size

slow = pytest.mark.slow
BATCH, TIME, FEATURES = 2, 4096, 2
FAMILIES = ("constant", "spiky", "sorted", "alternating", "normal", "uniform")


@pytest.fixture(autouse=True)
def _fresh_trace_counts():
    chex.clear_trace_counter()


def _run(w, inputs, lengths, h0, *, method, block_size):
    """``(final_state, states)`` of ``h_t = max(0, w h_{t-1} + u_t)``: the parallel scan at
    ``block_size``, or the loop of a diagonal ``ReLUCell`` whose ``W_ih`` is the identity."""
    if method == "parallel":
        return relu_scan(w, inputs, lengths, h0, block_size=block_size)
    features = w.shape[0]
    cell = ReLUCell(features, diagonal=True, param_dtype=w.dtype)
    params = {"params": {"W_ih": jnp.eye(features, dtype=w.dtype), "W_hh": w}}
    return rnn(cell, params, inputs, lengths, initial_state=h0, method="sequential")


run_once = jax.jit(chex.assert_max_traces(_run, n=1), static_argnames=("method", "block_size"))


def family(rng, name, shape, magnitude, signed):
    """Inputs of one family at ``magnitude`` (1e-6 to 1e6), of both signs if ``signed``."""
    if name == "constant":
        x = np.full(shape, magnitude)
    elif name == "spiky":  # one big input, then small ones: 1e6 then 1e-6 at the extremes
        x = np.full(shape, 10.0 ** rng.uniform(-6, np.log10(magnitude)))
        x[:, 0] = magnitude
    elif name == "sorted":
        x = np.sort(np.abs(rng.standard_normal(shape)) * magnitude, axis=1)[:, ::rng.choice([-1, 1])]
    elif name == "alternating":
        x = np.abs(rng.standard_normal(shape)) * magnitude * (-1.0) ** np.arange(shape[1])[:, None]
    elif name == "normal":
        x = rng.standard_normal(shape) * magnitude
    else:
        x = rng.random(shape) * magnitude
    if signed and name in ("constant", "spiky", "sorted", "uniform"):
        x = x * rng.choice([-1.0, 1.0], size=shape)
    return np.clip(x, -1e6, 1e6)


def draw(seed, name, log_magnitude, dtype):
    rng = np.random.default_rng(seed)
    x = family(rng, name, (BATCH, TIME, FEATURES), 10.0**log_magnitude, signed=True).astype(dtype)
    lengths = rng.integers(1, TIME + 1, size=BATCH)
    lengths[0] = TIME
    return rng, x, lengths


SCALE = 2**1074  # every float32 and float64 number is an integer multiple of 2**-1074


def scaled(values):
    """Floats as exact Python integers, in units of ``2**-1074``."""
    return np.array([n * (SCALE // d) for n, d in map(float.as_integer_ratio, map(float, values))], object)


def assert_l1_within_two_ulps(states, x, lengths):
    """Every prefix's norm within ``2 eps`` of the exact one, in exact integer arithmetic."""
    ulps = 2**-int(np.log2(np.finfo(x.dtype).eps))  # 1 / eps
    for b in range(BATCH):
        for f in range(FEATURES):
            exact = np.cumsum(scaled(np.abs(x[b, :lengths[b], f])))
            error = np.abs(scaled(np.asarray(states)[b, :lengths[b], f]) - exact)
            bad = np.flatnonzero(error * ulps > 2 * exact)
            assert bad.size == 0, f"sequence {b}, feature {f}, step {bad[:1]}: {states[b, bad[:1], f]}"


def _cases(*, fast_parallel: bool) -> list:
    """Both dtypes, the loop and the scan at block sizes 1, 7, 32, 64 and 256: the float32 loop
    in the fast tier, and the scan at block 32 where ``fast_parallel``; the rest slow."""
    fast = {("float32", None)} | ({("float32", 32)} if fast_parallel else set())
    cases = [(np.float32, None), *((np.float32, b) for b in (32, 1, 7, 64, 256)),
             (np.float64, None), (np.float64, 7), (np.float64, 256)]
    return [pytest.param(dtype, "sequential" if block is None else "parallel", block,
                         id=f"{dtype.__name__}-" + ("sequential" if block is None else f"parallel-block{block}"),
                         marks=() if (dtype.__name__, block) in fast else slow)
            for dtype, block in cases]


L1_CASES = _cases(fast_parallel=True)


@pytest.mark.parametrize("dtype, method, block_size", L1_CASES)
def test_the_l1_norm_is_within_two_ulps_of_the_exact_norm_for_every_family(dtype, method, block_size):
    @given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(FAMILIES), log_magnitude=st.floats(-6, 6))
    def check(seed, name, log_magnitude):
        _, x, lengths = draw(seed, name, log_magnitude, dtype)
        with jax.enable_x64(dtype == np.float64):
            magnitudes = jnp.where(x < 0, -x, x)  # as L1Norm makes them
            _, states = run_once(jnp.ones(FEATURES, dtype), magnitudes, jnp.asarray(lengths),
                                 jnp.zeros((BATCH, FEATURES), dtype), method=method, block_size=block_size)
        assert states.dtype == dtype
        assert_l1_within_two_ulps(states, x, lengths)

    check()


def reference(w, inputs, lengths, h0, *, double_double):
    """The loop's states in float64, or in double-double as ``(hi, lo)`` pairs, with the bound's
    magnitudes ``S_t = sum_{s<=t} |w|^(t-s) (|w h_{s-1}| + |u_s|)`` and ``M_t`` (the same with
    max for sum), zero past each length: ``(hi, lo, S, M)``."""
    w, inputs, h0 = (np.asarray(a, np.float64) for a in (w, inputs, h0))
    active = np.arange(inputs.shape[1])[None, :] < np.asarray(lengths)[:, None]
    hi, lo = h0.copy(), np.zeros_like(h0)
    total, largest = np.zeros_like(h0), np.zeros_like(h0)
    out = np.zeros((4,) + inputs.shape)
    with np.errstate(over="ignore", invalid="ignore"):  # past the domain: the caller cuts it
        for t in range(inputs.shape[1]):
            on, u = active[:, t, None], inputs[:, t]
            term = np.abs(w * hi) + np.abs(u)
            total = np.where(on, np.abs(w) * total + term, total)
            largest = np.where(on, np.maximum(np.abs(w) * largest, term), largest)
            if double_double:  # Dekker's product and Knuth's sum, renormalised
                p, p_error = _two_product(w, hi)
                s, s_error = _two_sum(p, u)
                new_hi, new_lo = _two_sum(s, (p_error + s_error) + w * lo)
            else:
                new_hi, new_lo = w * hi + u, np.zeros_like(hi)
            fired = new_hi > 0
            hi = np.where(on, np.where(fired, new_hi, 0), hi)
            lo = np.where(on, np.where(fired, new_lo, 0), lo)
            for i, value in enumerate((hi, lo, total, largest)):
                out[i, :, t] = np.where(on, value, 0)
    return tuple(out)


def _two_sum(a, b):
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def _two_product(a, b):
    p = a * b
    (a1, a2), (b1, b2) = _split(a), _split(b)
    return p, ((a1 * b1 - p) + a1 * b2 + a2 * b1) + a2 * b2


def _split(x):
    c = 134217729.0 * x  # 2**27 + 1
    high = c - (c - x)
    return high, x - high


def assert_within_compensated_bound(states, w, inputs, lengths, h0, *, method, block_size, loop):
    """docs/accuracy.md's bound: ``u |h_t| + c u**2 S_t``, in the parallel scan plus
    ``K**2 eps eps_solve M_t`` (``K`` the plain scan's constant), plus ``tiny`` for the final
    rounding's flush and the plain bound's term for flushed numbers."""
    dtype = np.asarray(inputs).dtype
    info = np.finfo(dtype)
    arith = compensated.arithmetic(dtype)
    expected, low, total, largest = loop  # reference(w, inputs, lengths, h0, ...)
    u = float(info.eps) / 2
    c = 1.0 if arith is compensated.FLOAT64 else 16.0
    bound = u * np.abs(expected) + c * u**2 * total + 2 * float(info.tiny)
    if method == "parallel":
        size = min(block_size, inputs.shape[1])
        k = 8 * (size + (16 + upper_block_size(-(-inputs.shape[1] // size))) * levels(inputs.shape[1], size))
        eps_solve = float(np.finfo(compensated.solve_dtype(arith, dtype)).eps)
        with np.errstate(over="ignore"):  # max_{s<=t} |w|^(t-s) <= max(1, |w|)^(t+1)
            amplification = np.maximum(1.0, np.abs(np.asarray(w, np.float64))) ** np.arange(
                1, inputs.shape[1] + 1)[None, :, None]
        flushed = k * float(info.tiny) * (1 + np.abs(expected).max(axis=1, keepdims=True) + amplification)
        bound = bound + k**2 * float(info.eps) * eps_solve * largest + flushed
    error = np.abs((np.asarray(states, np.float64) - expected) - low)
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert (error <= bound).all(), f"error {error[worst]:.3g} over the bound {bound[worst]:.3g} at {worst}"


GENERAL_CASES = _cases(fast_parallel=False)  # the L1 test runs the scan fast

# Weights of the documented domain, near 1 (where rounding accumulates longest) and not.
WEIGHTS = st.one_of(st.sampled_from([0.0, 1.0, 1.000001, 0.999999, 1.001, 0.999, -1.0, -0.999999, 3.0]),
                    st.floats(-3, 3), st.floats(-30, 0).map(lambda e: 10.0**e))


@pytest.mark.parametrize("dtype, method, block_size", GENERAL_CASES)
def test_a_scalar_or_diagonal_cell_is_within_the_compensated_bound(dtype, method, block_size):
    @given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(FAMILIES), log_magnitude=st.floats(-6, 6),
           w=st.tuples(WEIGHTS, WEIGHTS), sign=st.sampled_from([-1.0, 1.0]))
    def check(seed, name, log_magnitude, w, sign):
        rng, x, lengths = draw(seed, name, log_magnitude, dtype)
        w = (np.array(w) * sign).astype(dtype)
        h0 = (np.abs(rng.standard_normal((BATCH, FEATURES))) * 10.0**log_magnitude).astype(dtype)
        loop = reference(w, x, lengths, h0, double_double=dtype == np.float64)
        past = (loop[0] >= 1e30).any(axis=2)
        lengths = np.where(past.any(axis=1), past.argmax(axis=1), lengths)  # the domain
        loop = tuple(np.where(np.arange(TIME)[None, :, None] < lengths[:, None, None], a, 0) for a in loop)
        with jax.enable_x64(dtype == np.float64):
            final_state, states = run_once(jnp.asarray(w), jnp.asarray(x), jnp.asarray(lengths),
                                           jnp.asarray(h0), method=method, block_size=block_size)
        assert_within_compensated_bound(states, w, x, lengths, h0, method=method, block_size=block_size,
                                        loop=loop)
        at_last = np.asarray(states)[np.arange(BATCH), np.maximum(lengths - 1, 0)]
        chex.assert_trees_all_equal(np.asarray(final_state), np.where(lengths[:, None] > 0, at_last, h0))

    check()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_error_free_transformations_are_exact_once_compiled(dtype):
    """``two_sum``, ``two_product`` and ``product_error`` under ``jit``, against ``fractions``:
    XLA neither simplifies ``(a + b) - a`` to ``b`` nor contracts a product into a fused
    multiply-add that changes them. Where ``e`` is below ``tiny`` it may be flushed to 0."""
    rng = np.random.default_rng(0)
    exponent = 16 if dtype == np.float32 else 140  # products well below the overflow threshold
    a, b = (rng.standard_normal(4096) * 10.0 ** rng.uniform(-exponent, exponent, 4096) for _ in range(2))
    b[:64] = -a[:64] * (1 + 1e-7)  # cancellations
    a, b = a.astype(dtype), b.astype(dtype)
    with jax.enable_x64(dtype == np.float64):
        out = jax.jit(lambda a, b: (*compensated.two_sum(a, b), *compensated.two_product(a, b),
                                    compensated.product_error(a, b)))(a, b)
    s, s_error, p, p_error, error = (np.asarray(x) for x in out)
    tiny = Fraction(float(np.finfo(dtype).tiny))
    for i in range(len(a)):
        x, y = Fraction(float(a[i])), Fraction(float(b[i]))
        assert Fraction(float(s[i])) + Fraction(float(s_error[i])) == x + y
        for product, e in ((p[i], p_error[i]), (p[i], error[i])):
            assert abs(Fraction(float(product)) + Fraction(float(e)) - x * y) <= (0 if abs(e) >= tiny else tiny)


@slow
@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
def test_long_l1_norms_are_within_two_ulps_at_every_cpu_block_size(block_size):
    """10 million steps of the issue's cases (the constant 0.1, a spike of 1e6 then 0.03, and
    |N(0, 1)|), at the block size of each CPU vendor (rnnjax.core.parallel)."""
    time = 10_000_000
    x = np.stack([np.full(time, 0.1), np.r_[1e6, np.full(time - 1, 0.03)],
                  np.abs(np.random.default_rng(0).standard_normal(time))]).astype(np.float32)
    final_state, _ = jax.jit(lambda x: relu_scan(jnp.ones(1), x[..., None], jnp.full(3, time),
                                                 jnp.zeros((3, 1)), block_size=block_size))(x)
    for row, got in zip(x, np.asarray(final_state)[:, 0]):
        exact = math.fsum(row.astype(np.float64))
        assert abs(float(got) - exact) <= 2 * float(np.finfo(np.float32).eps) * exact


def test_plain_precision_is_the_uncompensated_recurrence():
    """``precision="plain"``: the loop is the cell's own steps, bit for bit, and the L1 norm of
    255 steps of a spike keeps the loop's float32 error (the issue's 7.6e-6), which
    "compensated" removes."""
    x = np.r_[1e6, np.full(254, 0.03)].astype(np.float32)[None, :, None]
    params = {"params": {"W_ih": jnp.ones((1, 1)), "W_hh": jnp.ones((1, 1))}}
    exact = math.fsum(x.astype(np.float64).ravel())
    errors = {}
    for precision in ("plain", "compensated"):
        final_state, _ = rnn(ReLUCell(1), params, jnp.asarray(x), method="sequential", precision=precision)
        errors[precision] = abs(float(final_state[0, 0]) - exact) / exact
    loop = np.float32(0)
    for value in x.ravel():
        loop = np.maximum(np.float32(0), loop + value)
    assert errors["plain"] == abs(float(loop) - exact) / exact > 1e-6
    assert errors["compensated"] <= float(np.finfo(np.float32).eps)


def test_precision_is_one_of_two_names():
    with pytest.raises(ValueError, match="precision"):
        rnn(ReLUCell(1), {"params": {"W_ih": jnp.ones((1, 1)), "W_hh": jnp.ones((1, 1))}},
            jnp.ones((1, 3, 1)), precision="double")


def cancellations(rng, dtype):
    """Runs of 0.1 whose sum an input of minus its rounding cancels, leaving the exact state a
    few ulps of it (or below 0), then small inputs: where the parallel scan's entering states,
    first-order off, take the other side of the ReLU (a relative error of 1 before its
    refinement re-ran those blocks). Several in a row in the second feature."""
    x = np.full((BATCH, TIME, FEATURES), 1e-6)
    for b in range(BATCH):
        for f, ends in ((0, [int(rng.integers(300, TIME - 1))]), (1, sorted(rng.choice(TIME - 1, 4, replace=False)))):
            start = 0
            for end in ends:
                run = np.full(end - start, dtype(0.1))
                total = math.fsum(run.astype(np.float64))
                x[b, start:end, f] = run
                x[b, end, f] = -float(dtype(total)) * rng.choice([1.0, 1 + 1e-9, 1 - 1e-9])
                start = end + 1
    return x.astype(dtype)


@pytest.mark.parametrize("dtype, method, block_size", [
    pytest.param(np.float32, "sequential", None, id="float32-sequential"),
    pytest.param(np.float32, "parallel", 32, id="float32-parallel-block32"),
    pytest.param(np.float64, "parallel", 7, id="float64-parallel-block7", marks=slow),
])
def test_states_cancelled_to_near_zero_keep_their_side_of_the_relu(dtype, method, block_size):
    @given(seed=st.integers(0, 2**32 - 1))
    def check(seed):
        rng = np.random.default_rng(seed)
        x, w = cancellations(rng, dtype), np.ones(FEATURES, dtype)
        lengths, h0 = np.full(BATCH, TIME), np.zeros((BATCH, FEATURES), dtype)
        with jax.enable_x64(dtype == np.float64):
            _, states = run_once(jnp.asarray(w), jnp.asarray(x), jnp.asarray(lengths), jnp.asarray(h0),
                                 method=method, block_size=block_size)
        loop = reference(w, x, lengths, h0, double_double=dtype == np.float64)
        assert_within_compensated_bound(states, w, x, lengths, h0, method=method, block_size=block_size,
                                        loop=loop)

    check()
