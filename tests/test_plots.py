"""The pictures the command writes: ``training.png`` and ``sweep.png`` are written, of the stated
size, and show what the run did (a loss of exactly 0 as such, the weights' distance from the
target against the tolerance, the sweep's outcomes in the CLI's words)."""

import argparse
import io

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

from rnnjax.app import cli, plot, sweep_plot
from rnnjax.training.sweep import SweepResult, summarize


@pytest.fixture
def drawn(monkeypatch):
    """The figures saved while the test runs (each is closed after saving)."""
    figures = []
    save = Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` in pixels of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(io.BytesIO(data), format="png").shape[:2]
    return width, height


def history(loss, **weights):
    steps = len(loss)
    return {"step": np.arange(1, steps + 1), "loss": np.asarray(loss, np.float32),
            "grad_norm": np.ones(steps, np.float32), "weight_error": np.zeros(steps, np.float32),
            "skipped": np.zeros(steps, bool), **{k: np.asarray(v, np.float32) for k, v in weights.items()}}


def test_training_plot_draws_an_exact_zero_loss_on_a_stated_floor(drawn):
    file = io.BytesIO()
    run = history([2.0, 3e-5, 4e-9, 0.0, 0.0], **{"cell/W_ih": [0.5, 0.99, 1.0000001, 1.0, 1.0],
                                                   "cell/W_hh": [-0.3, 1.01, 0.9999999, 1.0, 1.0]})
    plot.plot_training(run, file, target=1.0, tol=1e-9, stop_reason="weights", title="l1, recipe squared")
    assert png_size(file.getvalue()) == plot.SIZE
    (fig,) = drawn
    loss_ax, weight_ax = fig.axes
    legend = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert legend == ["loss", "loss exactly 0 (2 steps), drawn at 1e-10"]
    zeros = loss_ax.get_lines()[1]
    np.testing.assert_array_equal(zeros.get_xdata(), [4, 5])
    np.testing.assert_array_equal(zeros.get_ydata(), [1e-10, 1e-10])
    assert 1e-11 <= loss_ax.get_ylim()[0] < 1e-10  # the floor, not float32's tiny at 1e-38
    assert fig._suptitle.get_text() == ("l1, recipe squared\nstopped after step 5: every watched weight within "
                                        "tolerance of the target")
    # the weights as |w - 1| on a symlog axis linear within tol, the band shaded up to tol
    assert weight_ax.get_yscale() == "symlog" and weight_ax.get_ylim()[0] == 0
    distances = {line.get_label(): line.get_ydata() for line in weight_ax.get_lines()}
    np.testing.assert_allclose(distances["W_hh"], [1.3, 0.01, 2.0**-23, 0, 0], rtol=1e-5)
    (band,) = weight_ax.patches
    assert band.get_label() == "within tol 1e-09"
    assert band.get_y() == 0 and band.get_height() == pytest.approx(1e-9)


def test_training_plot_shades_each_tolerance_and_draws_a_loss_without_zeros_alone(drawn):
    file = io.BytesIO()
    run = history([2.0, 0.5, 0.1], **{"slope_pos": [0.5, 0.9, 1.0], "slope_neg": [0.1, 0.9, 1.0],
                                       "cell/W_hh": [0.2, 0.9, 1.0]})
    plot.plot_training(run, file, tol={"slope_pos": 1e-6, "slope_neg": 1e-6, "cell/W_hh": 1e-9},
                       stop_reason="budget")
    assert png_size(file.getvalue()) == plot.SIZE
    (fig,) = drawn
    loss_ax, weight_ax = fig.axes
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["loss"]
    assert [p.get_label() for p in weight_ax.patches] == ["within 1e-06 (slope_pos, slope_neg)",
                                                          "within 1e-09 (W_hh)"]
    assert "step budget spent, NOT converged" in fig._suptitle.get_text()


def test_a_run_folder_has_a_training_plot_of_the_stated_size(l1_run):
    assert png_size((l1_run / "training.png").read_bytes()) == plot.SIZE


def sweep_result(outcome, final_ih, final_hh, tracked=3, steps=4):
    """A ``SweepResult`` of ``len(outcome)`` seeds, its first ``tracked`` seeds' trajectories straight lines."""
    seeds = len(outcome)
    initial = {"cell/W_ih": np.linspace(-1, 1, seeds), "cell/W_hh": np.linspace(1, -1, seeds)}
    final = {"cell/W_ih": np.asarray(final_ih, np.float32), "cell/W_hh": np.asarray(final_hh, np.float32)}
    paths = {k: np.linspace(initial[k][:tracked], final[k][:tracked], steps + 1, axis=1) for k in initial}
    return SweepResult(np.arange(seeds), initial, final, {}, np.zeros(seeds), np.asarray(outcome),
                       np.where(np.asarray(outcome) == "converged", 2, -1), paths, steps=steps, target=1.0,
                       tol=1e-3, data_seed=None, devices=1, seconds=0.5, compile_seconds=1.0)


@pytest.mark.parametrize("landscape, size", [(True, (1820, 520)), (False, (1320, 520))])
def test_sweep_plot_names_the_outcomes_as_the_command_prints_them(drawn, capsys, landscape, size):
    # seed 1 converged and ended outside tol: drawn apart, and the command says so too
    result = sweep_result(["converged", "converged", "dead", "stuck", "converged"],
                          [1.0, 1.5, -0.2, 0.3, 1.0], [1.0, 1.0, -0.5, 2.0, 1.0001])
    grid = np.linspace(-1.5, 2.0, 8)
    file = io.BytesIO()
    sweep_plot.plot_sweep(result, file, title="l1",
                          landscape=(grid, grid, np.ones((8, 8))) if landscape else None)
    assert png_size(file.getvalue()) == size
    assert size[0] >= 1600 or not landscape
    (fig,) = drawn
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    outcomes = ["converged and stayed 2 (40.0%)", "converged, then left 1 (20.0%)", "dead 1 (20.0%)",
                "stuck 1 (20.0%)"]
    markers = ["tracked seed: start (its number)", "tracked seed: end", "the target"]
    assert legend == outcomes + ["within tol 0.001 of 1"] + markers * landscape
    for ax in fig.axes:  # the legend lies outside every panel
        assert ax.get_legend() is None
        assert not fig.legends[0].get_window_extent().overlaps(ax.get_window_extent())
    if landscape:  # each tracked trajectory in its outcome's colour, numbered by seed
        paths = fig.axes[2].get_lines()
        assert [matplotlib.colors.to_hex(paths[i].get_color()) for i in (1, 5, 9)] == [
            matplotlib.colors.to_hex(c) for c in ("tab:green", "tab:purple", "tab:gray")]
        assert [t.get_text() for t in fig.axes[2].texts] == ["0", "1", "2"]
    cli._print_sweep(argparse.Namespace(task="l1", seeds=5, tol=1e-3), {"recipe": "notebook", "steps": 4}, result,
                     summarize(result))
    printed = capsys.readouterr().out
    assert "converged 3 (60.0%)" in printed
    assert "of these: converged and stayed 2 (40.0%); converged, then left 1 (20.0%)" in printed
    assert "dead 1 (20.0%), diverged 0 (0.0%), stuck 1 (20.0%)" in printed
    assert summarize(result)["converged_then_left"] == 1


def test_sweep_plot_of_four_panels_takes_two_rows(drawn):
    result = sweep_result(["converged", "dead"], [1.0, -0.2], [1.0, -0.5])
    result = result._replace(initial_weights={**result.initial_weights, "slope": np.zeros(2)},
                             final_weights={**result.final_weights, "slope": np.ones(2, np.float32)})
    grid = np.linspace(-1.5, 2.0, 8)
    file = io.BytesIO()
    sweep_plot.plot_sweep(result, file, landscape=(grid, grid, np.ones((8, 8))))
    assert sweep_plot.grid(4) == (2, 2)
    assert png_size(file.getvalue()) == (1320, 1040)
    (fig,) = drawn
    assert "converged 1 (50.0%)" in [t.get_text() for t in fig.legends[0].get_texts()]  # none left: not split


def test_a_sweep_folder_has_a_sweep_plot_of_the_stated_size(tmp_path):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "count", "--seeds", "4", "--steps", "300", "--out", str(out)]) == 0
    assert png_size((out / "sweep.png").read_bytes()) == (1820, 520)
