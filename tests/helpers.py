"""What the tests that drive entry points share: running a command as a user runs it, the
overrides of a tiny training run, and a config composed as a Hydra main composes it (for calling
the library function in-process)."""

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

import facetrain.cluster  # noqa: F401  the config resolvers, registered as the train main does
from facetrain.resources import config_dir

REPO = Path(__file__).resolve().parent.parent


def margin_configs() -> list[Path]:
    """The files of configs/loss/ that are a margin head on their own (``facetrain.heads``), not
    metric losses (contrastive, triplet) or combinations (center = softmax + a center term)."""
    files = sorted(Path(config_dir(), "loss").glob("*.yaml"))
    return [f for f in files
            if str(OmegaConf.load(f).get("_target_", "")).startswith("facetrain.heads.")]


def run_cli(
    name: str, *overrides: str, cwd: Path, timeout: int = 600, venv: Path | None = None
) -> subprocess.CompletedProcess:
    """Run entry point ``name`` (train, eval, embed, export, pack, synthetic) with ``overrides``
    in ``cwd`` and capture its output.

    By default ``python -m facetrain.cli.<name>`` with this checkout first on the path (so the
    code under test runs whatever facetrain is installed); ``name="train.py"`` runs the top-level
    wrapper instead, the README's first command. With ``venv`` the console script
    ``<venv>/bin/facetrain-<name>`` runs with nothing of this checkout or the user's site on the
    path: an installed package, as a user of the wheel runs it.
    """
    env = dict(os.environ)
    if venv is not None:
        env.pop("PYTHONPATH", None)
        env["PYTHONNOUSERSITE"] = "1"
        command = [str(venv / "bin" / f"facetrain-{name}")]
    else:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        script = [str(REPO / name)] if name.endswith(".py") else ["-m", f"facetrain.cli.{name}"]
        command = [sys.executable, *script]
    return subprocess.run(
        [*command, *overrides], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def tiny_overrides(faces, run_dir: Path) -> list[str]:
    """Train on ``faces`` (a generated ``SyntheticFaces``, e.g. the session's ``tiny_faces``) at
    64x64, writing to ``run_dir``, so that a run takes seconds."""
    return [
        f"hydra.run.dir={run_dir}",
        f"data.synthetic.root={faces.root}",
        f"data.synthetic.num_train_identities={faces.num_train_identities}",
        f"data.synthetic.images_per_train_identity={faces.images_per_train_identity}",
        f"data.synthetic.num_verification_identities={faces.num_verification_identities}",
        f"data.synthetic.images_per_verification_identity={faces.images_per_verification_identity}",
        f"data.synthetic.num_pairs={faces.num_pairs}",
        f"data.synthetic.seed={faces.seed}",
        "data.image_size=[64,64]",
        "data.batch_size=16",
        "data.num_workers=0",
    ]


@contextmanager
def hydra_main_config(config_name: str, *overrides: str) -> Iterator[DictConfig]:
    """``config_name`` with ``overrides``, as its ``@hydra.main`` would pass it to the library:
    composed from ``config_dir()``, ``HydraConfig`` set (``hydra:runtime.output_dir`` is
    ``hydra.run.dir``, created) and the ``hydra`` node removed. ``HydraConfig`` is cleared on
    exit."""
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    output_dir = Path(cfg.hydra.run.dir).absolute()
    output_dir.mkdir(parents=True, exist_ok=True)
    with read_write(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    try:
        yield cfg
    finally:
        HydraConfig.instance().cfg = None
