"""benchmarks/sweeps.py runs end to end on a tiny sweep and writes its files (no rate or speed is
asserted here: those live in benchmarks/SWEEPS.md, measured on 1,000 seeds)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sweeps  # noqa: E402


@pytest.mark.slow
def test_rates_and_speed_write_json_markdown_and_plots(tmp_path, capsys):
    sweeps.main(["rates", "--seeds", "4", "--tasks", "count", "--recipes", "squared", "squared-fixed-batch",
                 "--tols", "1e-3", "--steps", "20", "--out", str(tmp_path), "--quiet"])
    report = json.loads((tmp_path / "rates.json").read_text())
    assert [r["recipe"] for r in report["rows"]] == ["squared", "squared-fixed-batch"]
    assert all(r["seeds"] == 4 and r["steps"] == 20 for r in report["rows"])
    for row in report["rows"]:  # where the runs that stop short end, for SWEEPS.md's analysis
        assert 0 <= row["stuck_with_W_hh_below_0"] <= row["counts"]["stuck"]
        assert 0 <= row["converged_then_left"] <= row["counts"]["converged"]
    assert "| count | squared-fixed-batch | 0.001 |" in (tmp_path / "rates.md").read_text()
    assert (tmp_path / "count-squared.png").read_bytes()[:4] == b"\x89PNG"
    sweeps.main(["speed", "--task", "count", "--seeds", "4", "--fit-seeds", "2", "--steps", "20",
                 "--sweep-repeats", "2", "--out", str(tmp_path), "--quiet"])
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert [c["steps"] for c in speed["fit"]["calls"]] == [20, 20] and speed["sweep"]["seeds"] == 4
    walls = sorted(r["wall_seconds"] for r in speed["sweep"]["repeats"])
    assert len(walls) == 2 and speed["sweep"]["wall_seconds"] == (walls[0] + walls[1]) / 2
    assert speed["ratio_per_seed"]["fit_median_over_sweep"] > 0
    assert "Per seed, the sweep is" in (tmp_path / "speed.md").read_text()
