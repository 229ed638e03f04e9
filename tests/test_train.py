"""The real entry point, run as a user runs it: ``python train.py <overrides>``."""

import json

import pytest
import torch
from helpers import hydra_main_config, run_cli, tiny_overrides

from facetrain.train import train


@pytest.mark.slow
def test_train_writes_checkpoints_tensorboard_and_metrics(tiny_faces, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "train.py", *tiny_overrides(tiny_faces, run_dir), "trainer.max_epochs=6",
        "loss.scale=16", "loss.margin=0.2", "callbacks.histograms.every_n_steps=10",
        "~callbacks.projector", cwd=tmp_path,  # the projector callback is what writes projections
    )
    assert result.returncode == 0, result.stderr[-3000:]

    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-epoch*.ckpt"))
    assert not list(run_dir.rglob("*.tmp")), "a checkpoint was left half-written"
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent), size_guidance={"histograms": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    for scalar in ("train/loss", "train/accuracy", "train/theta_y_deg",
                   "train/hard_negative_fraction", "val/synthetic/accuracy", "val/accuracy"):
        assert scalar in tags["scalars"], scalar
    assert "train/theta_y_deg" in tags["histograms"]
    assert "val/synthetic/roc" in tags["images"]
    # 6 epochs would project at epoch 5 and after the last; without the callback, never.
    assert not list((run_dir / "tensorboard").rglob("projector_config.pbtxt"))
    assert not list((run_dir / "tensorboard").rglob("metadata.tsv"))
    losses = [event.value for event in accumulator.Scalars("train/loss")]
    assert losses[-1] < losses[0], "the training loss did not fall"

    metrics = json.loads((run_dir / "metrics.json").read_text())
    final = metrics["verification"]["synthetic"]
    assert final["num_pairs"] == tiny_faces.num_pairs
    # Measured: raw pixels 0.60, untrained 0.68, trained 0.86 on these held-out identities.
    assert final["accuracy"] > 0.75, f"verification accuracy {final['accuracy']} is too low"
    assert final["accuracy"] > metrics["baselines"]["untrained"]["synthetic"] + 0.05
    assert final["accuracy"] > metrics["baselines"]["raw_pixels"]["synthetic"] + 0.05
    assert "final verification accuracy" in result.stderr + result.stdout


@pytest.mark.slow
def test_resume_restores_training_and_head_state(tiny_faces, tmp_path):
    """SphereFace's annealing counter must continue across a resume, not restart at zero.
    The first run also checks that training works without a logger."""
    first = tmp_path / "first"
    overrides = [*tiny_overrides(tiny_faces, first), "loss=sphereface", "measure_baselines=false"]
    result = run_cli("train.py", *overrides, "trainer.max_epochs=1", "logger=none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    last = first / "checkpoints" / "last.ckpt"

    resumed = tmp_path / "resumed"
    result = run_cli(
        "train.py", *tiny_overrides(tiny_faces, resumed), "loss=sphereface", "trainer.max_epochs=2",
        f"ckpt_path={last}", "scheduler.extend_on_resume=true", cwd=tmp_path,  # one more epoch
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((resumed / "metrics.json").read_text())
    steps_per_epoch = (tiny_faces.num_train_identities * tiny_faces.images_per_train_identity) // 16
    assert metrics["steps"] == 2 * steps_per_epoch  # continued from epoch 1, not from scratch
    state = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert int(state["head.iteration"]) == 2 * steps_per_epoch


@pytest.mark.slow  # a real run, if a short one (~10 s)
def test_train_in_process_for_quick_iteration(tiny_faces, tmp_path):
    """``train(cfg)`` called as ``facetrain-train``'s main calls it, without a subprocess: three
    steps of one epoch, then validation, a checkpoint and metrics.json."""
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(tiny_faces, run_dir), "trainer.max_epochs=1",
                 "+trainer.limit_train_batches=3", "measure_baselines=false", "logger=none"]
    with hydra_main_config("train", *overrides) as cfg:
        metrics = train(cfg)

    assert (metrics["epochs"], metrics["steps"]) == (1, 3)
    assert metrics["num_classes"] == tiny_faces.num_train_identities
    assert metrics["num_train_images"] == (
        tiny_faces.num_train_identities * tiny_faces.images_per_train_identity
    )
    assert metrics["verification"]["synthetic"]["num_pairs"] == tiny_faces.num_pairs
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 3
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3 and last["epoch"] == 0


def test_unknown_config_option_names_the_allowed_values(tmp_path):
    result = run_cli("train", "loss=no_such_head", cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "no_such_head" in result.stderr
    assert "arcface" in result.stderr and "softmax" in result.stderr


@pytest.mark.slow
def test_a_loss_partial_fc_cannot_run_is_one_clear_config_error(tiny_faces, tmp_path):
    result = run_cli(
        "train", *tiny_overrides(tiny_faces, tmp_path / "run"), "classifier=partial_fc",
        "loss=softmax", "measure_baselines=false", cwd=tmp_path, timeout=300,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "facetrain: config error: loss Softmax (with these settings) runs on classifier=full "
        "only, not classifier=partial_fc: its math needs more than the cosines to sampled centers"
    )


def test_missing_data_root_is_one_clear_error(tmp_path):
    missing = tmp_path / "no_such_folder"
    result = run_cli(
        "train", "data=folder", f"data.train_root={missing}", f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path, timeout=120,
    )
    assert result.returncode != 0
    assert f"'{missing}' does not exist" in result.stderr
    assert "Traceback" not in result.stderr
