"""The rnnjax command: demo, train, eval; runs that never mislead; one-line errors with exit 2.

The fast tier reuses the runs trained once per session (``l1_run``, ``count_run``) and one
out-of-budget run resumed to its end (``resumed_run``); subprocesses, Ctrl-C and kills, the
demo as a program and long sequences are in the slow tier.
"""

import collections
import contextlib
import io
import json
import logging
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

import rnnjax.app.runs
import rnnjax.app.settings
import rnnjax.app.tasks
from rnnjax.app.cli import main
from rnnjax.app.runs import load_run, train_run
from rnnjax.app.tasks import task_settings, task_start
from rnnjax.core.checks import InputError
from rnnjax.training.checkpoints import checkpoint_steps, restore_checkpoint


def strict_json(path):
    """json.loads that refuses NaN and infinity, as strict JSON readers do."""
    def refuse(name):
        raise ValueError(f"{name} is not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def final_state(out, task="count"):
    """The state, history and step of the run's last checkpoint, read exactly."""
    folder = out / "checkpoints"
    step = checkpoint_steps(folder)[-1]
    seed = json.loads((folder / str(step) / "run" / "metadata").read_text())["seed"]
    return restore_checkpoint(folder, step, task_start(task, task_settings(task), seed=seed))


def assert_same_run(out, reference, task="count"):
    one, two = final_state(out, task), final_state(reference, task)
    assert one.steps == two.steps
    chex.assert_trees_all_equal(one.state, two.state)  # parameters and optimizer state, bitwise
    chex.assert_trees_all_equal(one.history, two.history)


Captured = collections.namedtuple("Captured", "out err")  # as capsys.readouterr() gives them


def one_error_line(captured, match):
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rnnjax: error: "), captured.err
    assert re.search(match, lines[0]), lines[0]


def train_error_line(captured, match):
    """Like ``one_error_line`` for ``train``, whose progress bar precedes the error on stderr."""
    *progress, last = captured.err.rstrip("\n").split("\n")
    assert all("step/s" in line for line in progress), captured.err
    one_error_line(captured._replace(out="", err=last), match)


def run(argv):
    """``main(argv)`` outside pytest's capture: ``(status, stdout, stderr)``, argparse's exits included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
    return status, out.getvalue(), err.getvalue()


def rnnjax_process(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "rnnjax", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


# --- train: the default runs, what they save, and every way a run can end ---------------------

@pytest.mark.parametrize("task", ["l1", "count"])
def test_default_runs_end_converged_from_seed_0(l1_run, count_run, task):
    out = {"l1": l1_run, "count": count_run}[task]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.json", "training.png"]
    metrics = strict_json(out / "metrics.json")
    assert metrics["converged"] is True and metrics["stop_reason"] == "weights"
    # the default recipe trains v with W_ih = v*v, which no init leaves dead
    assert (metrics["first_seed"], metrics["seed"], metrics["dead_seeds"]) == (0, 0, [])
    assert metrics["settings"] == {**task_settings(task), "checkpoint_every": 1000}
    assert metrics["settings"]["recipe"] == "squared" and metrics["settings"]["steps"] == 3000
    assert metrics["settings"]["lr"] == 0.1 and metrics["devices"] == 1
    assert metrics["weights"] == {"cell/W_hh": [[1.0]], "cell/W_ih": [[1.0]]}  # W_ih = v*v, exactly 1
    assert metrics["watched"] == {"cell/W_hh": 1.0, "cell/W_ih": 1.0}
    assert metrics["initial_weights"]["cell/W_ih"][0][0] == pytest.approx(0.717281103**2)
    assert metrics["method"] == "sequential" and metrics["versions"]["backend"] == "cpu"
    assert len(metrics["history"]["loss"]) == metrics["steps"] and metrics["skipped_steps"] == 0
    assert checkpoint_steps(out / "checkpoints") == [metrics["steps"]]
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_files_have_the_usual_permissions(l1_run):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("metrics.json", "training.png"):
        assert (l1_run / name).stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    """``train count --steps 50 --checkpoint-every 20``: out of budget, checkpoints at 20, 40
    and 50. Returns ``(out, (status, stdout, stderr))``."""
    out = tmp_path_factory.mktemp("budget") / "run"
    return out, run(["train", "count", "--out", str(out), "--steps", "50", "--checkpoint-every", "20"])


@pytest.fixture(scope="module")
def resumed_run(budget_run, tmp_path_factory):
    """A copy of ``budget_run``, refused two resumes that change what may not change, then
    resumed to its end: checkpoints at 20, 40, 50 and the last step. Returns ``(out, [(status,
    stdout, stderr) of each resume])``."""
    out = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(budget_run[0], out)
    commands = [["--resume"], ["--resume", "--lr", "0.2", "--steps", "5000"],
                ["--resume", "--steps", "5000", "--checkpoint-every", "1000"]]
    return out, [run(["train", "count", "--out", str(out), *flags]) for flags in commands]


def test_a_run_out_of_budget_exits_1_and_resumes_to_the_uninterrupted_bits(budget_run, resumed_run, count_run,
                                                                           capsys):
    status, out, err = budget_run[1]
    assert status == 1 and "trained 50 steps (step budget spent, NOT converged)" in out
    train_error_line(Captured("", err),
                     rf"not converged within 50 steps \(saved in {budget_run[0]}\); continue "
                     rf"with: rnnjax train count --out {budget_run[0]} --resume --steps N$")
    assert strict_json(budget_run[0] / "metrics.json")["stop_reason"] == "budget"
    out, (spent, changed, resumed) = resumed_run
    assert spent[0] == 2
    one_error_line(Captured(*spent[1:]),
                   rf"^rnnjax: error: --out {out}: that run spent its budget of 50 steps; give a larger --steps "
                   r"to continue it$")
    assert changed[0] == 2
    one_error_line(Captured(*changed[1:]),
                   rf"^rnnjax: error: --lr 0.2: the run in {out} trains with 0.1; a resumed run keeps its settings$")
    assert resumed[0] == 0 and resumed[1].startswith("resumed from step 50\n"), resumed
    metrics = strict_json(out / "metrics.json")
    assert metrics["resumed_at"] == [50] and metrics["settings"]["steps"] == 5000 and metrics["converged"]
    assert metrics["settings"]["checkpoint_every"] == 1000
    assert checkpoint_steps(out / "checkpoints") == [20, 40, 50, metrics["steps"]]
    assert_same_run(out, count_run)
    assert main(["train", "count", "--out", str(out), "--resume", "--steps", "6000"]) == 2
    one_error_line(capsys.readouterr(), rf"^rnnjax: error: --out {out}: that run already ended \(every watched "
                                        r"weight within tolerance of the target")
    assert checkpoint_steps(out / "checkpoints") == [20, 40, 50, metrics["steps"]]  # refused: nothing changed


@pytest.mark.slow
def test_a_run_killed_after_its_final_checkpoint_resumes_to_its_end_without_a_step_more(l1_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(l1_run, out)
    (out / "metrics.json").unlink()  # killed between the final checkpoint and metrics.json
    last = checkpoint_steps(out / "checkpoints")[-1]
    assert main(["train", "l1", "--out", str(out), "--resume"]) == 0
    assert checkpoint_steps(out / "checkpoints")[-1] == last
    metrics = strict_json(out / "metrics.json")
    assert (metrics["steps"], metrics["stop_reason"]) == (last, "weights")
    assert_same_run(out, l1_run, "l1")


def test_a_diverging_run_is_saved_as_diverged_and_exits_1_and_so_does_its_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "l1", "--lr", "1e6", "--seed", "3", "--out", str(out)]) == 1
    train_error_line(capsys.readouterr(), re.escape(
        f"rnnjax: error: the run diverged at step 1 (a non-finite loss, gradient or weight); its last "
        f"finite state, after step 0, is saved in {out}; try a lower --lr or --skip-nonfinite") + "$")
    metrics = strict_json(out / "metrics.json")  # no NaN tokens
    assert (metrics["stop_reason"], metrics["converged"], metrics["steps"]) == ("diverged", False, 0)
    assert metrics["diverged_at_step"] == 1 and metrics["settings"]["lr"] == 1e6
    assert metrics["weights"] == metrics["initial_weights"]
    assert main(["eval", "l1", "--params", str(out), "--length", "5"]) == 1
    captured = capsys.readouterr()
    assert re.fullmatch(rf"rnnjax: error: do not trust these outputs: --params {re.escape(str(out))}: not a converged "
                        r"run \(stop reason: diverged, after 0 steps\)(; relative error \S+, above the 2\.4e-07 rnnjax "
                        r"holds l1 to)?\n", captured.err), captured.err
    assert captured.out.startswith("length 5: predicted")


def test_the_out_folder_is_checked_before_training(count_run, budget_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "todo.txt").write_text("")
    cases = [
        (["--out", str(blocker)], rf"--out {blocker}: exists and is not a folder$"),
        (["--out", str(blocker / "run")], rf"--out {blocker}/run: cannot write there \(Not a directory\)$"),
        (["--out", str(count_run)], rf"--out {count_run}: already holds a run; --resume to continue it or "
                                    r"--overwrite to replace it$"),
        (["--out", str(stranger), "--overwrite"],
         r"holds files that are not an rnnjax run \('todo.txt'\); choose another folder$"),
        (["--out", str(tmp_path / "new"), "--resume"], r"holds no run to resume \(no checkpoints folder\)$"),
        (["--checkpoint-every", "10"], r"--resume, --overwrite and --checkpoint-every need --out$"),
        (["--out", str(count_run), "--resume", "--seed", "5"], r"--seed 5: the run in \S+ started from seed 0"),
        (["--out", str(count_run), "--resume", "--overwrite"],
         r"--resume continues the run in --out and --overwrite replaces it: give one of them$"),
        (["--steps", "1e3"], r"argument --steps: expected a positive integer below 2\*\*31; received '1e3'$"),
        (["--lr", "nan"], r"argument --lr: expected a number in \[1.175e-38, 3.403e\+38\]; received 'nan'$"),
        (["--tol", "-1"], r"argument --tol: expected a number in \(0, 1\); received '-1'$"),
        (["--tol", "1"], r"argument --tol: expected a number in \(0, 1\); received '1'$"),
        (["--skip-nonfinite", "-1"], r"argument --skip-nonfinite: expected an integer >= 0 below 2\*\*31; "
                                     r"received '-1'$"),
        (["--devices", "99"], r"--devices must be an integer from 1 to \d+; received 99\. JAX sees \d+ cpu device"),
    ]
    for args, match in cases:
        with pytest.raises(SystemExit) as exit_info:
            raise SystemExit(main(["train", "count", "--steps", "5", *args] if "--steps" not in args
                                  else ["train", "count", *args]))
        assert exit_info.value.code == 2, args
        one_error_line(capsys.readouterr(), match)
    assert not (tmp_path / "new").exists()
    assert strict_json(count_run / "metrics.json")["resumed_at"] == []  # refused: left as it was
    copy = tmp_path / "copy"
    assert main(["train", "count", "--steps", "5", "--out", str(copy)]) == 1
    assert main(["train", "count", "--steps", "50", "--checkpoint-every", "20", "--out", str(copy), "--overwrite"]) == 1
    assert checkpoint_steps(copy / "checkpoints") == [20, 40, 50]  # the 5-step run's checkpoint is gone
    assert_same_run(copy, budget_run[0])


@pytest.mark.parametrize("argv, match", [
    (["train", "l1", "--max-length", "2147483647"],
     r"--batch-size 8 x --max-length 2,147,483,647 is 17,179,869,176 numbers"),
    (["train", "l1-learned", "--max-length", "2147483647"], r"--max-length 2,147,483,647 is"),
    (["train", "count", "--max-length", "1000000000"], r"8,000,000,000 numbers a step, more than the 100,000,000"),
    (["train", "l1", "--batch-size", "2147483647"], r"--batch-size 2,147,483,647 x --max-length 10 is"),
    (["sweep", "l1", "--seeds", "1000000000"], r"--seeds 1,000,000,000 x \D*8\D* x \D*10\D* is 80,000,000,000"),
    (["train", "count", "--batch-size", "1", "--max-length", "20000000"],
     r"--max-length 20000000: a count sequence is at most 16,777,216 long \(float32 counts are exact up to there\)$"),
])
def test_sizes_beyond_memory_are_refused_before_compiling(capsys, argv, match):
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < 5  # refused up front, not after minutes of compiling
    one_error_line(capsys.readouterr(), match)


@pytest.mark.parametrize("lr", ["1e-300", "1e-39", "1e300", "3.5e38"])
def test_a_learning_rate_beyond_float32s_range_is_refused(lr, capsys):
    """In float32 such a rate is 0 (nothing trains) or infinite (the first step diverges)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "l1", "--lr", lr])
    assert exit_info.value.code == 2
    one_error_line(capsys.readouterr(), rf"argument --lr: expected a number in \[1.175e-38, 3.403e\+38\]; "
                                        rf"received '{lr}'$")


