"""Runs trained once per test session and shared by the CLI tests."""

import pytest

from rnnjax.cli import main


@pytest.fixture(scope="session")
def l1_run(tmp_path_factory):
    """``rnnjax train l1 --out DIR`` with every default, into an existing empty folder."""
    out = tmp_path_factory.mktemp("l1")
    assert main(["train", "l1", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def count_run(tmp_path_factory):
    """``rnnjax train count --out DIR`` with every default, into a new folder."""
    out = tmp_path_factory.mktemp("count") / "run"
    assert main(["train", "count", "--out", str(out)]) == 0
    return out
