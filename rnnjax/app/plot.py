"""A picture of a training run: the loss, and the weights on their way to 1."""

from __future__ import annotations

from typing import BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_training"]


def plot_training(history: dict[str, np.ndarray], file: BinaryIO, *, title: str = "") -> None:
    """Draws the loss (log scale) and each weight against the step, as a PNG into ``file``.

    Args:
      history: ``FitResult.history``.
      file: a binary file open for writing.
      title: a title for the figure.
    """
    steps = history["step"]
    weights = [k for k in history if k not in ("step", "loss", "grad_norm", "weight_error", "skipped")]
    fig, (loss_ax, weight_ax) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    loss_ax.semilogy(steps, np.maximum(history["loss"], np.finfo(np.float32).tiny))
    loss_ax.set(xlabel="step", ylabel="loss (MSE)", title="loss")
    for name in weights:
        weight_ax.plot(steps, history[name], label=name.rsplit("/", 1)[-1])
    weight_ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    weight_ax.set(xlabel="step", ylabel="weight", title="weights (target 1)")
    weight_ax.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(file, format="png", dpi=110)
    plt.close(fig)
