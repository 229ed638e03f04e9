"""``facetrain-eval checkpoint=RUN_OR_CKPT [key=value ...]`` = ``python -m facetrain.cli.eval``:
verification metrics of trained backbones (see ``facetrain.eval.evaluate``)."""

import hydra
from omegaconf import DictConfig

from facetrain.cli import silence_library_noise, user_errors
from facetrain.eval import evaluate
from facetrain.resources import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    silence_library_noise()
    with user_errors("facetrain-eval"):
        evaluate(cfg)


if __name__ == "__main__":
    main()