@pytest.mark.slow
def test_a_tolerance_below_float32s_range_is_taken_by_train_and_sweep(capsys):
    """--tol 1e-50 is in (0, 1): it asks for the weights to be exactly 1.0."""
    assert main(["train", "l1", "--tol", "1e-50"]) == 0
    assert "W_ih = 1, W_hh = 1" in capsys.readouterr().out
    assert main(["sweep", "l1", "--seeds", "2", "--tol", "1e-50"]) == 0
    assert "converged 2 (100.0%): every watched number within 1e-50 of 1" in capsys.readouterr().out


# --- eval: every input format, any checkpoint, and each refusal before the checkpoint is read --

@pytest.mark.parametrize("name, content", [
    ("seq.npy", None), ("row.csv", "3,-5,7,-2\n"), ("column.csv", "\ufeff3\r\n-5\r\n7\r\n-2\r\n"),
    ("seq.txt", "3 -5\t7  -2\n"),
])
def test_eval_reads_each_format(l1_run, tmp_path, capsys, name, content):
    path = tmp_path / name
    np.save(path, np.array([3.0, -5.0, 7.0, -2.0])) if content is None else path.write_text(content)
    assert main(["eval", "l1", "--params", str(l1_run), "--input", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "length 4: predicted 17, exact 17 (float64), relative error 0.00e+00\n"
    assert captured.err == ""  # a converged run: no warning


def test_float32s_largest_number_as_numpy_prints_it_is_evaluated(l1_run, tmp_path, capsys):
    path = tmp_path / "x.csv"
    path.write_text("3.4028235e38")
    assert main(["eval", "l1", "--params", str(l1_run), "--input", str(path)]) == 0
    assert "predicted 3.40282347e+38, exact 3.4028235e+38 (float64), relative error 9.88e-09" in capsys.readouterr().out


def test_eval_of_a_result_beyond_its_accuracy_prints_it_and_exits_1(l1_run, capsys):
    """The plain loop's float32 sum drifts past 1e-6 by 1e5 steps: shown, and flagged; the
    compensated loop (the default) is within the 2 ulps rnnjax holds l1 to."""
    args = ["eval", "l1", "--params", str(l1_run), "--length", "100000", "--method", "sequential"]
    assert main([*args, "--precision", "plain"]) == 1
    captured = capsys.readouterr()
    error = float(captured.out.rsplit("relative error ", 1)[1])
    assert error > 1e-6
    assert captured.err == (f"rnnjax: error: do not trust these outputs: relative error {error:.2e}, above the 2.4e-07 "
                            "rnnjax holds l1 to; try --precision compensated (the default)\n")
    assert main(args) == 0
    assert float(capsys.readouterr().out.rsplit("relative error ", 1)[1]) <= 2.4e-7


@pytest.mark.slow
@pytest.mark.parametrize("length, method", [("10000", "parallel"), ("100000", "auto")])
def test_eval_of_a_long_random_sequence_is_within_two_ulps(l1_run, capsys, length, method):
    assert main(["eval", "l1", "--params", str(l1_run), "--length", length, "--method", method]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"length {length}: ") and captured.err == ""
    assert float(captured.out.rsplit("relative error ", 1)[1]) <= 2.4e-7


# The table, row by row, and more: one line naming the flag or file, exit 2. A tuple is
# an --input file (name, content, more flags); a list, the flags themselves.
@pytest.mark.parametrize("task, given, match", [
    ("l1", ("x.csv", None), r"--input \S+x.csv: no such file$"),
    ("l1", ("x.csv", "1\nabc\n"), r"--input \S+x.csv: line 2, column 1: 'abc' is not a number$"),
    ("l1", ("x.txt", "1e39"), r"x.txt: line 1, column 1: 1e39 is beyond float32's range"),
    ("l1", ("x.npy", bytes(range(7, 71))), r"x.npy: not a .npy file \(it does not start"),
    ("l1", ("x.csv", "3,,5"), r"x.csv: line 1, column 3: empty field"),
    ("l1", ("x.csv", "3,5\n7,2"), r"x.csv: line 1: 2 numbers on one line of a 2-line file"),
    ("l1", ("x.csv", "1_000"), r"x.csv: line 1, column 1: '1_000' is not a number$"),
    ("l1", ("x.txt", "3e38 3e38"), r"the L1 norm of this sequence, 6e\+38, is beyond float32's range"),
    ("count", ("x.csv", "0,2,1"), r"x.csv: line 1, column 3: 2 is not 0 or 1"),
    ("l1", ("x.txt", ""), r"x.txt: holds no numbers$"),
    ("l1", ("x.json", "[1]"), r"expected a .npy, .csv or .txt file; received '.json'$"),
    ("l1", ("x.npy", b"PK\x03\x04"), r"holds an .npz archive; expected one array"),
    ("l1", ("x\nname.csv", "1,a"), r"x\\nname.csv: line 1, column 3"),
    ("l1", ("x.csv", "1e-45,1e-40"), r"x.csv: line 1, column 1: 1e-45 is below float32's range"),
    ("l1", ("x.csv", "2,1e-400"), r"x.csv: line 1, column 3: 1e-400 is below float32's range"),
    ("l1", ("x.csv", "3,-5,7,-2", "--seed", "5"), r"--seed draws the random sequence of --length; --input reads its "
                                                  r"sequence from the file: give one of them$"),
    ("l1", ["--length", "abc"], r"argument --length: expected an integer from 1 to 100,000,000; received 'abc'$"),
    ("l1", ["--length", "0"], r"argument --length: expected an integer from 1 to 100,000,000; received '0'$"),
    ("l1", ["--length", "1_000"], r"received '1_000'$"),
    ("l1", ["--length", "100000001"], r"received '100000001'$"),
    ("l1", ["--length", "9" * 5000], r"received '9{40}\.\.\.'$"),
    ("count", ["--length", "20000000"], r"--length 20000000: a count sequence is at most 16,777,216 long .*"
                                         r"received 20,000,000 steps$"),
    ("l1", ["--length", "5", "--input", "x.csv"], r"not allowed with argument"),
    ("l1", ["--length", "3", "--seed", "99999999999999999999"],
     r"argument --seed: expected a seed, an integer in \[0, 2\*\*31\); received '99999999999999999999'$"),
    ("l1", ["--length", "3", "--method", "fast"], r"argument --method: invalid choice: 'fast'"),
    ("l1", ["--length", "3", "--params", ""], r"argument --params: expected a path; received ''$"),
])
def test_eval_bad_input_is_one_line_and_exit_2_before_the_checkpoint_is_read(
        l1_run, count_run, tmp_path, capsys, monkeypatch, task, given, match):
    if isinstance(given, tuple):
        name, content, *more = given
        if content is not None:
            (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        given = ["--input", str(tmp_path / name), *more]
    loads, load = [], rnnjax.app.runs.load_run
    monkeypatch.setattr(rnnjax.app.runs, "load_run", lambda *args: loads.append(args) or load(*args))
    params = {"l1": l1_run, "count": count_run}[task]
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(["eval", task, "--params", str(params), *given]))
    assert exit_info.value.code == 2
    one_error_line(capsys.readouterr(), match)
    # the input and every flag are checked first: only the L1 norm needs the network
    assert loads == ([(str(params), task)] if "L1 norm" in match else [])


def test_eval_refuses_a_missing_input_without_reading_the_checkpoint(l1_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rnnjax.app.runs, "load_run", lambda *args: pytest.fail("the checkpoint was read"))
    assert main(["eval", "l1", "--params", str(l1_run), "--input", str(tmp_path / "x.csv")]) == 2
    one_error_line(capsys.readouterr(), rf"^rnnjax: error: --input {tmp_path}/x.csv: no such file$")


def test_an_input_longer_than_eval_takes_is_refused(l1_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rnnjax.app.settings, "EVAL_MAX_LENGTH", 3)
    for name, content in (("x.csv", "1,2,3,4"), ("x.npy", None)):
        path = tmp_path / name
        np.save(path, np.ones(4)) if content is None else path.write_text(content)
        assert main(["eval", "l1", "--params", str(l1_run), "--input", str(path)]) == 2
        one_error_line(capsys.readouterr(), rf"--input {re.escape(str(path))}: holds more than 3 numbers, the most "
                                            r"one sequence may have$")


def test_eval_count_prints_the_running_counts_step_by_step(count_run, tmp_path, capsys):
    path = tmp_path / "bits.txt"
    path.write_text("1 0 1 1\n")
    assert main(["eval", "count", "--params", str(count_run), "--input", str(path)]) == 0
    assert capsys.readouterr().out == (
        "length 4: the running count after each step\n"
        "  step           1      2      3      4\n"
        "  input          1      0      1      1\n"
        "  exact          1      1      2      3\n"
        "  predicted 1.0000 1.0000 2.0000 3.0000\n"
        "final count predicted 3, exact 3; largest error over all steps 0.00e+00\n")
    # a long one: the first 8 steps and the last 3, the rest as one "..."
    path.write_text("1\n" * 1000)
    assert main(["eval", "count", "--params", str(count_run), "--input", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["step", *map(str, range(1, 9)), "...", "998", "999", "1000"]
    assert lines[3].split() == ["exact", *map(str, range(1, 9)), "...", "998", "999", "1000"]
    assert lines[4].split()[-1] == "1000.0000" and len(lines[4]) < 100
    assert lines[5] == "final count predicted 1000, exact 1000; largest error over all steps 0.00e+00"


def test_eval_takes_any_checkpoint_and_refuses_what_is_not_one(resumed_run, l1_run, tmp_path, capsys):
    out, _ = resumed_run
    steps = checkpoint_steps(out / "checkpoints")
    assert steps[:3] == [20, 40, 50] and len(steps) == 4
    for path in (out, out / "checkpoints", out / "checkpoints" / str(steps[-1])):
        assert main(["eval", "count", "--params", str(path), "--length", "50"]) == 0
        captured = capsys.readouterr()
        assert "largest error over all steps 0.00e+00" in captured.out and captured.err == ""
    assert main(["eval", "count", "--params", str(out / "checkpoints" / "20"), "--length", "50"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("length 50: the running count after each step\n")
    assert "\nfinal count predicted" in captured.out
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and re.fullmatch(
        rf"rnnjax: error: do not trust these outputs: --params \S+/20: not a converged run \(a checkpoint at step "
        rf"20; the run ended at step {steps[-1]}, stop reason: weights\)(; the count after step \d+ is off by "
        r"\S+: it rounds to a wrong count)?", error[0]), error

    cases = [
        (tmp_path / "nowhere", r"--params \S+nowhere: no such folder$"),
        (out / "metrics.json", r"--params \S+metrics.json: is a file; expected a run folder"),
        (tmp_path, r"--params \S+: holds no rnnjax checkpoint; expected a folder written by 'rnnjax train --out'$"),
        (l1_run, rf"--params {l1_run}: that run trained the 'l1' network, not 'count'$"),
    ]
    for path, match in cases:
        assert main(["eval", "count", "--params", str(path), "--length", "3"]) == 2
        one_error_line(capsys.readouterr(), match)
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    last = damaged / "checkpoints" / str(steps[-1])
    for data in (last / "state" / "d").iterdir():  # the arrays themselves
        data.write_bytes(data.read_bytes()[:-3] + b"\x00\x00\x00")
    assert main(["eval", "count", "--params", str(damaged), "--length", "3"]) == 2
    one_error_line(capsys.readouterr(), rf"{last}: (cannot be read|damaged checkpoint)")
    (last / "run" / "metadata").unlink()
    before = damaged / "checkpoints" / "50"
    assert main(["eval", "count", "--params", str(damaged), "--length", "3"]) == 2
    one_error_line(capsys.readouterr(), rf"{last}: not an rnnjax checkpoint \(no run/metadata\); the checkpoint "
                                        rf"before it may be whole: {before}$")
    assert main(["train", "count", "--out", str(damaged), "--resume"]) == 2
    one_error_line(capsys.readouterr(), rf"{last}: not an rnnjax checkpoint \(no run/metadata\); the checkpoint "
                                        r"before it may be whole: move that step folder aside to resume from "
                                        rf"{before}$")
    assert main(["eval", "count", "--params", str(before), "--length", "3"]) == 1  # whole, and not the end of its run


def test_load_run_reports_the_step_and_whether_the_run_converged(l1_run, budget_run, resumed_run, tmp_path):
    loaded = load_run(l1_run, "l1")
    assert loaded.converged and loaded.step == strict_json(l1_run / "metrics.json")["steps"]
    assert loaded.status == f"stop reason: weights, after {loaded.step} steps"
    assert load_run(budget_run[0], "count")[1:] == (50, False, "stop reason: budget, after 50 steps")
    last = checkpoint_steps(resumed_run[0] / "checkpoints")[-1]
    assert load_run(resumed_run[0] / "checkpoints" / "40", "count")[1:] == (
        40, False, f"a checkpoint at step 40; the run ended at step {last}, stop reason: weights")
    killed = tmp_path / "killed"
    shutil.copytree(budget_run[0], killed)
    (killed / "metrics.json").unlink()
    assert load_run(killed, "count").status == "interrupted or killed at step 50, before it ended"
    with pytest.raises(InputError, match=rf"^{tmp_path}/nowhere: no such folder$") as info:
        load_run(tmp_path / "nowhere", "count")
    assert info.value.name == "path"  # the library names its own argument, not a flag


def test_train_run_without_a_folder_saves_nothing():
    run_ = train_run("count", seed=3, given={"steps": 30})
    assert (run_.first_seed, run_.seed, run_.dead_seeds, run_.paths) == (3, 3, [], [])
    assert (run_.result.steps, run_.result.stop_reason, run_.settings["checkpoint_every"]) == (30, "budget", 1000)


@pytest.mark.parametrize("seed", [-1, 2**31])
def test_train_run_refuses_a_seed_the_cli_would_refuse(seed):
    with pytest.raises(InputError, match=rf"^seed must be a seed, an integer in \[0, 2\*\*31\); received {seed}\.$"):
        train_run("count", seed=seed, given={"steps": 30})


@pytest.mark.parametrize("edit, match", [
    (("settings", "length", 10**10), r"settings out of range: length\)$"),
    (("settings", "batch_size", 0), r"settings out of range: batch_size\)$"),
    (("settings", "batch_size", 10**12), r"settings out of range: batch_size\)$"),
    (("settings", "batch_size", 10**8), r"settings out of range: batch_size\)$"),  # batch_size x length
    (("settings", "lr", "abc"), r"settings out of range: lr\)$"),
    (("settings", "lr", -1.0), r"settings out of range: lr\)$"),
    (("settings", "tol", 2.0), r"settings out of range: tol\)$"),
    (("settings", "recipe", ["x"]), r"settings out of range: recipe\)$"),
    (("settings", "b2", 0.5), r"settings out of range: b2\)$"),
    (("settings", "steps", True), r"settings out of range: steps\)$"),
    (("seed", None, 2**70), r"damaged checkpoint \(run/metadata: bad seed\)$"),
    (("first_seed", None, -1), r"not a checkpoint of an rnnjax run"),
    (("resumed_at", None, [float("nan")]), r"damaged checkpoint \(run/metadata: NaN is not strict JSON\)$"),
    (("resumed_at", None, ["x"]), r"not a checkpoint of an rnnjax run"),
    (("dead_seeds", None, list(range(20))), r"not a checkpoint of an rnnjax run"),
    (("dead_seeds", None, [{"a": 1}]), r"not a checkpoint of an rnnjax run"),
    (("task", None, ["l1"]), r"not a checkpoint of an rnnjax run"),
    (("settings", "dead_steps", 0), r"settings out of range: dead_steps\)$"),
    (("settings", "lr", 1e300), r"settings out of range: lr\)$"),
    (("settings", "lr", 2**63), r"settings out of range: lr\)$"),
    (("settings", "lr", "a 5,000-digit integer"), r"damaged checkpoint \(run/metadata: Exceeds the limit"),
])
def test_a_checkpoint_with_settings_no_run_writes_is_refused_naming_it(l1_run, tmp_path, capsys, edit, match):
    damaged = tmp_path / "damaged"
    shutil.copytree(l1_run, damaged)
    (damaged / "metrics.json").unlink()  # so that resume reads the checkpoint
    last = damaged / "checkpoints" / str(checkpoint_steps(damaged / "checkpoints")[-1])
    metadata = last / "run" / "metadata"
    info = json.loads(metadata.read_text())
    where, name, value = edit
    value = 10**5000 if value == "a 5,000-digit integer" else value
    if where == "settings":
        info["run"]["settings"][name] = value
    elif where == "seed":
        info["seed"] = value
    else:
        info["run"][where] = value
    sys.set_int_max_str_digits(0)  # to write a 5,000-digit number, which Python then refuses to read
    try:
        metadata.write_text(json.dumps(info))
    finally:
        sys.set_int_max_str_digits(4300)
    for argv, flag in ((["eval", "l1", "--params", str(damaged), "--length", "3"], "--params "),
                       (["train", "l1", "--out", str(damaged), "--resume", "--steps", "5000"], "--out ")):
        assert main(argv) == 2, argv
        one_error_line(capsys.readouterr(), rf"^rnnjax: error: {flag}{re.escape(str(last))}: .*{match}")


# --- demo, --version, --help ------------------------------------------------------------

def test_demo_trains_both_networks_and_prints_its_checks(capsys, monkeypatch):
    # The fast tier's demo: in-process, the 10,000-step check by the loop (the parallel scan
    # compiles for seconds); test_demo_as_a_program runs it as it is.
    check = rnnjax.app.tasks.l1_check
    monkeypatch.setattr(rnnjax.app.tasks, "l1_check", lambda params, sequence: check(params, sequence, "sequential"))
    assert main(["demo"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert out.startswith("Recipe squared: ") and "seed 0: init W_ih = " in out
    assert out.count("W_ih = 1, W_hh = 1") == 2  # both networks trained exactly
    assert "[3, -5, 7, -2]: predicted 17, exact 17" in out
    assert float(out.split("10,000 N(0,1) steps:")[1].split("relative error ")[1].split()[0]) < 1e-5
    assert "largest error: 0.00e+00" in out and re.search(r"demo took \S+ s on cpu\n$", out)
    assert captured.err == ""


@pytest.mark.slow
def test_demo_as_a_program():
    result = subprocess.run([sys.executable, "-m", "rnnjax", "demo"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "trained" in out and "W_ih = 1, W_hh = 1" in out
    assert "[3, -5, 7, -2]: predicted 17, exact 17" in out
    error = float(out.split("10,000 N(0,1) steps:")[1].split("relative error ")[1].split()[0])
    assert error < 1e-5
    assert "largest error: 0.00e+00" in out or float(out.split("largest error: ")[1].split()[0]) < 1e-3


def test_version_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and re.fullmatch(r"rnnjax \d+\.\d+\.\d+\n", capsys.readouterr().out)
    result = subprocess.run([sys.executable, "-m", "rnnjax", "fly"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("rnnjax: error: argument command: invalid choice: 'fly'"), result.stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help_answers_within_a_second_without_jax(argv):
    took = []
    for _ in range(3):  # the best of up to 3: other work on the machine only adds time
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "rnnjax", *argv], capture_output=True, text=True, timeout=60)
        took.append(time.perf_counter() - start)
        assert result.returncode == 0 and result.stdout.startswith("usage: rnnjax") and result.stderr == ""
        if took[-1] < 1:
            break
    assert min(took) < 1, took
    code = ("import sys\nfrom rnnjax.app.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nassert 'jax' not in sys.modules, 'help imported jax'")
    subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True, timeout=60)


def test_import_rnnjax_does_not_import_jax():
    subprocess.run([sys.executable, "-c", "import rnnjax, sys; assert 'jax' not in sys.modules; rnnjax.__version__"],
                   check=True, timeout=60)


# --- what main() does with what goes wrong inside a command --------------------------------

@pytest.mark.parametrize("error", [RuntimeError("boom"), ValueError("a ValueError that is no InputError"),
                                   TypeError("a TypeError\nof two lines")])
def test_a_bug_in_a_command_keeps_its_traceback(l1_run, capsys, monkeypatch, error):
    def l1_check(*args, **kwargs):
        raise error

    monkeypatch.setattr(rnnjax.app.tasks, "l1_check", l1_check)
    assert main(["eval", "l1", "--params", str(l1_run), "--length", "3"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("Traceback (most recent call last):\n")
    assert f"in l1_check\n    raise error\n{type(error).__name__}: " in captured.err
    last = captured.err.rstrip("\n").split("\n")[-1]
    assert last == (f"rnnjax: error: internal error, a bug in rnnjax: {type(error).__name__}: "
                    + str(error).replace("\n", "\\n")), last


@pytest.mark.parametrize("error, message", [
    (MemoryError(), "out of memory; try a shorter sequence or a smaller batch"),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1e12 bytes"),
     "out of memory; try a shorter sequence or a smaller batch"),
    (OSError(28, "No space left on device", "/full/disk"), "/full/disk: No space left on device"),
])
def test_a_machine_that_cannot_do_it_is_one_line_and_exit_1(l1_run, capsys, monkeypatch, error, message):
    def l1_check(*args, **kwargs):
        raise error

    monkeypatch.setattr(rnnjax.app.tasks, "l1_check", l1_check)
    assert main(["eval", "l1", "--params", str(l1_run), "--length", "3"]) == 1
    assert capsys.readouterr() == ("", f"rnnjax: error: {message}\n")


def test_main_leaves_the_hooks_log_levels_and_signal_handler_as_they_were(l1_run, tmp_path, monkeypatch):
    def hook(unraisable):
        pass

    def l1_check(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(sys, "unraisablehook", hook)
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    before = [logger.level for logger in loggers]
    handler = signal.getsignal(signal.SIGINT)
    try:
        for logger, level in zip(loggers, (logging.INFO, logging.WARNING)):
            logger.setLevel(level)
        for argv, status in [(["--params", str(l1_run), "--length", "3"], 0),  # done
                             (["--params", str(tmp_path), "--length", "3"], 2),  # refused: an InputError
                             (["--params", str(l1_run), "--length", "0"], 2),  # refused by argparse: SystemExit
                             (["--params", str(l1_run), "--length", "4", "bug"], 1)]:  # a bug
            if argv[-1] == "bug":
                monkeypatch.setattr(rnnjax.app.tasks, "l1_check", l1_check)
                argv = argv[:-1]
            assert run(["eval", "l1", *argv])[0] == status, argv
            assert sys.unraisablehook is hook and signal.getsignal(signal.SIGINT) is handler
            assert [logger.level for logger in loggers] == [logging.INFO, logging.WARNING]
    finally:
        for logger, level in zip(loggers, before):
            logger.setLevel(level)


@pytest.mark.slow
def cpu_seconds(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """The processor time a program takes (user and system), which another load on the machine
    changes far less than its wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), result


@pytest.mark.slow
def test_eval_answers_within_a_second_of_importing_jax(l1_run, tmp_path):
    """The issue's target is 2 s on a quiet 2-core CPU, where importing JAX, Flax, optax and
    orbax alone takes 1.6 s (eval took 2.0 to 2.4 s there on 2026-12-07; 5 to 15 s before it
    stopped compiling the training program). What eval adds to those imports is held here, in
    processor time, so that a loaded machine does not fail it."""
    path = tmp_path / "x.csv"
    path.write_text("3,-5,7,-2\n")
    took, importing = [], []
    for _ in range(3):
        importing.append(cpu_seconds([sys.executable, "-c", "import jax, flax.linen, optax, orbax.checkpoint"])[0])
        seconds, result = cpu_seconds([sys.executable, "-m", "rnnjax", "eval", "l1", "--params", str(l1_run),
                                       "--input", str(path)])
        took.append(seconds)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert result.stdout == "length 4: predicted 17, exact 17 (float64), relative error 0.00e+00\n"
    # 1.0 s until compensation (issue 32): its float64 loop compiles longer, 1.2 to 1.3 s here
    # on 2026-12-07; held at 1.5 s until eval compiles less (the closing note of that stop)
    assert statistics.median(took) - statistics.median(importing) < 1.5, (took, importing)


# --- subprocesses: orbax's logs, Ctrl-C and kills ------------------------------------------

@pytest.mark.slow
def test_a_damaged_checkpoint_is_one_line_whatever_orbax_logs(count_run, tmp_path):
    # orbax's threads fail after the command has ended, now and then (about 1 run in 3 for
    # train --resume, 1 in 12 for eval): a few tries of each
    damaged = tmp_path / "damaged"
    shutil.copytree(count_run, damaged)
    (damaged / "metrics.json").unlink()  # so that resume reads the checkpoint
    last = damaged / "checkpoints" / str(checkpoint_steps(damaged / "checkpoints")[-1])
    metadata = last / "_CHECKPOINT_METADATA"
    metadata.write_bytes(metadata.read_bytes()[:40])  # orbax logs errors as it reads this
    manifest = last / "state" / "manifest.ocdbt"
    data = manifest.read_bytes()
    manifest.write_bytes(data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:])
    for argv in [["eval", "count", "--params", str(damaged), "--length", "3"],
                 ["train", "count", "--out", str(damaged), "--resume"]] * 3:
        result = subprocess.run([sys.executable, "-m", "rnnjax", *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stdout == "", result.stderr
        flag = "--params" if argv[0] == "eval" else "--out"
        assert result.stderr.startswith(f"rnnjax: error: {flag} {last}: cannot be read (ValueError: DATA_LOSS"), \
            result.stderr
        assert result.stderr.count("\n") == 1, result.stderr


def wait_for_checkpoint(process, folder, step, timeout=120):
    """Waits until the training ``process`` has saved a checkpoint at ``step`` or later."""
    deadline = time.monotonic() + timeout
    while max(checkpoint_steps(folder), default=-1) < step:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_exits_130_and_the_run_resumes_exactly(count_run, tmp_path):
    out = tmp_path / "run"
    process = rnnjax_process("train", "count", "--checkpoint-every", "1", "--out", str(out))
    wait_for_checkpoint(process, out / "checkpoints", 3)
    process.send_signal(signal.SIGINT)  # as Ctrl-C sends it
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    step = int(re.fullmatch(rf"rnnjax: interrupted at step (\d+) \(saved in {out}\); continue with: "
                            rf"rnnjax train count --out {out} --resume", last).group(1))
    assert step >= 3 and checkpoint_steps(out / "checkpoints")[-1] == step
    assert not (out / "metrics.json").exists()  # an interrupted run has not ended
    assert main(["train", "count", "--out", str(out), "--resume", "--checkpoint-every", "1000"]) == 0
    assert strict_json(out / "metrics.json")["resumed_at"] == [step]
    assert_same_run(out, count_run)


@pytest.mark.slow
def test_ctrl_c_while_compiling_leaves_a_resumable_checkpoint(tmp_path):
    out = tmp_path / "run"
    process = rnnjax_process("train", "count", "--seed", "3", "--out", str(out))
    while not out.exists():  # the folder is made just before training starts, and compiling
        assert process.poll() is None
        time.sleep(0.001)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    assert re.fullmatch(rf"rnnjax: interrupted at step 0 \(saved in {out}\); continue with: "
                        rf"rnnjax train count --out {out} --resume", err.strip().splitlines()[-1])
    assert checkpoint_steps(out / "checkpoints") == [0]  # never an empty folder


@pytest.mark.slow
def test_ctrl_c_while_starting_up_is_one_line_and_exit_130(tmp_path):
    # Importing JAX takes a second or two: a Ctrl-C then must cut no import short (a
    # KeyboardInterrupt inside a C extension's import becomes an ImportError) nor be swallowed.
    out = tmp_path / "run"
    process = rnnjax_process("train", "count", "--seed", "3", "--out", str(out))
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("rnnjax: interrupted")
    assert not out.exists() or checkpoint_steps(out / "checkpoints")  # never an empty folder


@pytest.mark.slow
def test_a_run_killed_at_any_moment_resumes_to_the_uninterrupted_bits(count_run, tmp_path, capsys):
    # A checkpoint every step: most of the run's time is spent saving, so the kills below land
    # mid-save (or mid-deletion of an old step) as often as not.
    out = tmp_path / "run"
    rng = np.random.default_rng(7)
    for kill in range(2):
        args = ["--out", str(out), "--resume"] if kill else ["--out", str(out)]
        process = rnnjax_process("train", "count", "--checkpoint-every", "1", *args)
        wait_for_checkpoint(process, out / "checkpoints", max(checkpoint_steps(out / "checkpoints"), default=0) + 3)
        time.sleep(rng.uniform(0, 0.1))
        process.kill()  # SIGKILL: no handler runs
        process.communicate()
        assert process.returncode == -9
        assert main(["eval", "count", "--params", str(out), "--length", "5"]) == 1  # the last whole step loads
        assert "interrupted or killed at step" in capsys.readouterr().err
    assert main(["train", "count", "--out", str(out), "--resume", "--checkpoint-every", "1000"]) == 0
    assert len(strict_json(out / "metrics.json")["resumed_at"]) == 2
    assert_same_run(out, count_run)


def test_every_command_names_what_it_requires_and_lists_the_tasks(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "l1", "--length", "3"])
    assert exit_.value.code == 2
    one_error_line(capsys.readouterr(), r"required: --params$")
    for command in ("train", "eval", "sweep"):  # each task described in one line
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = capsys.readouterr().out
        for task, line in rnnjax.app.settings.TASKS.items():
            assert re.search(rf"^  {re.escape(task)} +{re.escape(line)}$", shown, re.MULTILINE), shown
