"""The rnnjax command: demo, train, eval; runs that never mislead; one-line errors with exit 2."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from rnnjax.checkpoints import checkpoint_steps, restore_checkpoint
from rnnjax.cli import main
from rnnjax.runs import load_run, train_run
from rnnjax.tasks import task_settings, task_start


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


def assert_same_run(out, reference):
    assert_same_run_of(out, reference, "count")


def assert_same_run_of(out, reference, task):
    one, two = final_state(out, task), final_state(reference, task)
    assert one.steps == two.steps
    chex.assert_trees_all_equal(one.state, two.state)  # parameters and optimizer state, bitwise
    chex.assert_trees_all_equal(one.history, two.history)


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


@pytest.mark.parametrize("task", ["l1", "count"])
def test_default_runs_end_converged_from_seed_0(l1_run, count_run, task):
    out = {"l1": l1_run, "count": count_run}[task]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.json", "training.png"]
    metrics = strict_json(out / "metrics.json")
    assert metrics["converged"] is True and metrics["stop_reason"] == "weights"
    # the default recipe trains v with W_ih = v*v: seed 0's W_ih = (-0.267)^2 is not dead
    assert (metrics["first_seed"], metrics["seed"], metrics["dead_seeds"]) == (0, 0, [])
    assert metrics["settings"] == {**task_settings(task), "checkpoint_every": 1000}
    assert metrics["settings"]["recipe"] == "squared" and metrics["settings"]["steps"] == 3000
    assert metrics["settings"]["lr"] == 0.1 and metrics["devices"] == 1
    assert metrics["weights"] == {"cell/W_hh": [[1.0]], "cell/W_ih": [[1.0]]}  # W_ih = v*v, exactly 1
    assert metrics["watched"] == {"cell/W_hh": 1.0, "cell/W_ih": 1.0}
    assert metrics["initial_weights"]["cell/W_ih"][0][0] == pytest.approx(0.267270803**2)
    assert metrics["method"] == "sequential" and metrics["versions"]["backend"] == "cpu"
    assert len(metrics["history"]["loss"]) == metrics["steps"] and metrics["skipped_steps"] == 0
    assert checkpoint_steps(out / "checkpoints") == [metrics["steps"]]
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name, content", [
    ("seq.npy", None), ("row.csv", "3,-5,7,-2\n"), ("column.csv", "\ufeff3\r\n-5\r\n7\r\n-2\r\n"),
    ("seq.txt", "3 -5\t7  -2\n"),
])
def test_eval_reads_each_format(l1_run, tmp_path, capsys, name, content):
    path = tmp_path / name
    np.save(path, np.array([3.0, -5.0, 7.0, -2.0])) if content is None else path.write_text(content)
    assert main(["eval", "l1", "--params", str(l1_run), "--input", str(path)]) == 0
    captured = capsys.readouterr()
    assert "length 4: predicted 17, exact 17 (float64), relative error 0.00e+00" in captured.out
    assert captured.err == ""  # a converged run: no warning


def test_eval_on_a_long_random_sequence(l1_run, capsys):
    assert main(["eval", "l1", "--params", str(l1_run), "--length", "10000", "--method", "parallel"]) == 0
    error = float(capsys.readouterr().out.rsplit("relative error ", 1)[1])
    assert error < 1e-6


def test_eval_of_a_result_beyond_its_accuracy_prints_it_and_exits_1(l1_run, capsys):
    """The loop's float32 sum drifts past 1e-6 by 1e5 steps: shown, and flagged."""
    assert main(["eval", "l1", "--params", str(l1_run), "--length", "100000", "--method", "sequential"]) == 1
    captured = capsys.readouterr()
    error = float(captured.out.rsplit("relative error ", 1)[1])
    assert error > 1e-6
    assert captured.err == (f"rnnjax: error: do not trust these outputs: relative error {error:.2e}, above the 1e-06 "
                            "rnnjax holds l1 to; try --method auto (the default)\n")
    assert main(["eval", "l1", "--params", str(l1_run), "--length", "100000"]) == 0
    assert float(capsys.readouterr().out.rsplit("relative error ", 1)[1]) < 1e-6


