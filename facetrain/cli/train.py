"""``python train.py [overrides]`` = ``facetrain-train`` = ``python -m facetrain.cli.train``:
one training run from the ``train`` config (see ``facetrain.train.train``)."""

import logging
import signal
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from facetrain.cli import silence_library_noise, user_errors
from facetrain.cluster import set_threads_from_slurm  # also registers the run-folder resolver
from facetrain.losses import LossError
from facetrain.module import TrainingError
from facetrain.optim import OptimizerConfigError
from facetrain.resources import config_dir
from facetrain.train import LoggerError, train

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> None:
    silence_library_noise()
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    set_threads_from_slurm()  # before the Trainer: its DDP launcher keeps a set OMP_NUM_THREADS
    try:
        with user_errors("facetrain", config=LossError, training=TrainingError,
                         optimizer=OptimizerConfigError, logger=LoggerError):
            metrics = train(cfg)
    except KeyboardInterrupt:  # Ctrl-C before training started (after, facetrain.preemption saves)
        print("facetrain: interrupted before the first training step; nothing to save",
              file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    if metrics.get("status") == "interrupted":  # SIGTERM, Ctrl-C: saved; exit as the shell does
        raise SystemExit(128 + getattr(signal, metrics["signal"]))


if __name__ == "__main__":
    main()
