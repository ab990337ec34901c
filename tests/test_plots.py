"""The pictures the command writes: ``training.png`` and ``sweep.png`` are written, of the stated
size, and show what the run did (a loss of exactly 0 as such, the weights' distance from the
target against the tolerance, the sweep's outcomes in the CLI's words)."""

import io

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

from rnnjax.app import plot


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