# The table, row by row, and more: one line naming the flag or file, exit 2. A tuple is
# an --input file (name, content); a list, the flags themselves.
@pytest.mark.parametrize("task, given, match", [
    ("l1", ("x.csv", None), r"--input \S+x.csv: no such file$"),
    ("l1", ("x.csv", "1\nabc\n"), r"x.csv: line 2, column 1: 'abc' is not a number$"),
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
    ("l1", ["--length", "abc"], r"argument --length: expected a length from 1 to 100,000,000; received 'abc'$"),
    ("l1", ["--length", "0"], r"argument --length: expected a length .*; received '0'$"),
    ("l1", ["--length", "1_000"], r"received '1_000'$"),
    ("l1", ["--length", "100000001"], r"received '100000001'$"),
    ("l1", ["--length", "9" * 5000], r"received '9{40}\.\.\.'$"),
    ("count", ["--length", "20000000"], r"--length 20000000: a count sequence is at most 16,777,216 long .*"
                                         r"received 20,000,000 steps$"),
    ("l1", ["--length", "5", "--input", "x.csv"], r"not allowed with argument"),
    ("l1", ["--length", "3", "--seed", "99999999999999999999"], r"expected a seed in"),
    ("l1", ["--length", "3", "--method", "fast"], r"argument --method: invalid choice: 'fast'"),
    ("l1", ["--length", "3", "--params", ""], r"argument --params: expected a path; received ''$"),
    ("l1", ("x.csv", "1e-45,1e-40"), r"x.csv: line 1, column 1: 1e-45 is below float32's range"),
    ("l1", ("x.csv", "2,1e-400"), r"x.csv: line 1, column 3: 1e-400 is below float32's range"),
    ("l1", ("x.csv", "3,-5,7,-2", "--seed", "5"), r"--seed draws the random sequence of --length; --input reads its "
                                                  r"sequence from the file: give one of them$"),
])
def test_eval_bad_input_is_one_line_and_exit_2(l1_run, count_run, tmp_path, capsys, task, given, match):
    if isinstance(given, tuple):
        name, content, *more = given
        if content is not None:
            (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        given = ["--input", str(tmp_path / name), *more]
    run = {"l1": l1_run, "count": count_run}[task]
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(["eval", task, "--params", str(run), *given]))
    assert exit_info.value.code == 2
    one_error_line(capsys.readouterr(), match)


