"""Hypothesis profiles, the slow tier's doctests, and runs trained once per test session.

``make test`` runs the fast tier (``-m "not slow"``) with the "fast" profile: property tests
vary values, lengths and weights on a few fixed shapes, so each shape compiles once, and draw
few examples. ``make test-all`` runs everything with the "thorough" profile.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("fast", max_examples=10, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

# Doctests that train for thousands of steps or many seeds: the slow tier runs them.
SLOW_DOCTESTS = {
    "rnnjax.app.runs.train_run",
    "rnnjax.app.tasks.sweep_task",
    "rnnjax.training.recipes.sweep_recipe",
    "rnnjax.training.sweep.sweep",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.name in SLOW_DOCTESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def l1_run(tmp_path_factory):
    """``rnnjax train l1 --out DIR`` with every default, into an existing empty folder."""
    from rnnjax.app.cli import main

    out = tmp_path_factory.mktemp("l1")
    assert main(["train", "l1", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def count_run(tmp_path_factory):
    """``rnnjax train count --out DIR`` with every default, into a new folder."""
    from rnnjax.app.cli import main

    out = tmp_path_factory.mktemp("count") / "run"
    assert main(["train", "count", "--out", str(out)]) == 0
    return out
