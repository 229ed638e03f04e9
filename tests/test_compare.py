"""Sweeps and their report: ``python train.py -m loss=arcface,cosface`` runs comparable jobs,
and ``facetrain-compare`` joins their metrics.json and TensorBoard logs into a table, a CSV and
a figure, listing the settings that differ. The runs are the session's ``swept_runs``; every
other case copies and edits them (no more training)."""

import csv
import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from facetrain.cli.compare import main
from facetrain.compare import across_seeds, compare, load_run, markdown
from facetrain.data import SyntheticFaces

JOBS = {"0": "arcface", "1": "cosface"}


def facetrain_compare(*args: str) -> None:
    """``facetrain-compare ARGS``, in this process (the command's start-up is its imports)."""
    main(list(args))


def metrics_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def config_of(run: Path) -> dict:
    return yaml.safe_load((run / ".hydra" / "config.yaml").read_text())


def copy_run(run: Path, to: Path, edit=None) -> Path:
    """A copy of ``run`` at ``to``, ``edit(config dict)`` applied to its .hydra/config.yaml."""
    shutil.copytree(run, to)
    if edit is not None:
        config = config_of(to)
        edit(config)
        (to / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    return to


@pytest.mark.slow  # the session's sweep: two tiny real runs
def test_sweep_jobs_share_seed_and_held_out_pairs(swept_runs):
    folders = sorted(p.name for p in swept_runs.iterdir() if (p / "metrics.json").is_file())
    assert folders == list(JOBS)  # <sweep dir>/<job number>, as SLURM requeues need
    configs = {job: config_of(swept_runs / job) for job in JOBS}
    for job, loss in JOBS.items():
        overrides = yaml.safe_load((swept_runs / job / ".hydra" / "overrides.yaml").read_text())
        assert f"loss={loss}" in overrides
        assert metrics_of(swept_runs / job)["status"] == "finished"
    assert configs["0"]["seed"] == configs["1"]["seed"]
    assert configs["0"]["data"]["synthetic"] == configs["1"]["data"]["synthetic"]
    assert configs["0"]["loss"]["_target_"] != configs["1"]["loss"]["_target_"]
    pairs = {job: metrics_of(swept_runs / job)["verification"]["synthetic"]["num_pairs"]
             for job in JOBS}
    assert pairs["0"] == pairs["1"] == 200


def _generate(root: str) -> str:
    faces = SyntheticFaces(root=root, num_train_identities=6, images_per_train_identity=3,
                           num_verification_identities=4, images_per_verification_identity=3,
                           num_pairs=20, image_size=32, seed=5, workers=1).generate()
    return faces.pairs_file.read_text()


def test_jobs_generating_the_same_synthetic_set_at_once_do_not_collide(tmp_path):
    """Two sweep jobs (hydra/launcher=local runs them at once) that both find the synthetic set
    missing: both write it, one folder wins whole, neither fails or reads a half-written one."""
    root = str(tmp_path / "faces")
    context = multiprocessing.get_context("fork")  # as SyntheticFaces' own pool
    with context.Pool(3) as pool:
        written = pool.map(_generate, [root] * 3)
    assert len(set(written)) == 1 and written[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces"]  # no staging left behind
    assert len(list((tmp_path / "faces" / "train").glob("*/*.jpg"))) == 6 * 3


@pytest.mark.slow
def test_facetrain_compare_joins_the_runs(swept_runs, tmp_path, capsys):
    incomplete = copy_run(swept_runs / "1", tmp_path / "crashed")
    (incomplete / "metrics.json").unlink()  # still training, or it crashed
    out = tmp_path / "report"
    facetrain_compare(str(swept_runs), str(incomplete), f"output={out}")  # the console script
    result = capsys.readouterr()
    assert f"facetrain-compare: skipped {incomplete}: no metrics.json" in result.err
    assert "skipped 1 path(s); comparing 2 run(s)" in result.err

    # The CSV holds each run's metrics.json numbers, unrounded.
    with (out / "compare.csv").open() as stream:
        rows = {row["run"]: row for row in csv.DictReader(stream)}
    assert set(rows) == {f"sweep/{job}" for job in JOBS}
    markdown = (out / "compare.md").read_text()
    for job in JOBS:
        metrics, row = metrics_of(swept_runs / job), rows[f"sweep/{job}"]
        result_ = metrics["verification"]["synthetic"]
        assert row["set"] == "synthetic"
        for key in ("accuracy", "accuracy_std", "auc", "eer"):
            assert float(row[key]) == result_[key], key
        for far, tar in result_["tar_at_far"].items():
            assert row.get(f"tar@far={far}", "") == ("" if tar is None else json.dumps(tar))
        assert int(row["steps"]) == metrics["steps"] and int(row["epochs"]) == metrics["epochs"]
        assert float(row["seconds"]) > 0
        # The markdown table: the same numbers, as the training report prints them.
        (line,) = [x for x in markdown.splitlines() if x.startswith(f"| sweep/{job} |")]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2] == f"{result_['accuracy']:.4f} ± {result_['accuracy_std']:.4f}"
        assert cells[3:5] == [f"{result_['auc']:.4f}", f"{result_['eer']:.4f}"]
        assert cells[-3:-1] == [str(metrics["epochs"]), str(metrics["steps"])]
        assert line in result.out  # and printed
    assert "## Warnings" not in markdown  # same seed, same pairs

    # Which settings differ: the loss, and not the paths inside each run's folder.
    (section,) = [s for s in markdown.split("\n## ") if s.startswith("Settings that differ")]
    differing = {c.strip("| ").split(" | ")[0]: c.strip("| ").split(" | ")[1:]
                 for c in section.splitlines() if c.startswith("| ") and "---" not in c}
    assert differing["loss (group)"] == ["arcface", "cosface"]
    assert differing["loss._target_"] == ["facetrain.heads.ArcFace", "facetrain.heads.CosFace"]
    assert differing["loss.margin"] == ["0.5", "0.35"]  # the papers' margins
    assert not [k for k in differing if k.startswith(("run.", "sweep.", "seed", "data."))]
    assert "trainer.default_root_dir" not in differing
    assert "logger.tensorboard.save_dir" not in differing

    with Image.open(out / "compare.png") as image:
        image.verify()  # a whole, readable PNG
        # two panels of 12 x 4.8 in at 100 dpi, and below them the legend: a row per curve
        # here (2 x 0.25 in) plus 0.3 in of room
        assert image.format == "PNG" and image.size == (1200, 560)
    assert "Left out of the figure" not in markdown  # per-epoch accuracy and ROC of both


@pytest.mark.slow
def test_curves_are_each_runs_own(swept_runs):
    """The figure's data, against independent figures of the run: the ROC curve's area is the
    AUC metrics.json holds; the per-epoch accuracy is the CSV logger's, the untrained one at 0."""
    for job in JOBS:
        run = load_run(swept_runs / job)
        metrics = metrics_of(swept_runs / job)
        far, tar = run.roc["synthetic"]
        assert far[0] == tar[0] == 0 and far[-1] == tar[-1] == 1
        assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0)
        area = float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2))
        assert area == pytest.approx(metrics["verification"]["synthetic"]["auc"], abs=1e-4)
        with (swept_runs / job / "csv" / "metrics.csv").open() as stream:
            logged = [(int(r["epoch"]), float(r["val/synthetic/accuracy"]))
                      for r in csv.DictReader(stream) if r.get("val/synthetic/accuracy")]
        untrained = metrics["baselines"]["untrained"]["synthetic"]
        assert logged[0][1] == pytest.approx(untrained)  # measure_baselines: before training
        expected = [(0.0, logged[0][1])] + [(epoch + 1.0, acc) for epoch, acc in logged[1:]]
        got = run.accuracy_by_epoch["synthetic"]
        assert [e for e, _ in got] == [e for e, _ in expected] == [0.0, 1.0, 2.0]
        assert [a for _, a in got] == pytest.approx([a for _, a in expected], abs=1e-6)
        assert got[-1][1] == pytest.approx(metrics["verification"]["synthetic"]["accuracy"])


