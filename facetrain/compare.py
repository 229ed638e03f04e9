"""Training runs side by side (``facetrain-compare``): the final verification metrics of each
run's ``metrics.json``, its per-epoch verification accuracy and final ROC curves from its
TensorBoard log (``val/<set>/accuracy``, ``val/<set>/roc_counts``; the CSV logger's
``metrics.csv`` when it has no TensorBoard log), its wall time from its log file, and which
settings of the runs' ``.hydra/config.yaml`` differ. Written as ``compare.md``,
``compare.csv`` and ``compare.png``.

A run folder holds ``.hydra/config.yaml`` and ``metrics.json`` (``python train.py``); any other
folder given is searched for run folders (a sweep, ``outputs/``). Runs are comparable when they
share the seed and score the same pairs of the same verification images: otherwise a warning
says which and where they differ.
"""

import csv
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

import facetrain.cluster  # noqa: F401  the run-folder resolvers the configs were composed with
import facetrain.finetune  # noqa: F401  ${facetrain.required:}
from facetrain.evaluation.plots import draw_roc

METRICS, CONFIG, HYDRA = "metrics.json", Path(".hydra", "config.yaml"), Path(".hydra", "hydra.yaml")
# Keys of train.yaml that name where a run writes: they differ between any two runs.
WHERE_KEYS = ("run.", "sweep.")
ABSENT = "—"  # a setting a run's config does not have
LEGEND_SETTINGS = 2  # differing settings named in the figure's legend


class CompareError(ValueError):
    """Nothing to compare: no run folder among the paths given."""


@dataclass
class Run:
    path: Path
    metrics: dict
    settings: dict[str, object]  # flat resolved config: {"loss.margin": 0.5, ...}
    choices: dict[str, str]  # config group options (``loss: arcface``), Hydra's record
    overrides: list[str]  # the command line's overrides
    verification_files: dict[str, str]  # per set: a digest of its pairs and images' generator
    accuracy_by_epoch: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    roc: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # (far, tar)
    seconds: float | None = None  # wall time of the run's starts, from its log file
    label: str = ""
    legend: str = ""


@dataclass
class Comparison:
    runs: list[Run]
    skipped: list[str]  # one line per path that is not a finished run
    differing: list[str]  # setting names whose values differ, group options first
    warnings: list[str]
    notes: list[str]  # what the figure leaves out, and why
    far_targets: list[str]


def find_runs(paths: list[str | Path]) -> tuple[list[Path], list[str]]:
    """The run folders under ``paths`` (each a run folder or a folder holding some), in the
    order given, and one line for each path or run that cannot be compared."""
    found: list[Path] = []
    skipped: list[str] = []
    for given in map(Path, paths):
        if not given.exists():
            skipped.append(f"{given}: does not exist")
            continue
        if given.is_file():
            given = given.parent if given.name == METRICS else given
        if (given / CONFIG).is_file():
            candidates, direct = [given], True
        else:
            candidates = sorted({c.parent.parent for c in given.rglob("config.yaml")
                                 if c.parent.name == ".hydra"})
            direct = False
        runs, reported = [], len(skipped)
        for folder in candidates:
            why = _why_not_a_run(folder)
            if why is None:
                runs.append(folder)
            elif direct or why != "not a training run":  # e.g. a facetrain-eval folder: quiet
                skipped.append(f"{folder}: {why}")
        if not runs and len(skipped) == reported:
            skipped.append(f"{given}: no training runs in it (a run folder holds {CONFIG} and "
                           f"{METRICS})")
        found.extend(r for r in runs if r.resolve() not in {f.resolve() for f in found})
    return found, skipped


def _why_not_a_run(folder: Path) -> str | None:
    try:
        config = OmegaConf.load(folder / CONFIG)
    except Exception as error:  # any unreadable YAML: say so, go on
        return f"unreadable {CONFIG} ({type(error).__name__})"
    if not isinstance(config, DictConfig) or "trainer" not in config or "backbone" not in config:
        return "not a training run"
    if not (folder / METRICS).is_file():
        return f"no {METRICS}: still training, or it stopped before writing one"
    try:
        metrics = json.loads((folder / METRICS).read_text())
    except (OSError, ValueError) as error:
        return f"unreadable {METRICS} ({error})"
    if not isinstance(metrics, dict) or "verification" not in metrics:
        return f"{METRICS} has no verification results"
    return None


