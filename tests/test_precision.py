"""Mixed precision and the non-finite guard (``model.nonfinite``) through the real entry point,
``python train.py``, on the session's tiny synthetic faces (25 steps an epoch). Bad batches are
made by tests/nonfinite_probe.py, loaded as a callback from the command line."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_overrides

TESTS = Path(__file__).resolve().parent
PROBE = "+callbacks.bad._target_=nonfinite_probe.BadBatches"


def train(tiny_faces, run_dir: Path, *overrides: str, image_size: int = 64):
    """One epoch of 8 steps (the tiny faces hold 25) at ``image_size``."""
    tiny = [o for o in tiny_overrides(tiny_faces, run_dir) if not o.startswith("data.image_size")]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", str(TESTS), prepend=os.pathsep)  # nonfinite_probe
        return run_cli(
            "train.py", *tiny, f"data.image_size=[{image_size},{image_size}]",
            "trainer.max_epochs=1", "+trainer.limit_train_batches=8", "measure_baselines=false",
            "~callbacks.projector", "~callbacks.histograms", *overrides, cwd=run_dir.parent,
        )


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """The values TensorBoard holds for ``tag``, by the step they were logged at."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def assert_finished_finite(result, run_dir: Path, skipped: tuple[int, ...] = ()) -> None:
    """The run finished; its verification metrics, its losses (but those of the ``skipped``
    steps, logged as they were) and its last checkpoint are finite."""
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = json.loads((run_dir / "metrics.json").read_text())["verification"]["synthetic"]
    assert math.isfinite(accuracy["accuracy"]) and math.isfinite(accuracy["auc"])
    losses = scalars(run_dir, "train/loss")
    assert losses
    for step, value in losses.items():
        assert math.isfinite(value) != (step in skipped), (step, value)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name, tensor in last.items():
        assert torch.isfinite(tensor).all(), name
        if tensor.is_floating_point():  # mixed precision keeps float32 weights
            assert tensor.dtype == torch.float32, name


@pytest.mark.slow
def test_bf16_mixed_trains_end_to_end(tiny_faces, tmp_path):
    run_dir = tmp_path / "run"
    # 32x32: this CPU has no bfloat16 instructions, its bf16 convolutions are ~10x slower
    result = train(tiny_faces, run_dir, "trainer.precision=bf16-mixed",
                   "trainer.log_every_n_steps=4", image_size=32)
    assert_finished_finite(result, run_dir)
    assert "Using bfloat16 Automatic Mixed Precision" in result.stderr + result.stdout
    assert list(scalars(run_dir, "train/nonfinite_skipped").values()) == [0, 0]


@pytest.mark.slow
def test_a_nan_batch_is_skipped_counted_and_the_run_finishes(tiny_faces, tmp_path):
    run_dir = tmp_path / "run"
    result = train(tiny_faces, run_dir, PROBE, "+callbacks.bad.nan_steps=[3]",
                   "trainer.log_every_n_steps=1")
    assert_finished_finite(result, run_dir, skipped=(3,))
    warnings = [line for line in result.stdout.splitlines() if "not finite" in line]
    assert len(warnings) == 1, warnings
    assert "step 3 (epoch 0): training loss is not finite (nan or inf); 16 of the batch's 16 " \
        "embeddings not finite; skipped: no update, BatchNorm and head state put back (1 in a " \
        "row, the run stops at 5 [model.max_nonfinite_in_a_row]; 1 skipped in all). Head at " \
        "this step: accuracy=" in warnings[0]
    skipped = scalars(run_dir, "train/nonfinite_skipped")
    assert skipped == {step: float(step >= 3) for step in range(8)}
    assert json.loads((run_dir / "metrics.json").read_text())["nonfinite_skipped_steps"] == 1


def test_non_finite_steps_in_a_row_stop_with_one_line(tiny_faces, tmp_path):
    run_dir = tmp_path / "run"
    result = train(tiny_faces, run_dir, PROBE, "+callbacks.bad.nan_steps=[2,3]",
                   "model.max_nonfinite_in_a_row=2")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "facetrain: training error: training loss is not finite (nan or inf) since step 2 "
        "(epoch 0) on 2 steps in a row, each skipped but the last "
        "(model.max_nonfinite_in_a_row=2): the run is diverging; lower optimizer.lr or add "
        "warm-up, then resume from the last good checkpoint in the run's checkpoints/ folder "
        "with ckpt_path=..."
    )
    assert not list(run_dir.rglob("*.ckpt")), "a checkpoint was written after the stop"


@pytest.mark.parametrize(("override", "message"), [
    ("+callbacks.bad.label=1000", "training label 1000 is not a class index in [0, 40): the "
     "classifier has 40 classes (counted in the training data); the training loader must give "
     "labels 0 to 39"),
    ("+callbacks.bad.float_labels=true", "training labels must be integer class indices, got "
     "torch.float32 labels (the first is "),
], ids=["out-of-range", "float"])
def test_bad_labels_stop_at_the_first_batch_with_one_line(tiny_faces, tmp_path, override,
                                                          message):
    result = train(tiny_faces, tmp_path / "run", PROBE, override)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"facetrain: data error: {message}")


@pytest.mark.slow
def test_under_ddp_a_nan_on_one_rank_is_skipped_by_both(tiny_faces, tmp_path):
    """Two gloo ranks, Partial-FC (sharded centers, per-rank BatchNorm): rank 1 alone meets a
    NaN image at step 2. Both ranks skip the step together (the decision is all-reduced), rank 0
    alone warns, and the ranks end with the same replicated state (tests/rank_probe.py)."""
    run_dir, probes = tmp_path / "run", tmp_path / "probes"
    result = train(
        tiny_faces, run_dir, "trainer=ddp_cpu", "classifier=partial_fc", "loss=adaface",
        "data.batch_size=8", PROBE, "+callbacks.bad.nan_steps=[2]", "+callbacks.bad.rank=1",
        "+callbacks.rank_probe._target_=rank_probe.SaveRankState",
        f"+callbacks.rank_probe.folder={probes}", "trainer.log_every_n_steps=1", image_size=32,
    )
    assert_finished_finite(result, run_dir, skipped=(2,))
    warnings = [line for line in result.stdout.splitlines() if "not finite" in line]
    assert len(warnings) == 1, warnings
    assert "step 2 (epoch 0): training loss is not finite (nan or inf); 8 of the batch's 16 " \
        "embeddings not finite (check those images); skipped" in warnings[0]
    assert "not finite" not in (run_dir / "train_ddp_process_1.log").read_text()
    ranks = [torch.load(probes / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 8
    for name, tensor in ranks[0]["state"].items():
        assert torch.isfinite(tensor).all(), name
        if not name.endswith(("running_mean", "running_var")):  # per-rank BatchNorm statistics
            assert torch.equal(tensor, ranks[1]["state"][name]), name
