"""A picture of a training run: the loss, and each watched weight's distance from its target."""

from __future__ import annotations

from collections.abc import Mapping
from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rnnjax.training.stopping import STOP_REASONS  # noqa: E402

__all__ = ["SIZE", "plot_training"]

SIZE = (1320, 480)  # pixels: 12 x 4.4 inches at 110 dpi
_DPI = 110
_NOT_WEIGHTS = ("step", "loss", "grad_norm", "weight_error", "skipped")


def plot_training(history: dict[str, np.ndarray], file: BinaryIO, *, target: float = 1.0,
                  tol: float | Mapping[str, float] = 1e-3, stop_reason: str | None = None,
                  title: str = "") -> None:
    """Draws, as a PNG of ``SIZE`` into ``file``, the loss against the step on a log axis (a loss
    of exactly 0 as a marker on a floor the legend states) and each watched weight's distance
    from ``target`` on a symlog axis, linear within the smallest tolerance, with the band of
    each tolerance shaded.

    Args:
      history: ``FitResult.history``.
      file: a binary file open for writing.
      target: the value the watched weights train towards.
      tol: the tolerance of every watched weight, or one per watched name.
      stop_reason: the run's ``FitResult.stop_reason``, said in the title with the last step.
      title: the figure's first title line.
    """
    steps = history["step"]
    fig, (loss_ax, weight_ax) = plt.subplots(1, 2, figsize=(SIZE[0] / _DPI, SIZE[1] / _DPI), layout="constrained")
    _draw_loss(loss_ax, steps, np.asarray(history["loss"], np.float64))
    weights = {k: np.asarray(v, np.float64) for k, v in history.items() if k not in _NOT_WEIGHTS}
    tolerances = {name: tol[name] if isinstance(tol, Mapping) else tol for name in weights}
    _draw_weights(weight_ax, steps, weights, target, tolerances)
    ended = "" if stop_reason is None else (f"stopped after step {int(steps[-1]) if steps.size else 0}: "
                                            f"{STOP_REASONS.get(stop_reason, stop_reason)}")
    fig.suptitle("\n".join(line for line in (title, ended) if line))
    fig.savefig(file, format="png", dpi=_DPI)
    plt.close(fig)


def _draw_loss(ax, steps: np.ndarray, loss: np.ndarray) -> None:
    """The positive losses as a line on a log axis; exact zeros as markers on a floor a decade
    under the smallest positive loss, the floor stated in the legend."""
    positive = np.where(loss > 0, loss, np.nan)
    ax.semilogy(steps, positive, color="tab:blue", linewidth=1, label="loss")
    zeros = loss == 0
    if zeros.any():
        floor = 10 ** np.floor(np.log10(np.nanmin(positive)) - 1) if np.isfinite(positive).any() else 1e-12
        ax.plot(steps[zeros], np.full(zeros.sum(), floor), "v", color="tab:red", markersize=5,
                label=f"loss exactly 0 ({zeros.sum()} step{'s' if zeros.sum() > 1 else ''}), drawn at {floor:.0e}")
        ax.axhline(floor, color="tab:red", linewidth=0.6, linestyle=":")
    ax.set(xlabel="step", ylabel="loss (MSE), log scale", title="loss")
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)


def _draw_weights(ax, steps: np.ndarray, weights: dict[str, np.ndarray], target: float,
                  tolerances: dict[str, float]) -> None:
    """Each weight's distance from ``target``, ``|w - target|``, on a symlog axis, linear within
    the smallest tolerance (so 0 is drawn as 0), and each tolerance's band."""
    smallest = min(tolerances.values(), default=1e-3)
    several = len(set(tolerances.values())) > 1
    for tol in sorted(set(tolerances.values()), reverse=True):
        names = ", ".join(name.rsplit("/", 1)[-1] for name, t in tolerances.items() if t == tol)
        ax.axhspan(0, tol, color="tab:green", alpha=0.25 if tol == smallest else 0.12, linewidth=0,
                   label=f"within {tol:g} ({names})" if several else f"within tol {tol:g}")
    for name, values in weights.items():
        ax.plot(steps, np.abs(values - target), linewidth=1, alpha=0.85, label=name.rsplit("/", 1)[-1])
    ax.set_yscale("symlog", linthresh=smallest, linscale=0.6)
    ax.set_ylim(bottom=0)
    ax.set(xlabel="step", ylabel=f"|weight - {target:g}|, symlog (linear below {smallest:g})",
           title=f"watched weights: distance from the target {target:g}")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