def load_run(path: Path) -> Run:
    hydra = OmegaConf.load(path / HYDRA).hydra if (path / HYDRA).is_file() else None
    settings = _resolved_settings(path, hydra)
    cwd = Path(hydra.runtime.cwd) if hydra is not None else path
    # Hydra records the option of each group chosen as one file (not of lists: logger=[...]).
    choices = {}
    if hydra is not None:
        choices = {group: str(option) for group, option in hydra.runtime.choices.items()
                   if not group.startswith("hydra/") and option is not None}
    run = Run(
        path=path,
        metrics=json.loads((path / METRICS).read_text()),
        settings=settings,
        choices=choices,
        overrides=list(hydra.overrides.task) if hydra is not None else [],
        verification_files=_verification_digests(settings, cwd),
    )
    _read_logs(run)
    job = hydra.job.name if hydra is not None else "train"
    run.seconds = _wall_time(path / f"{job}.log")
    return run


LOG_LINE = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]\[([\w.]+)\]\[\w+\] - (.*)")


def _wall_time(log_file: Path) -> float | None:
    """Seconds from the first to the last line of the run's log (Hydra's ``<job>.log``: data
    scan, baselines, training, validation), summed over its starts when it was resumed (each
    begins with facetrain.resume's "resuming from"), so that time spent stopped is not counted."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return None
    starts: list[list[float]] = []
    for line in lines:
        match = LOG_LINE.match(line)
        if match is None:
            continue
        when = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S").timestamp() + int(match[2]) / 1e3
        if not starts or (match[3] == "facetrain.resume" and match[4].startswith("resuming")):
            starts.append([when, when])
        starts[-1][1] = when
    return sum(end - begin for begin, end in starts) if starts else None


def _resolved_settings(path: Path, hydra) -> dict[str, object]:
    """The run's config, flattened to dotted keys and resolved where it can be: ``${hydra:…}``
    from the run's own ``hydra.yaml`` (its output folder being where the run is now), the rest
    as when it ran; a value that no longer resolves (an environment variable, a clock) is kept
    as written. Keys that say where the run writes are left out: they always differ."""
    text = (path / CONFIG).read_text().replace("${hydra:", "${hydra.")
    config = OmegaConf.create(text)
    if hydra is not None:
        hydra = OmegaConf.create(OmegaConf.to_container(hydra, resolve=False))
        hydra.runtime.output_dir = str(path)
        config.hydra = hydra
    flat: dict[str, object] = {}
    _flatten(config, "", flat)
    return flat


def _flatten(node: DictConfig, prefix: str, out: dict) -> None:
    for key in node:
        name = f"{prefix}{key}"
        if name == "hydra" or name.startswith(WHERE_KEYS):
            continue
        try:
            value = node[key]
        except Exception:  # an interpolation that cannot resolve here
            value = OmegaConf.to_container(node, resolve=False)[key]
        if isinstance(value, DictConfig):
            _flatten(value, f"{name}.", out)
        else:
            out[name] = _plain(value)


def _plain(value):
    if isinstance(value, ListConfig):
        try:
            return OmegaConf.to_container(value, resolve=True)
        except Exception:  # an item that cannot resolve here
            return OmegaConf.to_container(value, resolve=False)
    return value


def _verification_digests(settings: dict, cwd: Path) -> dict[str, str]:
    """Per verification set, a digest of what decides its scores: the pair list / .bin file's
    bytes and, beside it, a generator's ``manifest.json`` (the synthetic faces': its images).
    A file no longer there is known by its path alone."""
    digests = {}
    for name in dict.fromkeys(k.split(".")[2] for k in settings
                              if k.startswith("data.verification.")):
        spec = settings.get(f"data.verification.{name}")
        if spec is None:  # a mapping: {path: ...} or {pairs: ..., images: ...}
            spec = settings.get(f"data.verification.{name}.path") or settings.get(
                f"data.verification.{name}.pairs")
        file = Path(str(spec)).expanduser()
        file = file if file.is_absolute() else cwd / file
        digests[name] = _digest(file) if file.is_file() else f"path {spec}"
    return digests


_DIGESTS: dict[tuple, str] = {}


def _digest(file: Path) -> str:
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        sha = hashlib.sha256()
        for part in (file, file.parent / "manifest.json"):
            if part.is_file():
                with part.open("rb") as stream:
                    for block in iter(lambda s=stream: s.read(1 << 20), b""):
                        sha.update(block)
        _DIGESTS[key] = sha.hexdigest()[:16]
    return _DIGESTS[key]


def _read_logs(run: Run) -> None:
    """Per-epoch accuracy and the final ROC curves from the run's TensorBoard event files
    (several: one per trainer.validate / fit and per start of the run), else the accuracy from
    its CSV logger's table."""
    events = sorted(run.path.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    sets = list(run.metrics.get("verification") or {})
    points: dict[str, list[tuple[float, int, float, float]]] = {s: [] for s in sets}
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        from tensorboard.util.tensor_util import make_ndarray

        last_roc = {}
        for file in events:
            log = EventAccumulator(str(file), size_guidance={"scalars": 0, "tensors": 0,
                                                             "images": 1, "histograms": 1})
            log.Reload()
            tags = log.Tags()
            epochs = {e.step: e.value for e in log.Scalars("epoch")} \
                if "epoch" in tags["scalars"] else {}
            for name in sets:
                if f"val/{name}/accuracy" in tags["scalars"]:
                    points[name] += [(e.wall_time, e.step, epochs.get(e.step, math.nan), e.value)
                                     for e in log.Scalars(f"val/{name}/accuracy")]
                if f"val/{name}/roc_counts" in tags["tensors"]:
                    last = log.Tensors(f"val/{name}/roc_counts")[-1]
                    if name not in last_roc or last.wall_time >= last_roc[name][0]:
                        last_roc[name] = (last.wall_time, make_ndarray(last.tensor_proto))
        run.roc = {name: _roc_from_counts(counts) for name, (_, counts) in last_roc.items()}
    else:
        for table in sorted(run.path.rglob("metrics.csv")):
            with table.open(newline="") as stream:
                for order, row in enumerate(csv.DictReader(stream)):
                    for name in sets:
                        value = row.get(f"val/{name}/accuracy")
                        if value:
                            points[name].append((order, int(row.get("step") or 0),
                                                 float(row.get("epoch") or "nan"), float(value)))
    untrained = (run.metrics.get("baselines") or {}).get("untrained") or {}
    for name, found in points.items():
        if found:
            run.accuracy_by_epoch[name] = _by_epoch(sorted(found), untrained.get(name))


def _by_epoch(points, untrained: float | None) -> list[tuple[float, float]]:
    """(epochs trained, accuracy) from validations in time order: the one before training
    (``measure_baselines``: the first, of the untrained accuracy) at 0, the one that ends epoch
    e at e + 1; a validation repeated after a resume replaces the earlier one."""
    curve: dict[float, float] = {}
    for i, (_, _, epoch, accuracy) in enumerate(points):
        before_training = i == 0 and untrained is not None and abs(accuracy - untrained) < 1e-6
        curve[0.0 if before_training else epoch + 1] = accuracy
    return sorted(curve.items())


def _roc_from_counts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FAR, TAR), FAR rising, from TensorBoard's raw PR-curve rows (TP, FP, TN, FN, precision,
    recall; thresholds rising) that ``facetrain.callbacks.ROCFigures`` writes."""
    tp, fp, tn, fn = (np.asarray(row, dtype=np.float64)[::-1] for row in counts[:4])
    return fp / np.maximum(fp + tn, 1), tp / np.maximum(tp + fn, 1)


def compare(paths: list[str | Path]) -> Comparison:
    """Read the runs under ``paths`` and what differs between them; raise ``CompareError``
    when there is none to read."""
    folders, skipped = find_runs(paths)
    if not folders:
        reasons = "; ".join(skipped) or "no paths given"
        raise CompareError(f"no finished training runs to compare ({reasons})")
    runs = [load_run(folder) for folder in folders]
    differing = _differing(runs)
    _label(runs, differing)
    fars = sorted({far for run in runs for result in run.metrics["verification"].values()
                   for far, tar in (result.get("tar_at_far") or {}).items() if tar is not None},
                  key=float, reverse=True)
    notes = []
    for run in runs:
        for name in run.metrics["verification"]:
            if name not in run.roc:
                notes.append(f"{run.label}: no ROC data for {name} (no val/{name}/roc_counts in "
                             f"a TensorBoard log: a run without TensorBoard or the roc "
                             f"callback): its curve is left out")
            if name not in run.accuracy_by_epoch:
                notes.append(f"{run.label}: no per-epoch accuracy for {name} (neither "
                             f"TensorBoard nor CSV log): left out of the figure")
    return Comparison(runs, skipped, differing, _warnings(runs), notes, fars)


def _label(runs: list[Run], differing: list[str]) -> None:
    """Labels: each run's folder from the folder the runs share, included (``<sweep>/0``); the
    figure's legend adds the config group options that differ (``loss=cosface``), else the
    first setting that does."""
    resolved = [run.path.resolve() for run in runs]
    common = Path(os.path.commonpath(resolved)).parent  # the sweep's own name stays in
    groups = [name for name in differing if name.endswith(" (group)")] or differing[:1]
    for run, path in zip(runs, resolved, strict=True):
        run.label = path.relative_to(common).as_posix()
        shown = [f"{name.removesuffix(' (group)')}={setting(run, name)}"[:40]
                 for name in groups[:LEGEND_SETTINGS]]
        shown = [item for item in shown if item not in run.label]  # the folder says loss=arcface
        run.legend = " ".join([run.label, *shown])


def _differing(runs: list[Run]) -> list[str]:
    if len(runs) < 2:
        return []

    def values(key: str, field_name: str) -> list:
        return [json.dumps(getattr(r, field_name).get(key, ABSENT), sort_keys=True, default=str)
                for r in runs]

    def in_run_folder(key: str) -> bool:  # a path inside each run's own folder
        return all(isinstance(v := r.settings.get(key), str) and v.startswith(str(r.path))
                   for r in runs if key in r.settings)

    # A group some runs chose as a list has no option recorded there: its keys say it.
    groups = sorted(set.intersection(*(set(r.choices) for r in runs)))
    keys = sorted({k for r in runs for k in r.settings})
    return [f"{g} (group)" for g in groups if len(set(values(g, "choices"))) > 1] + [
        k for k in keys if len(set(values(k, "settings"))) > 1 and not in_run_folder(k)]


def setting(run: Run, name: str):
    if name.endswith(" (group)"):
        return run.choices.get(name.removesuffix(" (group)"), ABSENT)
    return run.settings.get(name, ABSENT)


def _warnings(runs: list[Run]) -> list[str]:
    """Why the runs' numbers may not be comparable: a run that stopped early, another seed,
    other pairs or images."""
    warnings = [f"{r.label} stopped early ({r.metrics.get('status')} at step "
                f"{r.metrics.get('steps')}): its numbers are of its last validation"
                for r in runs if r.metrics.get("status", "finished") != "finished"]
    if len(runs) < 2:
        return warnings
    seeds = {r.label: r.settings.get("seed", ABSENT) for r in runs}
    if len(set(map(str, seeds.values()))) > 1:
        warnings.append("runs differ in seed (" + ", ".join(f"{k}: {v}" for k, v in
                        seeds.items()) + "): accuracy differences include seed noise")
    names = sorted({n for r in runs for n in r.metrics["verification"]})
    for name in names:
        having = [r for r in runs if name in r.metrics["verification"]]
        if len(having) < len(runs):
            missing = ", ".join(r.label for r in runs if r not in having)
            warnings.append(f"verification set {name!r} is not in every run (missing in "
                            f"{missing})")
        digests = {r.label: r.verification_files.get(name, "?") for r in having}
        pairs = {r.label: r.metrics["verification"][name].get("num_pairs") for r in having}
        if len(set(digests.values())) > 1 or len(set(pairs.values())) > 1:
            warnings.append(
                f"verification set {name!r} is not the same pairs in every run ("
                + ", ".join(f"{k}: {pairs[k]} pairs, {v}" for k, v in digests.items())
                + "): its numbers are not comparable across them")
    return warnings


# -- the report -----------------------------------------------------------------------------


def _number(value, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _cell(value) -> str:
    text = value if isinstance(value, str) and value else json.dumps(value, default=str)
    return text.replace("|", "\\|")


def rows(comparison: Comparison) -> list[dict]:
    """One row per (run, verification set), the numbers as metrics.json has them."""
    out = []
    for run in comparison.runs:
        results = run.metrics["verification"] or {None: {}}
        for name, result in results.items():
            row = {"run": run.label, "path": str(run.path), "status": run.metrics.get("status"),
                   "set": name, "accuracy": result.get("accuracy"),
                   "accuracy_std": result.get("accuracy_std"), "auc": result.get("auc"),
                   "eer": result.get("eer"), "num_pairs": result.get("num_pairs")}
            for far in comparison.far_targets:
                row[f"tar@far={far}"] = (result.get("tar_at_far") or {}).get(far)
            row.update(epochs=run.metrics.get("epochs"), steps=run.metrics.get("steps"),
                       seconds=run.seconds)
            for name_ in comparison.differing:
                row[name_] = setting(run, name_)
            out.append(row)
    return out


def across_seeds(comparison: Comparison) -> list[dict]:
    """The runs that differ only in ``seed``, side by side: per group of the other settings
    and verification set, the accuracy of each seed, their mean and spread (max - min), best
    mean first. Empty unless some group holds runs of two seeds or more."""
    if "seed" not in comparison.differing:
        return []
    others = [name for name in comparison.differing if name != "seed"]
    shown = [name for name in others if name.endswith(" (group)")] or others
    groups: dict[tuple, list[Run]] = {}
    for run in comparison.runs:
        groups.setdefault(tuple(json.dumps(setting(run, n), default=str) for n in others),
                          []).append(run)
    if all(len(runs) < 2 for runs in groups.values()):
        return []
    seeds = sorted({run.settings["seed"] for run in comparison.runs}, key=str)
    out = []
    for runs in groups.values():
        label = " ".join(f"{n.removesuffix(' (group)')}={setting(runs[0], n)}" for n in shown)
        for name in runs[0].metrics["verification"]:
            by_seed = {run.settings["seed"]: run.metrics["verification"].get(name, {})
                       .get("accuracy") for run in runs}
            found = [a for a in by_seed.values() if a is not None]
            out.append({"runs": label or "-", "set": name,
                        **{f"seed {seed}": by_seed.get(seed) for seed in seeds},
                        "mean": sum(found) / len(found) if found else None,
                        "spread": max(found) - min(found) if len(found) > 1 else None})
    return sorted(out, key=lambda row: (row["set"], -(row["mean"] or 0)))


def seeds_table(comparison: Comparison) -> list[str]:
    """``across_seeds`` as markdown lines (none when there is nothing to put side by side)."""
    summary = across_seeds(comparison)
    if not summary:
        return []
    header = list(summary[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary:
        lines.append("| " + " | ".join(
            _cell(v) if k in ("runs", "set") else _number(v) for k, v in row.items()) + " |")
    spreads = [row["spread"] for row in summary if row["spread"] is not None]
    largest = f" (largest {max(spreads):.4f}, mean {sum(spreads) / len(spreads):.4f})" \
        if spreads else ""
    return lines + ["", f"accuracy: 10-fold mean of the last validation; spread: max - min "
                    f"over the seeds{largest}."]


def markdown(comparison: Comparison, image: str | None = "compare.png") -> str:
    fars = comparison.far_targets
    header = ["run", "set", "accuracy", "AUC", "EER", *[f"TAR@FAR={f}" for f in fars],
              "epochs", "steps", "time"]
    lines = [f"# {len(comparison.runs)} training run(s) compared", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows(comparison):
        accuracy = "-" if row["accuracy"] is None else \
            f"{row['accuracy']:.4f} ± {row['accuracy_std']:.4f}"
        cells = [row["run"], row["set"] or "-", accuracy, _number(row["auc"]),
                 _number(row["eer"]), *[_number(row[f"tar@far={f}"]) for f in fars],
                 str(row["epochs"]), str(row["steps"]), _duration(row["seconds"])]
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    lines += ["", "accuracy: 10-fold mean ± std; AUC, EER, TAR@FAR over all pairs (the last "
              "validation, as metrics.json); time: the run's wall time, first to last line of "
              "its train.log (data scan, baselines, training, validation), summed over "
              "its starts if it was resumed."]
    if seeds := seeds_table(comparison):
        lines += ["", "## Across seeds", "", *seeds]
    if comparison.differing:
        labels = [run.label for run in comparison.runs]
        lines += ["", "## Settings that differ", "", "| setting | " + " | ".join(labels) + " |",
                  "|" + "---|" * (len(labels) + 1)]
        for name in comparison.differing:
            lines.append(f"| {name} | " + " | ".join(
                _cell(setting(run, name)) for run in comparison.runs) + " |")
    elif len(comparison.runs) > 1:
        lines += ["", "The runs' settings are the same."]
    for title, items in (("Warnings", comparison.warnings), ("Skipped", comparison.skipped),
                         ("Left out of the figure", comparison.notes)):
        if items:
            lines += ["", f"## {title}", "", *[f"- {item}" for item in items]]
    lines += ["", "## Runs", "", *[f"- `{run.label}`: {run.path} ({run.metrics.get('status')})"
                                   + (f" `{' '.join(run.overrides)}`" if run.overrides else "")
                                   for run in comparison.runs]]
    if image:
        lines += ["", f"![verification accuracy per epoch and ROC curves]({image})"]
    return "\n".join(lines) + "\n"


def draw_figure(comparison: Comparison):
    """Verification accuracy per epoch of every (run, set), and their final ROC curves."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    one_set = len({n for r in comparison.runs for n in r.metrics["verification"]}) <= 1
    labels = [run.legend if one_set else f"{run.legend}: {name}"
              for run in comparison.runs for name in run.metrics["verification"]]
    # One legend below both panels (a curve has the same colour and dash in each), in columns
    # that grow with the number of curves; the figure grows by its rows.
    columns = min(3, 1 + len(labels) // 8)
    legend_rows = -(-len(labels) // columns)
    legend_height = 0.25 * legend_rows + 0.3
    figure = Figure(figsize=(12, 4.8 + legend_height), dpi=100)
    accuracy_axes, roc_axes = figure.subplots(1, 2)
    palette = rcParams["axes.prop_cycle"].by_key()["color"]
    dashes = ("-", "--", ":", "-.")  # past the palette's colours, the next dash
    styles = [(palette[i % len(palette)], dashes[i // len(palette) % len(dashes)])
              for i in range(len(labels))]
    roc, roc_styles, i = {}, [], 0
    for run in comparison.runs:
        for name in run.metrics["verification"]:
            color, dash = styles[i]
            if name in run.accuracy_by_epoch:
                epochs, accuracy = zip(*run.accuracy_by_epoch[name], strict=True)
                accuracy_axes.plot(epochs, accuracy, marker="o", color=color, linestyle=dash,
                                   label=labels[i])
            if name in run.roc:
                roc[labels[i]] = run.roc[name]
                roc_styles.append((color, dash))
            i += 1
    accuracy_axes.set_xlabel("epochs trained (0: before training)")
    accuracy_axes.set_ylabel("verification accuracy (10-fold)")
    accuracy_axes.set_title("verification accuracy per epoch")
    accuracy_axes.grid(True, alpha=0.3)
    accuracy_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if roc:
        colors, linestyles = zip(*roc_styles, strict=True)
        roc_axes.set_prop_cycle(color=list(colors), linestyle=list(linestyles))
        draw_roc(roc_axes, roc)
        roc_axes.get_legend().remove()
    else:
        roc_axes.text(0.5, 0.5, "no ROC data in these runs", ha="center", va="center")
    handles, shown = accuracy_axes.get_legend_handles_labels()
    if not handles:
        handles, shown = roc_axes.get_legend_handles_labels()
    if handles:
        figure.legend(handles, shown, loc="lower center", ncol=columns, fontsize="small",
                      frameon=False)
    roc_axes.set_title("ROC, last validation")
    figure.tight_layout(rect=(0, legend_height / (4.8 + legend_height), 1, 1))
    return figure


def write_report(comparison: Comparison, output: str | Path | None = None) -> Path:
    """compare.md, compare.csv and compare.png in ``output`` (default
    ``outputs/compare/<date_time>``); return the folder."""
    folder = Path(output) if output else Path("outputs", "compare",
                                              datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    folder.mkdir(parents=True, exist_ok=True)
    table = rows(comparison)
    with (folder / "compare.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(table[0]))
        writer.writeheader()
        for row in table:
            writer.writerow({k: v if isinstance(v, str) or v is None else json.dumps(v)
                             for k, v in row.items()})
    (folder / "compare.md").write_text(markdown(comparison))
    draw_figure(comparison).savefig(folder / "compare.png")
    return folder
