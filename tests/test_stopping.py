"""The stop rules fit and sweep share: one pure function, one convergence predicate."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax import InputError
from rnnjax.training.stopping import DIVERGED, StopRules, reason, stop_code, within

RULES = StopRules.checked(max_steps=10, target_weight=1.0, weight_tol=1e-3, loss_tol=1e-4, dead_steps=3)


@jax.jit
def code(diverged, w, loss, dead_run):
    return stop_code(RULES, diverged=diverged, watched={"w": w}, loss=loss, dead_run=dead_run)


@pytest.mark.parametrize("diverged, w, loss, dead_run, expected", [
    (False, 0.5, 1.0, 0, None),
    (True, 1.0, 0.0, 9, "diverged"),  # first in order, whatever else holds
    (False, 1.0005, 0.0, 9, "weights"),
    (False, 0.5, 1e-4, 9, "loss"),  # at most loss_tol
    (False, 0.5, 1.0, 3, "dead"),
    (False, 0.5, 1.0, 2, None),
    (False, np.nan, np.nan, 0, None),  # NaN is never within
])
def test_one_rule_in_a_fixed_order_inside_a_compiled_program(diverged, w, loss, dead_run, expected):
    result = code(jnp.asarray(diverged), jnp.float32(w), jnp.float32(loss), jnp.int32(dead_run))
    assert reason(int(result)) == expected
    assert code._cache_size() == 1  # values vary, the program does not


def test_diverged_is_its_own_code_and_without_a_target_no_weight_converges():
    assert reason(DIVERGED) == "diverged"
    no_target = StopRules.checked(max_steps=5)
    assert int(stop_code(no_target, diverged=jnp.asarray(False), watched={"w": jnp.float32(1)},
                         loss=jnp.float32(0), dead_run=jnp.int32(0))) == 0


def test_within_takes_one_tolerance_or_one_per_name_in_jax_and_numpy():
    watched = {"a": np.float32(1.0005), "b": np.array([1.0, 0.99], np.float32)}
    assert not within(watched, 1.0, 1e-3)  # b[1] is 0.01 off
    assert within(watched, 1.0, {"a": 1e-3, "b": 0.02})
    assert within(watched, 1.0, (("a", 1e-3), ("b", 0.02)))  # as StopRules stores a mapping
    assert bool(jax.jit(lambda w: within(w, 1.0, {"a": 1e-3, "b": 0.02}))(watched))
    assert not within({"w": np.float32(1.0)}, 1.0, 0.0)  # nothing is within a tolerance of 0
    assert within({"w": np.float64(1 + 1e-12)}, 1.0, 1e-11)  # NumPy keeps float64


@pytest.mark.parametrize("kwargs, name", [
    ({"max_steps": 0}, "max_steps"), ({"max_steps": 5, "weight_tol": 0.0}, "weight_tol"),
    ({"max_steps": 5, "weight_tol": {"w": -1.0}}, "weight_tol['w']"), ({"max_steps": 5, "dead_steps": 0}, "dead_steps"),
    ({"max_steps": 5, "loss_tol": float("nan")}, "loss_tol"), ({"max_steps": 5, "target_weight": "1"}, "target_weight"),
])
def test_rules_are_checked_naming_the_argument(kwargs, name):
    with pytest.raises(InputError, match=rf"^{re.escape(name)} must be") as error:
        StopRules.checked(**kwargs)
    assert error.value.name == name