def test_eval_takes_any_checkpoint_and_refuses_what_is_not_one(l1_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "count", "--checkpoint-every", "100", "--out", str(out)]) == 0
    steps = checkpoint_steps(out / "checkpoints")
    assert steps == [100, 200, 300, steps[-1]] and steps[-1] > 300
    capsys.readouterr()
    for path in (out, out / "checkpoints", out / "checkpoints" / str(steps[-1])):
        assert main(["eval", "count", "--params", str(path), "--length", "50"]) == 0
        captured = capsys.readouterr()
        assert "largest error over all steps 0.00e+00" in captured.out and captured.err == ""
    assert main(["eval", "count", "--params", str(out / "checkpoints" / "100"), "--length", "50"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("length 50: final count predicted")
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and re.fullmatch(
        rf"rnnjax: error: do not trust these outputs: --params \S+/100: not a converged run \(a checkpoint at step "
        rf"100; the run ended at step {steps[-1]}, stop reason: weights\)(; the count after step \d+ is off by "
        r"\S+: it rounds to a wrong count)?", error[0])

    cases = [
        (tmp_path / "nowhere", r"--params \S+nowhere: no such folder$"),
        (out / "metrics.json", r"--params \S+metrics.json: is a file; expected a run folder"),
        (tmp_path, r"--params \S+: holds no rnnjax checkpoint; expected a folder written by 'rnnjax train --out'$"),
    ]
    for path, match in cases:
        assert main(["eval", "count", "--params", str(path), "--length", "3"]) == 2
        one_error_line(capsys.readouterr(), match)
    assert main(["eval", "count", "--params", str(l1_run), "--length", "3"]) == 2
    one_error_line(capsys.readouterr(), r"that run trained the 'l1' network, not 'count'$")
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    last = damaged / "checkpoints" / str(steps[-1])
    for data in (last / "state" / "d").iterdir():  # the arrays themselves
        data.write_bytes(data.read_bytes()[:-3] + b"\x00\x00\x00")
    assert main(["eval", "count", "--params", str(damaged), "--length", "3"]) == 2
    one_error_line(capsys.readouterr(), rf"{last}: (cannot be read|damaged checkpoint)")
    (last / "run" / "metadata").unlink()
    before = damaged / "checkpoints" / "300"
    assert main(["eval", "count", "--params", str(damaged), "--length", "3"]) == 2
    one_error_line(capsys.readouterr(), rf"{last}: not an rnnjax checkpoint \(no run/metadata\); the checkpoint "
                                        rf"before it may be whole: --params {before}$")
    assert main(["train", "count", "--out", str(damaged), "--resume"]) == 2
    one_error_line(capsys.readouterr(), rf"{last}: not an rnnjax checkpoint \(no run/metadata\); the checkpoint "
                                        rf"before it may be whole: move that step folder aside to resume from {before}$")
    assert main(["eval", "count", "--params", str(before), "--length", "3"]) == 1  # whole, and not the end of its run


def test_a_damaged_checkpoint_is_one_line_whatever_orbax_logs(count_run, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(count_run, damaged)
    last = damaged / "checkpoints" / str(checkpoint_steps(damaged / "checkpoints")[-1])
    metadata = last / "_CHECKPOINT_METADATA"
    metadata.write_bytes(metadata.read_bytes()[:40])  # orbax logs errors as it reads this
    manifest = last / "state" / "manifest.ocdbt"
    data = manifest.read_bytes()
    manifest.write_bytes(data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:])
    result = subprocess.run([sys.executable, "-m", "rnnjax", "eval", "count", "--params", str(damaged),
                             "--length", "3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"rnnjax: error: {last}: cannot be read (ValueError: DATA_LOSS")
    assert result.stderr.count("\n") == 1, result.stderr


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
                        r"run \(stop reason: diverged, after 0 steps\)(; relative error \S+, above the 1e-06 rnnjax "
                        r"holds l1 to)?\n", captured.err), captured.err
    assert captured.out.startswith("length 5: predicted")


def test_a_run_out_of_budget_exits_1_and_resumes_to_the_uninterrupted_bits(count_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "count", "--steps", "50", "--out", str(out)]) == 1
    train_error_line(capsys.readouterr(), rf"not converged within 50 steps \(saved in {out}\); continue "
                                          rf"with: rnnjax train count --out {out} --resume --steps N$")
    assert strict_json(out / "metrics.json")["stop_reason"] == "budget"
    assert main(["train", "count", "--out", str(out), "--resume"]) == 2
    one_error_line(capsys.readouterr(), r"that run spent its budget of 50 steps; pass a larger --steps to continue it$")
    assert main(["train", "count", "--out", str(out), "--resume", "--lr", "0.2", "--steps", "5000"]) == 2
    one_error_line(capsys.readouterr(), rf"--lr 0.2: the run in {out} trains with 0.1; a resumed run keeps "
                                        r"its settings$")
    assert main(["train", "count", "--out", str(out), "--resume", "--steps", "5000"]) == 0
    metrics = strict_json(out / "metrics.json")
    assert metrics["resumed_at"] == [50] and metrics["settings"]["steps"] == 5000 and metrics["converged"]
    assert_same_run(out, count_run)
    capsys.readouterr()
    assert main(["train", "count", "--out", str(out), "--resume", "--steps", "6000"]) == 2
    one_error_line(capsys.readouterr(), r"that run already ended \(every watched weight within tolerance of the target")


def test_the_out_folder_is_checked_before_training(count_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "todo.txt").write_text("")
    cases = [
        (["--out", str(blocker)], rf"--out {blocker}: exists and is not a folder$"),
        (["--out", str(blocker / "run")], rf"--out {blocker}/run: cannot write there \(Not a directory\)$"),
        (["--out", str(count_run)], r"already holds a run; pass --resume to continue it or --overwrite to replace it$"),
        (["--out", str(stranger), "--overwrite"],
         r"holds files that are not an rnnjax run \('todo.txt'\); choose another folder$"),
        (["--out", str(tmp_path / "new"), "--resume"], r"holds no run to resume \(no checkpoints folder\)$"),
        (["--checkpoint-every", "10"], r"--resume, --overwrite and --checkpoint-every need --out$"),
        (["--out", str(count_run), "--resume", "--seed", "5"], r"--seed 5: the run in \S+ started from seed 0"),
        (["--out", str(count_run), "--resume", "--overwrite"],
         r"argument --overwrite: not allowed with argument --resume"),
        (["--steps", "1e3"], r"argument --steps: expected a positive integer; received '1e3'$"),
        (["--lr", "nan"], r"argument --lr: expected a learning rate from 1.175e-38 to 3.403e\+38 \(float32's range\); received 'nan'$"),
        (["--tol", "-1"], r"argument --tol: expected a tolerance in \(0, 1\); received '-1'$"),
        (["--tol", "1"], r"argument --tol: expected a tolerance in \(0, 1\); received '1'$"),
        (["--skip-nonfinite", "-1"], r"argument --skip-nonfinite: expected an integer >= 0; received '-1'$"),
        (["--devices", "99"],
         r"--devices: devices must be an integer from 1 to \d+ \(the cpu devices JAX sees\); received 99\. "),
    ]
    for args, match in cases:
        with pytest.raises(SystemExit) as exit_info:
            raise SystemExit(main(["train", "count", "--steps", "5", *args] if "--steps" not in args
                                  else ["train", "count", *args]))
        assert exit_info.value.code == 2, args
        one_error_line(capsys.readouterr(), match)
    assert not (tmp_path / "new").exists()
    assert main(["train", "count", "--steps", "5", "--out", str(count_run.parent / "copy")]) == 1
    assert main(["train", "count", "--out", str(count_run.parent / "copy"), "--overwrite"]) == 0
    assert_same_run(count_run.parent / "copy", count_run)


def test_saved_files_have_the_usual_permissions(l1_run):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("metrics.json", "training.png"):
        assert (l1_run / name).stat().st_mode & 0o777 == 0o666 & ~umask


def rnnjax(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "rnnjax", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_checkpoint(process, folder, step, timeout=120):
    """Waits until the training ``process`` has saved a checkpoint at ``step`` or later."""
    deadline = time.monotonic() + timeout
    while max(checkpoint_steps(folder), default=-1) < step:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_ctrl_c_saves_a_checkpoint_exits_130_and_the_run_resumes_exactly(count_run, tmp_path, capsys):
    out = tmp_path / "run"
    process = rnnjax("train", "count", "--checkpoint-every", "1", "--out", str(out))
    wait_for_checkpoint(process, out / "checkpoints", 3)
    process.send_signal(2)  # SIGINT, as Ctrl-C sends it
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


def test_ctrl_c_while_compiling_leaves_a_resumable_checkpoint(tmp_path):
    out = tmp_path / "run"
    process = rnnjax("train", "count", "--seed", "3", "--out", str(out))
    while not out.exists():  # the folder is made just before training starts, and compiling
        assert process.poll() is None
        time.sleep(0.001)
    process.send_signal(2)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    assert re.fullmatch(rf"rnnjax: interrupted at step 0 \(saved in {out}\); continue with: "
                        rf"rnnjax train count --out {out} --resume", err.strip().splitlines()[-1])
    assert checkpoint_steps(out / "checkpoints") == [0]  # never an empty folder


def test_ctrl_c_while_starting_up_is_one_line_and_exit_130(tmp_path):
    # Importing JAX takes a second or two: a Ctrl-C then must cut no import short (a
    # KeyboardInterrupt inside a C extension's import becomes an ImportError) nor be swallowed.
    out = tmp_path / "run"
    process = rnnjax("train", "count", "--seed", "3", "--out", str(out))
    time.sleep(0.2)
    process.send_signal(2)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("rnnjax: interrupted")
    assert not out.exists() or checkpoint_steps(out / "checkpoints")  # never an empty folder


def test_a_run_killed_at_any_moment_resumes_to_the_uninterrupted_bits(count_run, tmp_path, capsys):
    # A checkpoint every step: most of the run's time is spent saving, so the kills below land
    # mid-save (or mid-deletion of an old step) as often as not.
    out = tmp_path / "run"
    rng = np.random.default_rng(7)
    for kill in range(2):
        args = ["--out", str(out), "--resume"] if kill else ["--out", str(out)]
        process = rnnjax("train", "count", "--checkpoint-every", "1", *args)
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


def test_demo_trains_both_networks_and_checks_them():
    result = subprocess.run([sys.executable, "-m", "rnnjax", "demo"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "trained" in out and "W_ih = 1, W_hh = 1" in out
    assert "[3, -5, 7, -2]: predicted 17, exact 17" in out
    error = float(out.split("10,000 N(0,1) steps:")[1].split("relative error ")[1].split()[0])
    assert error < 1e-5
    assert "largest error: 0.00e+00" in out or float(out.split("largest error: ")[1].split()[0]) < 1e-3


def test_unknown_command_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "-m", "rnnjax", "fly"], capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv, match", [
    (["train", "l1", "--max-length", "2147483647"], r"--batch-size 8 x --max-length 2,147,483,647 is 17,179,869,176 numbers"),
    (["train", "l1-learned", "--max-length", "2147483647"], r"--max-length 2,147,483,647 is"),
    (["train", "count", "--max-length", "1000000000"], r"8,000,000,000 numbers a step, more than the 100,000,000"),
    (["train", "l1", "--batch-size", "2147483647"], r"--batch-size 2,147,483,647 x --max-length 10 is"),
    (["sweep", "l1", "--seeds", "1000000000"], r"--seeds 1,000,000,000 x 8 sequences x 10 steps is 80,000,000,000"),
    (["train", "count", "--batch-size", "1", "--max-length", "20000000"],
     r"--max-length 20000000: a count sequence is at most 16,777,216 long \(float32 counts are exact up to there\)$"),
])
def test_sizes_beyond_memory_are_refused_before_compiling(capsys, argv, match):
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < 5  # refused up front, not after minutes of compiling
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err


def test_load_run_reports_the_step_and_whether_the_run_converged(l1_run, tmp_path):
    loaded = load_run(l1_run, "l1")
    assert loaded.converged and loaded.step == strict_json(l1_run / "metrics.json")["steps"]
    train_run("count", first_seed=3, given={"steps": 30}, out=tmp_path)
    loaded = load_run(tmp_path, "count")
    assert (loaded.converged, loaded.step, loaded.status) == (False, 30, "stop reason: budget, after 30 steps")


@pytest.mark.parametrize("edit, match", [
    (("settings", "length", 10**10), r"settings out of range: length\)$"),
    (("settings", "batch_size", 0), r"settings out of range: batch_size\)$"),
    (("settings", "batch_size", 10**12), r"settings out of range: batch_size\)$"),
    (("settings", "batch_size", 10**8), r"settings out of range: batch_size x length\)$"),
    (("settings", "lr", "abc"), r"settings out of range: lr\)$"),
    (("settings", "lr", -1.0), r"settings out of range: lr\)$"),
    (("settings", "tol", 2.0), r"settings out of range: tol\)$"),
    (("settings", "recipe", ["x"]), r"settings out of range: recipe, b2\)$"),
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
    for argv in (["eval", "l1", "--params", str(damaged), "--length", "3"],
                 ["train", "l1", "--out", str(damaged), "--resume", "--steps", "5000"]):
        assert main(argv) == 2
        one_error_line(capsys.readouterr(), rf"^rnnjax: error: {re.escape(str(last))}: .*{match}")


def test_a_run_killed_after_its_final_checkpoint_resumes_to_its_end_without_a_step_more(l1_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(l1_run, out)
    (out / "metrics.json").unlink()  # killed between the final checkpoint and metrics.json
    last = checkpoint_steps(out / "checkpoints")[-1]
    assert main(["train", "l1", "--out", str(out), "--resume"]) == 0
    assert checkpoint_steps(out / "checkpoints")[-1] == last
    metrics = strict_json(out / "metrics.json")
    assert (metrics["steps"], metrics["stop_reason"]) == (last, "weights")
    assert_same_run_of(out, l1_run, "l1")


def test_a_tolerance_below_float32s_range_is_taken_by_train_and_sweep(tmp_path, capsys):
    """--tol 1e-50 is in (0, 1): it asks for the weights to be exactly 1.0."""
    assert main(["train", "l1", "--tol", "1e-50"]) == 0
    assert "W_ih = 1, W_hh = 1" in capsys.readouterr().out
    assert main(["sweep", "l1", "--seeds", "2", "--steps", "600", "--tol", "1e-50"]) == 0
    assert "converged 2 (100.0%): every watched number within 1e-50 of 1" in capsys.readouterr().out


def test_version_and_an_input_longer_than_eval_takes(l1_run, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and re.fullmatch(r"rnnjax \d+\.\d+\.\d+\n", capsys.readouterr().out)
    import rnnjax.cli

    monkeypatch.setattr(rnnjax.cli, "EVAL_MAX_LENGTH", 3)
    for name, content in (("x.csv", "1,2,3,4"), ("x.npy", None)):
        path = tmp_path / name
        np.save(path, np.ones(4)) if content is None else path.write_text(content)
        assert main(["eval", "l1", "--params", str(l1_run), "--input", str(path)]) == 2
        one_error_line(capsys.readouterr(), rf"--input {re.escape(str(path))}: holds more than 3 numbers, the most "
                                            r"one sequence may have$")


@pytest.mark.parametrize("lr", ["1e-300", "1e-39", "1e300", "3.5e38"])
def test_a_learning_rate_beyond_float32s_range_is_refused(lr, capsys):
    """In float32 such a rate is 0 (nothing trains) or infinite (the first step diverges)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "l1", "--lr", lr])
    assert exit_info.value.code == 2
    one_error_line(capsys.readouterr(), rf"argument --lr: expected a learning rate from 1.175e-38 to 3.403e\+38 "
                                        rf"\(float32's range\); received '{lr}'$")


def test_float32s_largest_number_as_numpy_prints_it_is_evaluated(l1_run, tmp_path, capsys):
    path = tmp_path / "x.csv"
    path.write_text("3.4028235e38")
    assert main(["eval", "l1", "--params", str(l1_run), "--input", str(path)]) == 0
    assert "predicted 3.40282347e+38, exact 3.4028235e+38 (float64), relative error 9.88e-09" in capsys.readouterr().out
