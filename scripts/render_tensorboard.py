"""Render a training run's margin diagnostics as TensorBoard-style scalar cards, in one PNG.

    python scripts/render_tensorboard.py RUN_FOLDER [--output docs/img/margin_diagnostics.png]

RUN_FOLDER is a facetrain run folder (its ``tensorboard/`` holds the event files) or a folder of
event files. The cards are the scalars every class-center store logs (``train/theta_y_deg``,
``train/theta_max_negative_deg``, ``train/cos_max_negative``, ``train/hard_negative_fraction``,
``train/accuracy``), the loss, every ``train/head_*`` state the margin logs (CurricularFace's
``t``, SphereFace's ``lambda``, AdaFace's norm statistics, ...) and, where the run wrote them,
the histograms of theta_y and of the best non-target angle at their first and last step. Lines
are smoothed as TensorBoard smooths them (a debiased exponential moving average, 0.6 by
default), the raw values drawn faintly behind. docs/tensorboard.md shows the result and says how
to read it; the PNG there was made by this script from a real run (the command is on that page).
"""

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # noqa: E402  after the backend is chosen
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# The margin diagnostics first, in the order a person reads them (docs/heads.md, "What to log").
CARDS = (
    "train/theta_y_deg",
    "train/theta_max_negative_deg",
    "train/hard_negative_fraction",
    "train/cos_max_negative",
    "train/accuracy",
    "train/loss",
)
HISTOGRAMS = ("train/theta_y_deg", "train/theta_max_negative_deg")
# TensorBoard's look: its first run colour, light grid, grey type.
LINE, RAW_ALPHA, GRID, TEXT = "#ff7043", 0.25, "#e6e6e6", "#5f6368"
SECOND = "#1e88e5"  # the best non-target angle's histogram


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's scalar smoothing: an exponential moving average divided by its weight so
    far (no pull towards 0 at the start); non-finite values are passed through unsmoothed."""
    smoothed, last, debias = [], 0.0, 0.0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(value)
            continue
        last = last * weight + (1 - weight) * value
        debias = debias * weight + (1 - weight)
        smoothed.append(last / debias)
    return smoothed


def event_folder(path: Path) -> Path:
    """The folder holding the event files: RUN/tensorboard for a run folder, else PATH."""
    for folder in (path / "tensorboard", path):
        if any(folder.glob("events.out.tfevents.*")):
            return folder
    raise SystemExit(f"render_tensorboard: no events.out.tfevents.* file in {path} or "
                     f"{path / 'tensorboard'}; give a facetrain run folder (outputs/train/<run>)")


def load(path: Path) -> EventAccumulator:
    events = EventAccumulator(str(event_folder(path)),
                              size_guidance={"scalars": 0, "histograms": 0})  # 0: keep all
    events.Reload()
    return events


def scalar_card(axes, events: EventAccumulator, tag: str, weight: float) -> None:
    points = events.Scalars(tag)
    steps = [p.step for p in points]
    values = [p.value for p in points]
    axes.plot(steps, values, color=LINE, alpha=RAW_ALPHA, linewidth=1)
    axes.plot(steps, smooth(values, weight), color=LINE, linewidth=1.6)
    style(axes, tag, "step")


def histogram_card(axes, events: EventAccumulator) -> None:
    """theta_y and the best non-target angle, at the first (faint) and last (solid) step they
    were written: the two distributions move apart as the margin works."""
    for tag, colour, label in zip(HISTOGRAMS, (LINE, SECOND), ("theta_y", "best non-target"),
                                  strict=True):
        written = events.Histograms(tag)
        for event, alpha in ((written[0], 0.35), (written[-1], 1.0)):
            value = event.histogram_value
            edges = np.concatenate([[value.min], np.asarray(value.bucket_limit[:-1])])
            widths = np.diff(np.concatenate([edges, [value.max]]))
            share = np.asarray(value.bucket) / max(sum(value.bucket), 1)
            density = share / np.maximum(widths, 1e-9)
            axes.step(edges, density, where="post", color=colour, alpha=alpha, linewidth=1.4,
                      label=f"{label}, step {event.step}")
    axes.legend(fontsize=6.5, frameon=False, labelcolor=TEXT, loc="upper left")
    style(axes, "theta_y vs best non-target (histograms)", "degrees")


def style(axes, title: str, xlabel: str) -> None:
    axes.set_title(title, loc="left", fontsize=9, color="#202124", pad=6)
    axes.grid(color=GRID, linewidth=0.8)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        axes.spines[side].set_color(GRID)
    axes.tick_params(colors=TEXT, labelsize=7, length=0)
    axes.set_xlabel(xlabel, fontsize=7, color=TEXT)


def render(run: Path, output: Path, weight: float) -> list[str]:
    """Write the PNG; return the scalar tags drawn."""
    events = load(run)
    scalars = set(events.Tags()["scalars"])
    tags = [tag for tag in CARDS if tag in scalars]
    tags += sorted(tag for tag in scalars if tag.startswith("train/head_"))
    if not tags:
        raise SystemExit(f"render_tensorboard: {run} logged none of {', '.join(CARDS)}: was it "
                         "a margin-head run with the TensorBoard logger?")
    histograms = all(tag in events.Tags()["histograms"] for tag in HISTOGRAMS)
    cards = len(tags) + histograms
    columns = min(4, cards)
    rows = math.ceil(cards / columns)
    figure, grid = plt.subplots(rows, columns, figsize=(3.1 * columns, 2.3 * rows),
                                squeeze=False, facecolor="white")
    cells = list(grid.flat)
    for axes, tag in zip(cells, tags, strict=False):  # more cells than tags: the rest is blank
        scalar_card(axes, events, tag, weight)
    if histograms:
        histogram_card(cells[len(tags)], events)
    for axes in cells[cards:]:
        axes.axis("off")
    figure.tight_layout(pad=1.2, h_pad=1.6, w_pad=1.4)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=90)
    plt.close(figure)
    return tags


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder (or a folder of event files)")
    parser.add_argument("--output", type=Path, default=Path("docs/img/margin_diagnostics.png"))
    parser.add_argument("--smoothing", type=float, default=0.6,
                        help="TensorBoard's smoothing weight in [0, 1) (default 0.6)")
    args = parser.parse_args(argv)
    if not 0 <= args.smoothing < 1:
        parser.error(f"--smoothing must be in [0, 1), got {args.smoothing}")
    tags = render(args.run, args.output, args.smoothing)
    size = args.output.stat().st_size
    print(f"wrote {args.output} ({size // 1024} KiB): {', '.join(tags)}", file=sys.stdout)


if __name__ == "__main__":
    main()
