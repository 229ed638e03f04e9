"""Exact resume: a run killed mid-epoch and resumed ends where the uninterrupted run ends, having
trained each remaining batch once; a requeue signal saves and the same command finishes the run;
checkpoint writes survive kills; unsafe or unfitting checkpoints are refused in one line."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_overrides
from step_probe import read_batches

from facetrain.checkpoint import CheckpointError
from facetrain.optim import warmup_cosine
from facetrain.resume import newest_checkpoint, resume_checkpoint

TESTS = Path(__file__).resolve().parent
STEPS_PER_EPOCH = 25  # tiny_faces: 400 training images, batch 16


@pytest.fixture
def on_path(monkeypatch):
    """The test callbacks (step_probe) importable in the training subprocesses."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS), prepend=os.pathsep)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same threads in every run: same float sums


def train(faces, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_cli("train.py", *tiny_overrides(faces, run_dir), "measure_baselines=false",
                   "~callbacks.projector", "~callbacks.roc", *overrides, cwd=run_dir.parent)


def probe(file: Path) -> list[str]:
    return ["+callbacks.probe._target_=step_probe.RecordBatches", f"+callbacks.probe.file={file}"]


def signal_at(step: int, name: str) -> list[str]:
    return ["+callbacks.kill._target_=step_probe.SignalAtStep", f"+callbacks.kill.step={step}",
            f"+callbacks.kill.signal={name}"]


def training_state(checkpoint: Path) -> dict:
    """What must match after an exact resume: weights and buffers (the margin's state among
    them), optimizer moments, learning-rate schedule, loop counters."""
    ckpt = torch.load(checkpoint, weights_only=True)
    return {
        "state_dict": ckpt["state_dict"],
        "optimizer": ckpt["optimizer_states"][0]["state"],
        "lr": [group["lr"] for group in ckpt["optimizer_states"][0]["param_groups"]],
        "schedule": {k: ckpt["lr_schedulers"][0][k] for k in ("last_epoch", "_last_lr")},
        "global_step": ckpt["global_step"],
    }


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{where} differs (max {float((a - b).abs().max()):.3g})"
    else:
        assert a == b, where


# Partial-FC (on one process) draws its sampled negatives from the global torch RNG every step:
# the resumed run must continue that stream (RandomState).
EXACT = ["+trainer.deterministic=true", "trainer.max_epochs=2", "loss=curricular",
         "classifier=partial_fc", "classifier.sample_rate=0.5",
         "data.num_workers=2", "callbacks.last_checkpoint.every_n_train_steps=10",
         "callbacks.last_checkpoint.train_time_interval=null"]


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_exactly(tiny_faces, tmp_path, on_path):
    """SIGKILL at step 37 (mid second epoch; last periodic checkpoint at step 30), then the same
    command: the run retrains steps 31..50 only, on the same images with the same
    augmentations, and ends bit-identical to an uninterrupted run (CPU, one thread,
    deterministic). Steps re-done: 37 - 30 = 7, under the checkpoint interval of 10."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    result = train(tiny_faces, whole, *EXACT, *probe(tmp_path / "whole.jsonl"))
    assert result.returncode == 0, result.stderr[-3000:]

    killed = train(tiny_faces, broken, *EXACT, *probe(tmp_path / "first.jsonl"),
                   *signal_at(37, "SIGKILL"))
    assert killed.returncode == -signal.SIGKILL
    assert not (broken / "metrics.json").exists()
    resumed = train(tiny_faces, broken, *EXACT, *probe(tmp_path / "resumed.jsonl"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = resumed.stdout + resumed.stderr
    assert "resuming from" in said and "not resumable" not in said

    reference = read_batches(tmp_path / "whole.jsonl")
    first, second = read_batches(tmp_path / "first.jsonl"), read_batches(tmp_path / "resumed.jsonl")
    assert [b["step"] for b in reference] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert [b["step"] for b in first] == list(range(1, 38))
    assert [b["step"] for b in second] == list(range(31, 2 * STEPS_PER_EPOCH + 1))
    assert second == reference[30:]  # same images, same augmentations, same order
    metrics = json.loads((broken / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["resumed_from"].endswith("last.ckpt")
    assert_same(training_state(whole / "checkpoints" / "last.ckpt"),
                training_state(broken / "checkpoints" / "last.ckpt"))


@pytest.mark.slow
def test_requeue_signal_saves_then_the_same_command_finishes(tiny_faces, tmp_path, on_path):
    """SIGUSR2 (submitit's and our sbatch templates' requeue signal) at step 12: the run saves
    at that very step and exits cleanly; outside SLURM nobody requeues, so the test runs the
    same command again, which resumes at step 13 (no step re-done) and finishes."""
    run = tmp_path / "run"
    once = ["trainer.max_epochs=1", "data.num_workers=0"]
    stopped = train(tiny_faces, run, *once, *probe(tmp_path / "a.jsonl"),
                    *signal_at(12, "SIGUSR2"))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "requeued" and metrics["signal"] == "SIGUSR2"
    assert metrics["requeue"].startswith("none: not a SLURM job")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12

    again = train(tiny_faces, run, *once, *probe(tmp_path / "b.jsonl"))
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [b["step"] for b in read_batches(tmp_path / "b.jsonl")]
    assert steps == list(range(13, STEPS_PER_EPOCH + 1))
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_sigterm_to_rank_zero_stops_both_ranks_and_the_rerun_resumes(tiny_faces, tmp_path,
                                                                     on_path):
    """Two gloo processes; SIGTERM reaches rank 0 only. Both stop after the same step (they
    agree through an all-reduce), the checkpoint holds that step, metrics.json says
    interrupted, and the exit is clean: status 128 + SIGTERM, no traceback. The same command
    then resumes both ranks at the next step (each from its own random state) and finishes."""
    run = tmp_path / "ddp"
    ddp = ["trainer=ddp_cpu", "trainer.max_epochs=1", "data.num_workers=0"]
    result = train(tiny_faces, run, *ddp, *signal_at(5, "SIGTERM"), *probe(tmp_path / "a.jsonl"))
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["signal"] == "SIGTERM"
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 5
    assert len(saved["callbacks"]["RandomState"]["ranks"]) == 2  # each rank's generators
    # rank 0 and rank 1 each trained steps 1..5 (both write to the probe file), none more
    assert sorted(b["step"] for b in read_batches(tmp_path / "a.jsonl")) == sorted(
        [*range(1, 6)] * 2)

    again = train(tiny_faces, run, *ddp, *probe(tmp_path / "b.jsonl"))
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = read_batches(tmp_path / "b.jsonl")
    half = STEPS_PER_EPOCH // 2  # the global batch is two batches of 16: 12 steps an epoch
    assert sorted(b["step"] for b in resumed) == sorted([*range(6, half + 1)] * 2)
    # Over both runs and both ranks, 12 global batches of 32 distinct samples (an image and its
    # augmentation, identified by its label and pixel sum): none seen twice.
    samples = {(label, round(total, 3)) for b in read_batches(tmp_path / "a.jsonl") + resumed
               for label, total in zip(b["labels"], b["image_sums"], strict=True)}
    assert len(samples) == 2 * 16 * half
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"


class RunsCode:
    """A pickled object whose unpickling runs a shell command: what a hostile .ckpt holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused_unread(tmp_path, tiny_faces):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, evil)
    result = train(tiny_faces, tmp_path / "run", f"ckpt_path={evil}")
    assert result.returncode != 0
    assert not marker.exists()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("facetrain: checkpoint error: refusing to load"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "weights_only=False" not in result.stderr


def test_newest_checkpoint_skips_unreadable_and_refuses_code(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    assert newest_checkpoint(tmp_path / "run") is None
    good = folder / "best-epoch000.ckpt"
    torch.save({"state_dict": {}, "facetrain": {"version": 1}}, good)
    truncated = folder / "last.ckpt"  # newer, but cut short (a full disk)
    truncated.write_bytes(good.read_bytes()[:100])
    os.utime(good, (time.time() - 60, time.time() - 60))
    assert newest_checkpoint(tmp_path / "run") == good
    torch.save({"state_dict": {}, "payload": RunsCode(tmp_path / "x")}, folder / "z.ckpt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        newest_checkpoint(tmp_path / "run")
    assert not (tmp_path / "x").exists()


def schedule(total: int, extend: bool = False):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return warmup_cosine(optimizer, total, warmup_fraction=0.1, extend_on_resume=extend)


def test_schedule_length_is_stored_and_a_changed_length_refused():
    before = schedule(100)
    for _ in range(30):
        before.optimizer.step()
        before.step()
    state = pickle.loads(pickle.dumps(before.state_dict()))
    assert state["total_steps"] == 100
    same = schedule(100)
    same.load_state_dict(state)
    assert same.get_last_lr() == before.get_last_lr() and same.last_epoch == 30
    with pytest.raises(CheckpointError, match="fixed at 100 optimizer steps.*give 200"):
        schedule(200).load_state_dict(state)
    stretched = schedule(200, extend=True)
    stretched.load_state_dict(state)
    assert stretched.total_steps == 200 and stretched.last_epoch == 30


@pytest.mark.slow
def test_resume_with_more_epochs_is_refused_unless_stretched(trained_run, tmp_path, on_path,
                                                              tiny_faces):
    """The session's 2-epoch run, continued for a third epoch: refused with the one-line
    reason; with scheduler.extend_on_resume=true it trains the one more epoch."""
    run = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints", run / "checkpoints")
    longer = ["trainer.max_epochs=3", "data.num_workers=0", "loss.scale=16", "loss.margin=0.2"]
    refused = train(tiny_faces, run, *longer)
    assert refused.returncode != 0
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("facetrain: checkpoint error: cannot resume: the learning-rate "
                           "schedule of this run was fixed at 50"), refused.stderr[-2000:]
    stretched = train(tiny_faces, run, *longer, "scheduler.extend_on_resume=true")
    assert stretched.returncode == 0, stretched.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["steps"] == 3 * STEPS_PER_EPOCH


WRITER = """
import sys, torch
from facetrain.checkpoint import AtomicCheckpointIO
atomic = sys.argv[2] == "atomic"
big = {"state_dict": {"w": torch.ones(64, 1024, 1024)}}  # 256 MiB: a write takes a while
while True:
    if atomic:
        AtomicCheckpointIO().save_checkpoint(big, sys.argv[1])
    else:
        torch.save(big, sys.argv[1])
"""


def test_checkpoint_killed_while_writing_leaves_the_previous_one(tmp_path):
    """A real process rewriting last.ckpt in a loop is SIGKILLed while a write is under way
    (its .tmp is growing): the previous last.ckpt still loads with weights_only=True."""
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}}, path)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "atomic"])
    temporary = path.with_name("last.ckpt.tmp")
    try:
        deadline = time.monotonic() + 60
        while not (temporary.exists() and temporary.stat().st_size > 1 << 20):
            assert time.monotonic() < deadline and writer.poll() is None, "writer never wrote"
            time.sleep(0.005)
    finally:
        writer.kill()
        writer.wait()
    loaded = torch.load(path, weights_only=True)
    w = loaded["state_dict"]["w"]
    assert torch.equal(w, torch.arange(3.0)) or w.shape == (64, 1024, 1024)


