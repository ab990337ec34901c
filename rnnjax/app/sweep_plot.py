"""A picture of a seed sweep: where each seed started and ended, and the loss landscape with
a few trajectories drawn on it."""

from __future__ import annotations

from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rnnjax.training.sweep import OUTCOMES, SweepResult  # noqa: E402

__all__ = ["plot_sweep"]

_LEFT = "converged, then left"
_COLORS = {"converged": "tab:green", "dead": "tab:gray", "diverged": "tab:red",
           "stuck": "tab:orange", _LEFT: "tab:purple"}
_MAX_POINTS = 5000  # seeds drawn per scatter; more only hide each other


def plot_sweep(
    result: SweepResult,
    file: BinaryIO,
    *,
    landscape: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    plane: tuple[str, str] = ("cell/W_ih", "cell/W_hh"),
    title: str = "",
) -> None:
    """Draws, as a PNG into ``file``, each watched weight's distance from the target after the
    last step against its initial value (one dot per seed, coloured by outcome, with the seeds
    that converged and ended outside the band apart; the band is ``tol``) and, with
    ``landscape``, the loss over a plane of two weights with the tracked seeds' trajectories.

    Args:
      result: what ``sweep`` returned.
      file: a binary file open for writing.
      landscape: ``(x_grid, y_grid, loss)`` with ``loss`` ``(len(y_grid), len(x_grid))``, as
        ``loss_landscape`` returns it; None leaves the panel out.
      plane: the trajectories (keys of ``result.trajectories``) drawn as x and y on it.
      title: a title for the figure.
    """
    # the plane's x first and its y last, the rest in between as ``weights`` named them
    names = sorted(result.initial_weights, key=lambda name: {plane[0]: 0, plane[1]: 2}.get(name, 1))
    panels = len(names) + (landscape is not None)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.0), layout="constrained",
                             squeeze=False)
    shown = np.arange(len(result.seeds))[:: max(1, len(result.seeds) // _MAX_POINTS)]
    # a seed that converged and then left the band again is drawn apart: the dots show where
    # each seed ended
    ended_within = np.all([np.abs(v - result.target) <= result.tol
                           for v in result.final_weights.values()], axis=0)
    drawn = np.where((result.outcome == "converged") & ~ended_within, _LEFT, result.outcome)
    for ax, name in zip(axes[0], names):
        for outcome in (*OUTCOMES, _LEFT):
            pick = shown[drawn[shown] == outcome]
            if pick.size:
                final = result.final_weights[name][pick] - result.target
                ax.scatter(result.initial_weights[name][pick], final,
                           s=6, alpha=0.6, color=_COLORS[outcome], linewidths=0,
                           label=f"{outcome} ({np.mean(drawn == outcome):.1%})")
        # symlog: exactly on target at 0, float32 ulps near it, failures far out, all visible
        ax.set_yscale("symlog", linthresh=1e-7)
        ax.axhspan(-result.tol, result.tol, color="tab:green", alpha=0.1, linewidth=0)
        ax.set(xlabel=f"{name} at init",
               ylabel=f"{name} - {result.target:g} after {result.steps} steps",
               title=f"{name}: final against initial")
        ax.legend(fontsize=7, markerscale=2, loc="best")
    if landscape is not None:
        _draw_landscape(axes[0][-1], result, landscape, plane)
    fig.suptitle(title or f"{len(result.seeds)} seeds, {result.steps} steps")
    fig.savefig(file, format="png", dpi=80)
    plt.close(fig)


def _draw_landscape(ax, result: SweepResult, landscape, plane) -> None:
    x_grid, y_grid, loss = landscape
    levels = np.log10(np.maximum(loss, 1e-8))
    filled = ax.contourf(x_grid, y_grid, levels, levels=24, cmap="viridis")
    plt.colorbar(filled, ax=ax, label="log10 loss")
    x_path, y_path = (result.trajectories[name] for name in plane)
    for seed, xs, ys, outcome in zip(result.seeds, x_path, y_path, result.outcome):
        color = _COLORS[outcome]
        ax.plot(xs, ys, color="white", linewidth=2.2, alpha=0.7)
        ax.plot(xs, ys, color=color, linewidth=1.2, label=f"seed {seed}: {outcome}")
        ax.plot(xs[0], ys[0], "o", color=color, markersize=5, markeredgecolor="white")
        ax.plot(xs[-1], ys[-1], "X", color=color, markersize=7, markeredgecolor="white")
    ax.plot(result.target, result.target, "*", color="white", markersize=12)
    ax.set(xlim=(x_grid[0], x_grid[-1]), ylim=(y_grid[0], y_grid[-1]), xlabel=plane[0],
           ylabel=plane[1], title="loss landscape, tracked seeds (o start, x end)")
    ax.legend(fontsize=6, loc="lower right")
