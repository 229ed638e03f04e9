"""ROC plots: TAR against FAR on a log-scale FAR axis, one curve per (model, verification set)."""

from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")  # files and TensorBoard only; never opens a window

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = "ROC") -> Figure:
    """A figure of ``{label: (far, tar)}`` curves (``draw_roc``)."""
    figure = Figure(figsize=(6, 4.5), dpi=100)
    axes = figure.add_subplot()
    draw_roc(axes, curves)
    axes.set_title(title)
    figure.tight_layout()
    return figure


def draw_roc(axes, curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """``{label: (far, tar)}`` curves on matplotlib ``axes``. FAR = 0 cannot be drawn on a log
    axis: the axis starts at the smallest FAR a curve resolves (1 / its number of different
    pairs)."""
    smallest = 1.0
    for label, (far, tar) in curves.items():
        far, tar = np.asarray(far, dtype=float), np.asarray(tar, dtype=float)
        resolvable = far[far > 0].min() if (far > 0).any() else 1.0
        smallest = min(smallest, resolvable)
        # The points at FAR = 0 are drawn at the first resolvable FAR, the curve's left edge.
        axes.plot(np.maximum(far, resolvable), tar, label=label)
    axes.set_xscale("log")
    axes.set_xlim(smallest, 1.0)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("false accept rate (FAR)")
    axes.set_ylabel("true accept rate (TAR)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
