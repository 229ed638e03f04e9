"""Shared fixtures: a small synthetic face dataset and a tiny training run, made once per test
session."""

import subprocess
import sys
from pathlib import Path

import pytest

from facetrain.data import SyntheticFaces

REPO = Path(__file__).resolve().parent.parent


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
    overrides = [
        f"hydra.run.dir={run_dir}",
        f"data.synthetic.root={tiny_faces.root}",
        f"data.synthetic.num_train_identities={tiny_faces.num_train_identities}",
        f"data.synthetic.images_per_train_identity={tiny_faces.images_per_train_identity}",
        f"data.synthetic.num_verification_identities={tiny_faces.num_verification_identities}",
        "data.synthetic.images_per_verification_identity="
        f"{tiny_faces.images_per_verification_identity}",
        f"data.synthetic.num_pairs={tiny_faces.num_pairs}",
        f"data.synthetic.seed={tiny_faces.seed}",
        "data.image_size=[64,64]", "data.batch_size=16", "data.num_workers=0",
        "trainer.max_epochs=2", "measure_baselines=false", "loss.scale=16", "loss.margin=0.2",
        "+callbacks.checkpoint.save_top_k=-1", "model.projector_samples=40",
    ]
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides],
        cwd=run_dir.parent, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir
