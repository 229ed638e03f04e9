"""``facetrain-eval checkpoint=RUN_OR_CKPT [key=value ...]`` = ``python -m facetrain.cli.eval``:
verification metrics of trained backbones (see ``facetrain.eval.evaluate``)."""

import sys

import hydra
from omegaconf import DictConfig

from facetrain.cli import silence_library_noise, user_errors
from facetrain.eval import evaluate
from facetrain.resources import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def _main(cfg: DictConfig) -> None:
    silence_library_noise()
    with user_errors("facetrain-eval"):
        evaluate(cfg)


def main() -> None:
    # ``ijb=PATH`` is short for ``ijb.root=PATH``: Hydra itself would replace the whole ijb
    # node by the string, and a following ``ijb.set=IJBB`` would then fail.
    sys.argv[1:] = [
        f"ijb.root={arg[4:]}" if arg.startswith("ijb=") and not arg[4:].startswith("{") else arg
        for arg in sys.argv[1:]
    ]
    _main()


if __name__ == "__main__":
    main()
