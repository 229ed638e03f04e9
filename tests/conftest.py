"""Shared fixtures: a small synthetic face dataset and a tiny training run, made once per test
session."""

from pathlib import Path

import pytest
from helpers import run_cli, tiny_overrides

from facetrain.data import SyntheticFaces


@pytest.fixture(scope="session")
def tiny_faces(tmp_path_factory) -> SyntheticFaces:
    """40 training identities × 10 images, 10 held-out identities, 200 verification pairs."""
    return SyntheticFaces(
        root=str(tmp_path_factory.mktemp("faces") / "synthetic"),
        num_train_identities=40,
        images_per_train_identity=10,
        num_verification_identities=10,
        images_per_verification_identity=6,
        num_pairs=200,
        seed=3,
        workers=1,
    ).generate()


@pytest.fixture(scope="session")
def trained_run(tiny_faces, tmp_path_factory) -> Path:
    """A real 2-epoch training run (``python train.py``) on ``tiny_faces`` at 64x64, made once
    per session: the run folder with checkpoints/best-epoch000.ckpt, best-epoch001.ckpt and
    last.ckpt (every epoch kept), tensorboard/ and metrics.json. About a minute on 2 CPU cores."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = run_cli(
        "train.py", *tiny_overrides(tiny_faces, run_dir),
        "trainer.max_epochs=2", "measure_baselines=false", "loss.scale=16", "loss.margin=0.2",
        "+callbacks.checkpoint.save_top_k=-1", "callbacks.projector.samples=40",
        cwd=run_dir.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def swept_runs(tiny_faces, tmp_path_factory) -> Path:
    """A real sweep, ``python train.py -m loss=arcface,cosface logger=[tensorboard,csv]``, on
    ``tiny_faces`` at 32x32 (2 epochs of 4 steps, baselines measured), made once per session for
    tests/test_compare.py and tests/test_loggers.py: the sweep folder, with job folders 0
    (arcface) and 1 (cosface). About 40 s on 2 busy CPU cores."""
    sweep = tmp_path_factory.mktemp("sweep") / "sweep"
    overrides = [o for o in tiny_overrides(tiny_faces, sweep)
                 if not o.startswith(("hydra.run.dir=", "data.image_size="))]
    result = run_cli(
        "train.py", "-m", f"hydra.sweep.dir={sweep}", "loss=arcface,cosface",
        "logger=[tensorboard,csv]", *overrides, "data.image_size=[32,32]",
        "trainer.max_epochs=2", "+trainer.limit_train_batches=4", "~callbacks.projector",
        cwd=sweep.parent,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return sweep
