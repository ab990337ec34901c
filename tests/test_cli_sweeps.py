"""The rnnjax command with issue 8's parts: --recipe, l1-learned in train and eval, and sweep.

The fast tier trains no l1-learned network and runs one sweep; the slow tier the rest.
"""

import json
import re
import shutil

import numpy as np
import pytest

from rnnjax.app import tasks
from rnnjax.app.cli import main
from rnnjax.core.checks import InputError
from rnnjax.training.sweep import OUTCOMES


def strict_json(path):
    def refuse(name):
        raise ValueError(f"{name} is not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def last_error(captured):
    lines = captured.err.rstrip("\n").split("\n")
    assert lines[-1].startswith("rnnjax: error: "), captured.err
    return lines[-1]


def test_the_notebook_recipe_draws_dead_seeds_again(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "count", "--recipe", "notebook", "--seed", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("a dead ReLU (inputs are >= 0, so W_ih <= 0 keeps every gradient 0)") == 2
    metrics = strict_json(out / "metrics.json")
    assert (metrics["seed"], metrics["dead_seeds"], metrics["converged"]) == (4, [2, 3], True)
    assert metrics["settings"]["recipe"] == "notebook" and metrics["settings"]["b2"] == 0.999
    assert main(["train", "count", "--out", str(out), "--resume", "--recipe", "squared", "--steps", "9000"]) == 2
    assert re.search(r"--recipe squared: the run in \S+ trains with notebook", last_error(capsys.readouterr()))


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("learned") / "run"
    assert main(["train", "l1-learned", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_l1_learned_trains_and_evaluates(learned_run, tmp_path, capsys):
    metrics = strict_json(learned_run / "metrics.json")
    assert metrics["converged"] and metrics["seed"] == 0
    watched = metrics["watched"]
    assert watched["cell/W_hh"] == 1.0  # exactly: its error grows with the length
    assert abs(watched["slope_pos"] - 1) < 1e-6 and abs(watched["slope_neg"] - 1) < 1e-6
    kernel = metrics["weights"]["dense/kernel"][0]
    assert min(kernel) < 0 < max(kernel)  # one unit for x > 0, one for x < 0: |x| was learned
    path = tmp_path / "seq.csv"
    path.write_text("3,-5,7,-2\n")
    capsys.readouterr()
    assert main(["eval", "l1-learned", "--params", str(learned_run), "--input", str(path)]) == 0
    predicted = float(re.search(r"predicted (\S+),", capsys.readouterr().out).group(1))
    assert predicted == pytest.approx(17, abs=1e-4)
    for method in ("sequential", "parallel"):
        assert main(["eval", "l1-learned", "--params", str(learned_run), "--length", "10000", "--method", method]) == 0
        assert float(capsys.readouterr().out.rsplit("relative error ", 1)[1]) < 1e-5
    assert main(["eval", "l1", "--params", str(learned_run), "--length", "3"]) == 2
    assert last_error(capsys.readouterr()).endswith("that run trained the 'l1-learned' network, not 'l1'")


@pytest.mark.slow
def test_l1_learned_draws_again_when_its_dense_units_face_one_way(tmp_path, capsys):
    # seed 1 draws both dense weights with one sign: inputs of the other sign reach no unit
    assert main(["train", "l1-learned", "--seed", "1", "--steps", "5", "--out", str(tmp_path / "run")]) == 1
    printed = capsys.readouterr().out
    assert re.search(r"seed 1: init slope_pos = \S+, slope_neg = \S+, W_hh = \S+: both dense units face the same "
                     r"sign of x, so the inputs of the other sign reach no unit and give no gradient; trying "
                     r"seed 2", printed)
    assert ("slope_pos = 0," in printed) != ("slope_neg = 0," in printed)
    metrics = strict_json(tmp_path / "run" / "metrics.json")
    assert (metrics["seed"], metrics["dead_seeds"], metrics["stop_reason"]) == (2, [1], "budget")


def test_sweep_writes_its_summary_and_picture(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "count", "--seeds", "6", "--steps", "200", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert re.search(r"count, recipe squared: 6 seeds x 200 steps on 1 cpu device\(s\)", captured.out)
    assert "converged 6 (100.0%): every watched number within 0.001 of 1" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "sweep.png"]
    report = strict_json(out / "sweep.json")
    assert report["task"] == "count" and report["settings"]["recipe"] == "squared"
    assert report["settings"]["seeds"] == 6 and report["summary"]["counts"]["converged"] == 6
    assert set(report["summary"]["fractions"]) == set(OUTCOMES)
    assert report["per_seed"]["seed"] == list(range(6)) and report["per_seed"]["outcome"] == ["converged"] * 6
    assert np.all(np.abs(np.array(report["per_seed"]["final"]["cell/W_ih"]) - 1) < 1e-3)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["sweep", "count", "--seeds", "6", "--steps", "200", "--out", str(out)]) == 2
    assert last_error(capsys.readouterr()).endswith(
        f"rnnjax: error: --out {out}: already holds a sweep (sweep.json); --overwrite to replace it")


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_sweep_is_never_written_into_a_run_or_a_foreign_folder(overwrite, count_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(count_run, run)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    for out, name in ((run, "checkpoints"), (foreign, "todo.txt")):
        before = sorted(p.name for p in out.iterdir())
        capsys.readouterr()
        assert main(["sweep", "count", "--seeds", "2", "--steps", "5", "--out", str(out), *overwrite]) == 2
        assert last_error(capsys.readouterr()).endswith(
            f"--out {out}: holds files that are not a sweep ('{name}'); choose another folder")
        assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.slow
def test_a_sweep_in_which_no_seed_converges_exits_1(tmp_path, capsys):
    # the notebook recipe at a learning rate that cannot move: half dead, half stuck
    assert main(["sweep", "count", "--recipe", "notebook", "--lr", "1e-9", "--seeds", "6", "--steps", "20",
                 "--data-seed", "3"]) == 1
    captured = capsys.readouterr()
    assert "converged 0 (0.0%)" in captured.out
    assert re.fullmatch(r"rnnjax: error: no seed of 6 converged \(\d dead, 0 diverged, \d stuck\)",
                        last_error(captured))


@pytest.mark.parametrize("args, match", [
    (["--seeds", "0"], r"argument --seeds: expected a positive integer below 2\*\*31; received '0'$"),
    (["--devices", "99"], r"--devices must be an integer from 1 to \d+; received 99\. JAX sees \d+ cpu device"),
    (["--first-seed", str(2**31 - 2), "--seeds", "5"], r"--first-seed 2147483646 --seeds 5: the seeds must lie below "
                                                       r"2\*\*31; give at most --seeds 2 or a lower --first-seed$"),
    (["--recipe", "magic"], r"argument --recipe: invalid choice: 'magic'"),
    (["--tol", "0"], r"argument --tol: expected a number in \(0, 1\); received '0'$"),
    (["--tol", "1e10"], r"argument --tol: expected a number in \(0, 1\); received '1e10'$"),
    (["--data-seed", "-1"], r"argument --data-seed: expected a seed, an integer in \[0, 2\*\*31\); received '-1'$"),
])
def test_sweep_bad_input_is_one_line_and_exit_2(args, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(["sweep", "l1", "--out", str(tmp_path / "new"), *args]))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and re.search(match, last_error(captured))
    assert not (tmp_path / "new").exists()  # never an empty folder left behind


def test_overwrite_without_out_is_refused(capsys):
    assert main(["sweep", "l1", "--seeds", "2", "--overwrite"]) == 2
    assert capsys.readouterr().err == "rnnjax: error: --overwrite needs --out\n"


def test_redrawing_dead_inits_stops_at_the_last_seed_the_cli_takes(capsys):
    # seed 2**31 - 1 is dead for l1-learned (both dense units face one sign); no seed past it is
    # drawn, since a run could not record a seed that --seed refuses
    assert main(["train", "l1-learned", "--seed", str(2**31 - 1), "--steps", "2"]) == 1
    captured = capsys.readouterr()
    assert "trying seed" not in captured.out
    assert last_error(captured) == ("rnnjax: error: seed 2147483647 gave a dead init; no seed is left "
                                    "below 2**31; try a lower --seed")


@pytest.mark.parametrize("first_seed", [-1, 2**31])
def test_train_until_live_refuses_a_seed_the_cli_would_refuse(first_seed):
    with pytest.raises(InputError, match=rf"^first_seed must be a seed, an integer in \[0, 2\*\*31\); "
                                         rf"received {first_seed}\.$") as info:
        tasks.train_until_live("count", first_seed=first_seed)
    assert info.value.name == "first_seed"
