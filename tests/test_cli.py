"""The rnnjax command: demo, train, eval, and one-line errors with exit status 2."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from rnnjax import runs
from rnnjax.cli import main


@pytest.fixture(scope="module")
def l1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("l1")
    assert main(["train", "l1", "--seed", "3", "--out", str(out)]) == 0
    return out


def test_train_writes_params_metrics_and_plot(l1_run, capsys):
    assert sorted(p.name for p in l1_run.iterdir()) == ["metrics.json", "params.msgpack", "training.png"]
    metrics = json.loads((l1_run / "metrics.json").read_text())
    assert metrics["task"] == "l1" and metrics["stop_reason"] == "weights"
    assert metrics["weights"] == {"cell/W_hh": [[1.0]], "cell/W_ih": [[1.0]]}
    assert len(metrics["history"]["loss"]) == metrics["steps"]
    assert (l1_run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("suffix, write", [
    (".npy", lambda p: np.save(p, np.array([3.0, -5.0, 7.0, -2.0]))),
    (".csv", lambda p: p.write_text("3,-5\n7,-2\n")),
    (".txt", lambda p: p.write_text("3 -5\n 7\t-2\n")),
])
def test_eval_reads_each_format(l1_run, tmp_path, capsys, suffix, write):
    path = tmp_path / f"seq{suffix}"
    write(path)
    assert main(["eval", "l1", "--params", str(l1_run), "--input", str(path)]) == 0
    assert "length 4: predicted 17, exact 17 (float64), relative error 0.00e+00" in capsys.readouterr().out


def test_eval_on_a_long_random_sequence(l1_run, capsys):
    assert main(["eval", "l1", "--params", str(l1_run), "--length", "10000", "--method", "parallel"]) == 0
    error = float(capsys.readouterr().out.rsplit("relative error ", 1)[1])
    assert error < 1e-5


def npz(tmp_path):
    path = tmp_path / "archive.npy"
    with open(path, "wb") as f:
        np.savez(f, a=np.ones(3))
    return str(path)


def bad(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return str(path)


@pytest.mark.parametrize("make_args, match", [
    (lambda run, tmp: ["--input", str(tmp / "missing.csv")], r"missing.csv: no such file$"),
    (lambda run, tmp: ["--input", bad(tmp, "x.csv", "1,2\n3,abc\n")], r"line 2: 'abc' is not a number$"),
    (lambda run, tmp: ["--input", bad(tmp, "x.npy", b"\x93NUMPY garbage")], r"not a valid .npy file"),
    (lambda run, tmp: ["--input", bad(tmp, "x.txt", "")], r"holds no numbers$"),
    (lambda run, tmp: ["--input", bad(tmp, "x.txt", "1 nan 2")], r"1 values are NaN or infinite$"),
    (lambda run, tmp: ["--input", bad(tmp, "x.json", "[1]")], r"expected a .npy, .csv or .txt file; received '.json'$"),
    (lambda run, tmp: ["--input", bad(tmp, "x.txt", b"\xff\xfe\x00")], r"cannot be read"),
    (lambda run, tmp: ["--length", "0"], r"expected a positive integer; received 0$"),
    (lambda run, tmp: ["--length", "5", "--input", "x.csv"], r"not allowed with argument"),
    (lambda run, tmp: ["--input", npz(tmp)], r"holds an .npz archive; expected one array"),
    (lambda run, tmp: ["--length", "3", "--seed", "99999999999999999999"], r"expected a seed in"),
])
def test_eval_bad_input_is_one_line_and_exit_2(l1_run, tmp_path, capsys, make_args, match):
    with pytest.raises(SystemExit) as exit_info:
        status = main(["eval", "l1", "--params", str(l1_run), *make_args(l1_run, tmp_path)])
        raise SystemExit(status)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rnnjax: error: ")
    assert re.search(match, lines[0])


def test_eval_rejects_a_missing_or_wrong_run(l1_run, tmp_path, capsys):
    assert main(["eval", "l1", "--params", str(tmp_path), "--length", "3"]) == 2
    assert "no metrics.json there" in capsys.readouterr().err
    assert main(["eval", "count", "--params", str(l1_run), "--length", "3"]) == 2
    assert "trained the 'l1' network, not 'count'" in capsys.readouterr().err
    (tmp_path / "metrics.json").write_text('{"task": "l1"}')
    (tmp_path / "params.msgpack").write_bytes(b"\x00\x01not msgpack")
    assert main(["eval", "l1", "--params", str(tmp_path), "--length", "3"]) == 2
    assert "not a saved rnnjax run" in capsys.readouterr().err


def test_count_network_trains_and_evaluates(tmp_path, capsys):
    assert main(["train", "count", "--seed", "5", "--out", str(tmp_path)]) == 0
    assert main(["eval", "count", "--params", str(tmp_path), "--length", "50"]) == 0
    out = capsys.readouterr().out
    assert "both weights within tolerance of 1" in out
    assert "largest error over all steps 0.00e+00" in out


def test_an_unwritable_out_folder_is_one_line_and_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", "count", "--seed", "3", "--steps", "5", "--out", str(blocker / "run")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before any training
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rnnjax: error: ") and "file/run" in err[0]


def test_saved_files_have_the_usual_permissions(l1_run):
    umask = os.umask(0)
    os.umask(umask)
    for path in l1_run.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("flag", ["--tol", "--lr"])
def test_infinite_settings_are_refused(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "l1", flag, "inf"])
    assert exit_info.value.code == 2
    assert "expected a positive finite number; received inf" in capsys.readouterr().err


def test_read_sequence_accepts_a_column_array(tmp_path):
    path = tmp_path / "col.npy"
    np.save(path, np.arange(4.0).reshape(4, 1))
    np.testing.assert_array_equal(runs.read_sequence(path), np.arange(4.0))
    np.save(path, np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"one sequence; received an array of shape \(2, 3\)"):
        runs.read_sequence(path)


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
