"""``facetrain-embed checkpoint=RUN_OR_CKPT images=FOLDER_OR_LIST [output=DIR]`` =
``python -m facetrain.cli.embed``: embeddings of a folder or list of images (see
``facetrain.embed.embed_from_config``)."""

import hydra
from omegaconf import DictConfig

from facetrain.cli import silence_library_noise, user_errors
from facetrain.embed import embed_from_config
from facetrain.resources import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="embed")
def main(cfg: DictConfig) -> None:
    silence_library_noise()
    with user_errors("facetrain-embed"):
        embed_from_config(cfg)


if __name__ == "__main__":
    main()