@pytest.mark.slow
def test_runs_of_different_sweeps_and_what_makes_them_not_comparable(
    swept_runs, tiny_faces, tmp_path
):
    elsewhere = copy_run(swept_runs / "1", tmp_path / "other_sweep" / "0")
    same = compare([swept_runs / "0", tmp_path / "other_sweep"])
    assert [r.path for r in same.runs] == [swept_runs / "0", elsewhere]
    first, second = (r.label for r in same.runs)  # relative to the folder they share
    assert first.endswith("sweep/0") and second.endswith("other_sweep/0") and first != second
    assert same.warnings == [] and same.skipped == []
    assert "loss (group)" in same.differing

    def reseed(config):
        config["seed"] = 7

    def other_pairs(config):
        pairs = tmp_path / "pairs.txt"
        lines = Path(tiny_faces.pairs_file).read_text().splitlines()
        pairs.write_text("\n".join(lines[:100]) + "\n")
        config["data"]["verification"]["synthetic"] = str(pairs)

    reseeded = copy_run(swept_runs / "1", tmp_path / "reseeded", reseed)
    (warning,) = compare([swept_runs / "0", reseeded]).warnings
    assert warning.startswith("runs differ in seed (") and "reseeded: 7" in warning
    repaired = copy_run(swept_runs / "1", tmp_path / "repaired", other_pairs)
    (warning,) = compare([swept_runs / "0", repaired]).warnings
    assert warning.startswith("verification set 'synthetic' is not the same pairs in every run")


