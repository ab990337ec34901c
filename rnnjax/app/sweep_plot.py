"""A picture of a seed sweep: where each seed started and ended, and the loss landscape with
a few trajectories drawn on it, coloured by outcome as the command names them."""

from __future__ import annotations

from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.patheffects import withStroke  # noqa: E402

from rnnjax.training.sweep import LEFT, STAYED, SweepResult, group_label, outcome_groups  # noqa: E402

__all__ = ["DPI", "PANEL_INCHES", "LEGEND_INCHES", "grid", "figure_inches", "plot_sweep"]

DPI = 100
PANEL_INCHES = (5.0, 5.2)  # each panel's width and the figure's height
LEGEND_INCHES = 3.2  # the legend's column, right of the panels
_COLORS = {"converged": "tab:green", STAYED: "tab:green", LEFT: "tab:purple", "dead": "tab:gray",
           "diverged": "tab:red", "stuck": "tab:orange"}
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
    last step against its initial value (one dot per seed, coloured by outcome; the band is
    ``tol``) and, with ``landscape``, the loss over a plane of two weights with the tracked
    seeds' trajectories, numbered by seed. One legend, right of the panels, names the outcomes
    as ``rnnjax sweep`` prints them (``outcome_groups``: a seed that converged and ended outside
    ``tol`` is drawn apart, and the command says so too). The panels lie in one row, or in two
    from four panels on (``grid``), and the figure is ``figure_inches`` at ``DPI``: 1820 x 520
    pixels for two watched weights and the landscape, 1320 x 1040 for three and the landscape.

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
    rows, columns = grid(len(names) + (landscape is not None))
    fig, axes = plt.subplots(rows, columns, figsize=figure_inches(rows, columns), layout="constrained",
                             squeeze=False)
    axes = axes.reshape(-1)
    for unused in axes[len(names) + (landscape is not None):]:
        unused.set_axis_off()
    groups = outcome_groups(result)
    group_of = np.empty(len(result.seeds), dtype=object)
    for name, seeds in groups.items():
        group_of[seeds] = name
    for ax, name in zip(axes, names):
        _draw_final_against_initial(ax, result, name, group_of)
    if landscape is not None:
        _draw_landscape(axes[len(names)], result, landscape, plane, group_of)
    handles = [Line2D([], [], linestyle="", marker="o", color=_COLORS[name], label=group_label(name, seeds))
               for name, seeds in groups.items() if seeds.any()]
    handles.append(Patch(color="tab:green", alpha=0.15, label=f"within tol {result.tol:g} of {result.target:g}"))
    if landscape is not None:
        handles += [Line2D([], [], linestyle="", marker=m, color="black", markerfacecolor=face, label=label)
                    for m, face, label in (("o", "none", "tracked seed: start (its number)"),
                                           ("X", "black", "tracked seed: end"), ("*", "white", "the target"))]
    fig.legend(handles=handles, loc="outside right center", title=f"{len(result.seeds)} seeds", fontsize=9,
               title_fontsize=9)
    fig.suptitle(title or f"{len(result.seeds)} seeds, {result.steps} steps")
    fig.savefig(file, format="png", dpi=DPI)
    plt.close(fig)


def grid(panels: int) -> tuple[int, int]:
    """``(rows, columns)`` of ``panels`` panels: one row up to three, two from four on."""
    rows = 1 if panels <= 3 else 2
    return rows, -(-panels // rows)


def figure_inches(rows: int, columns: int) -> tuple[float, float]:
    """The figure's ``(width, height)``: ``PANEL_INCHES`` per panel, and the legend's column."""
    return PANEL_INCHES[0] * columns + LEGEND_INCHES, PANEL_INCHES[1] * rows


def _draw_final_against_initial(ax, result: SweepResult, name: str, group_of: np.ndarray) -> None:
    shown = np.arange(len(result.seeds))[:: max(1, len(result.seeds) // _MAX_POINTS)]
    for group in dict.fromkeys(group_of):
        pick = shown[group_of[shown] == group]
        ax.scatter(result.initial_weights[name][pick], result.final_weights[name][pick] - result.target,
                   s=14, alpha=0.7, color=_COLORS[group], linewidths=0)
    # symlog: exactly on target at 0, float32 ulps near it, failures far out, all visible
    ax.set_yscale("symlog", linthresh=1e-7)
    ax.axhspan(-result.tol, result.tol, color="tab:green", alpha=0.15, linewidth=0)
    ax.set(xlabel=f"{name} at init", ylabel=f"{name} - {result.target:g} after {result.steps} steps (symlog)",
           title=f"{name}: final against initial")
    ax.grid(True, alpha=0.3)


def _draw_landscape(ax, result: SweepResult, landscape, plane, group_of: np.ndarray) -> None:
    x_grid, y_grid, loss = landscape
    levels = np.log10(np.maximum(loss, 1e-8))
    filled = ax.contourf(x_grid, y_grid, levels, levels=24, cmap="Blues_r")
    plt.colorbar(filled, ax=ax, label="log10 loss")
    x_path, y_path = (result.trajectories[name] for name in plane)
    for seed, xs, ys, group in zip(result.seeds, x_path, y_path, group_of):
        color = _COLORS[group]
        ax.plot(xs, ys, color="white", linewidth=2.4, alpha=0.7)
        ax.plot(xs, ys, color=color, linewidth=1.4)
        ax.plot(xs[0], ys[0], "o", color=color, markersize=6, markeredgecolor="white")
        ax.plot(xs[-1], ys[-1], "X", color=color, markersize=8, markeredgecolor="white")
        ax.annotate(str(seed), (xs[0], ys[0]), xytext=(4, 4), textcoords="offset points", fontsize=8,
                    fontweight="bold", path_effects=[withStroke(linewidth=2.5, foreground="white")])
    ax.plot(result.target, result.target, "*", color="white", markeredgecolor="black", markersize=14)
    ax.set(xlim=(x_grid[0], x_grid[-1]), ylim=(y_grid[0], y_grid[-1]), xlabel=plane[0], ylabel=plane[1],
           title=f"loss landscape, seeds {result.seeds[0]}-{result.seeds[len(x_path) - 1]} tracked")