def test_resume_checkpoint_choices(tmp_path):
    """Which checkpoint a run resumes from: a given file; the newest of a run folder for
    resume= and ckpt_path=last; this run's own newest when nothing is given; else none."""
    run = tmp_path / "run"
    assert resume_checkpoint(None, None, run) is None  # a new run
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        resume_checkpoint("last", None, run)
    with pytest.raises(CheckpointError, match="no such run folder"):
        resume_checkpoint(None, str(tmp_path / "nowhere"), run)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        resume_checkpoint(str(tmp_path / "x.ckpt"), None, run)
    (run / "checkpoints").mkdir(parents=True)
    older, newer = run / "checkpoints" / "best-epoch000.ckpt", run / "checkpoints" / "last.ckpt"
    for path in (older, newer):
        torch.save({"state_dict": {}, "facetrain": {"version": 1}}, path)
    os.utime(older, (time.time() - 60, time.time() - 60))
    assert resume_checkpoint(None, None, run) == newer  # a requeued job: by itself
    assert resume_checkpoint("last", None, run) == newer
    assert resume_checkpoint(None, str(run), tmp_path / "elsewhere") == newer
    assert resume_checkpoint(str(older), None, run) == older
    with pytest.raises(CheckpointError, match="give one"):
        resume_checkpoint(str(older), str(run), run)
