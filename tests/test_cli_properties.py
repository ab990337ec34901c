"""Property tests of the command line: whatever the flags and input files hold, ``rnnjax eval``
either evaluates (exit 0; 1 with one line when the result is not to be trusted) or refuses in
one line (exit 2), and ``rnnjax train``'s flags either parse to valid settings or are refused in
one line; never a traceback."""

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rnnjax.app import settings as table
from rnnjax.app.cli import _parser, main

# The examples each test draws come from the hypothesis profile (tests/conftest.py).
TEXT = st.text(alphabet=st.sampled_from(list("0123456789+-.eE_, \t\r\n;xabn\ufeff\u00a0\x00")), max_size=40)
JUNK = st.text(max_size=12)


def run(argv):
    """Runs ``main(argv)``; returns ``(status, stdout, stderr)``, argparse's exits included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
    return status, out.getvalue(), err.getvalue()


def assert_evaluated_or_refused(status, out, err):
    """Exit 0: the result alone; 1: the result and one line saying why not to trust it; 2: one
    line saying what is wrong with the input, and nothing evaluated."""
    assert status in (0, 1, 2), (status, out, err)
    if status == 2:
        assert out == "" and err.count("\n") == 1 and err.startswith("rnnjax: error: "), err
    else:
        lines = out.splitlines()  # l1: one line; count: the running counts, then the final count
        assert out.endswith("\n") and lines[0].startswith("length "), out
        assert len(lines) == 1 or lines[-1].startswith("final count predicted "), out
        assert err == "" if status == 0 else (err.count("\n") == 1 and err.startswith(
            "rnnjax: error: do not trust these outputs: ")), err


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


@given(task=st.sampled_from(["l1", "count"]), text=TEXT, suffix=st.sampled_from([".csv", ".txt", ".npy", ".dat"]))
def test_any_input_file_evaluates_or_is_refused_in_one_line(l1_run, count_run, folder, task, text, suffix):
    path = folder / f"input{suffix}"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    status, out, err = run(["eval", task, "--params", str({"l1": l1_run, "count": count_run}[task]),
                            "--input", str(path)])
    assert_evaluated_or_refused(status, out, err)


@given(task=st.sampled_from(["l1", "count"]), values=st.lists(st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0])), min_size=0, max_size=8),
    dtype=st.sampled_from(["<f8", "<f4", "<f2", "<i4", "|b1"]))
def test_any_npy_array_evaluates_or_is_refused_in_one_line(l1_run, count_run, folder, task, values, dtype):
    path = folder / "input.npy"
    with np.errstate(all="ignore"):
        np.save(path, np.asarray(values, np.float64).astype(dtype))
    status, out, err = run(["eval", task, "--params", str({"l1": l1_run, "count": count_run}[task]),
                            "--input", str(path)])
    assert_evaluated_or_refused(status, out, err)


LENGTH = st.one_of(st.sampled_from(["1", "7", "64", "0", "-3", "1e3", "1_000", "100000001", "9" * 5000]),
                   JUNK)
SEED = st.one_of(st.integers(-5, 2**32).map(str), JUNK)
METHOD = st.one_of(st.sampled_from(["auto", "sequential", "parallel"]), JUNK)


@given(task=st.sampled_from(["l1", "count", "sum"]), length=LENGTH, seed=st.one_of(st.none(), SEED),
       method=st.one_of(st.none(), METHOD), params=st.sampled_from(["run", "missing", "file"]))
def test_any_eval_flags_evaluate_or_are_refused_in_one_line(l1_run, folder, task, length, seed, method, params):
    (folder / "file").write_text("")
    argv = ["eval", task, "--params", str(l1_run if params == "run" else folder / params), "--length", length]
    argv += [] if seed is None else ["--seed", seed]
    argv += [] if method is None else ["--method", method]
    status, out, err = run(argv)
    assert_evaluated_or_refused(status, out, err)
    if status == 0:  # then every flag was valid, and the run was the right one
        assert task == "l1" and params == "run" and 1 <= int(length) <= 10**8 and 0 <= int(seed or 0) < 2**31


@given(flags=st.lists(st.tuples(
    st.sampled_from(["--steps", "--lr", "--batch-size", "--max-length", "--seed", "--tol", "--skip-nonfinite",
                     "--checkpoint-every", "--out", "--bogus"]),
    st.one_of(st.integers(-3, 2**32).map(str), st.floats().map(repr), st.sampled_from(["1e-3", "0.5", "inf", "nan"]),
              JUNK)), max_size=4))
def test_any_train_flags_parse_to_valid_settings_or_are_refused_in_one_line(flags):
    argv = ["train", "l1", *[part for flag in flags for part in flag]]
    status, out, err = run_parser(argv)
    if status is not None:  # refused: one line, exit 2, naming the flag
        assert status == 2 and out == "" and err.count("\n") == 1 and err.startswith("rnnjax: error: "), err
        assert any(flag in err for flag, _ in flags), err
    else:
        args = _parser().parse_args(argv)
        for name in ("steps", "batch_size", "length", "checkpoint_every"):
            value = getattr(args, name)
            assert value is None or (type(value) is int and 1 <= value < 2**31)
        for name in ("lr", "tol"):
            value = getattr(args, name)
            assert value is None or (np.isfinite(np.float32(value)) and 0 < value < 1 if name == "tol" else
                                     np.finfo(np.float32).tiny <= value <= np.finfo(np.float32).max)
        assert args.seed is None or 0 <= args.seed < 2**31
        assert type(args.skip_nonfinite) is int and 0 <= args.skip_nonfinite < 2**31
        assert args.out is None or (isinstance(args.out, str) and args.out)
        for name in ("steps", "lr", "batch_size", "length", "tol", "skip_nonfinite", "checkpoint_every", "seed"):
            value = getattr(args, name)
            assert value is None or table.check(name, value) == value  # what the library takes too


def run_parser(argv):
    """Parses ``argv``: ``(None, "", "")`` when it parses, else ``(status, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            _parser().parse_args(argv)
        except SystemExit as e:
            return e.code, out.getvalue(), err.getvalue()
    return None, "", ""