def test_nothing_to_compare_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stop:  # the message is all the user sees: no traceback
        facetrain_compare(str(tmp_path / "empty"), str(tmp_path / "missing"))
    assert str(stop.value) == (
        f"facetrain-compare: compare error: no finished training runs to compare "
        f"({tmp_path / 'empty'}: no training runs in it (a run folder holds .hydra/config.yaml "
        f"and metrics.json); {tmp_path / 'missing'}: does not exist)"
    )
    assert not (tmp_path / "outputs").exists()  # no report written


@pytest.mark.slow
def test_runs_of_two_seeds_are_put_side_by_side(swept_runs, tmp_path):
    # Two seeds of the sweep's two heads, with accuracies set by hand.
    accuracies = {("arcface", 1): 0.81, ("arcface", 2): 0.85, ("cosface", 1): 0.90,
                  ("cosface", 2): 0.86}
    for (loss, seed), accuracy in accuracies.items():
        job = next(j for j, name in JOBS.items() if name == loss)
        run = copy_run(swept_runs / job, tmp_path / f"seed{seed}" / loss,
                       lambda config, seed=seed: config.update(seed=seed))
        metrics = metrics_of(run)
        metrics["verification"]["synthetic"]["accuracy"] = accuracy
        (run / "metrics.json").write_text(json.dumps(metrics))
    comparison = compare([tmp_path / "seed1", tmp_path / "seed2"])
    summary = across_seeds(comparison)
    assert [(row["runs"], row["seed 1"], row["seed 2"]) for row in summary] == [
        ("loss=cosface", 0.90, 0.86), ("loss=arcface", 0.81, 0.85)]  # best mean first
    assert [row["mean"] for row in summary] == pytest.approx([0.88, 0.83])
    assert [row["spread"] for row in summary] == pytest.approx([0.04, 0.04])
    assert "## Across seeds" in markdown(comparison)
    assert across_seeds(compare([tmp_path / "seed1"])) == []  # one seed: nothing to pair
