"""``facetrain-export checkpoint=RUN_OR_CKPT [format=onnx|torchscript] [opset=18] [output=FILE]``
= ``python -m facetrain.cli.export``: a trained backbone as an ONNX or TorchScript model, kept
only if it matches PyTorch (see ``facetrain.export.export_from_config``)."""

import hydra
from omegaconf import DictConfig

from facetrain.cli import silence_library_noise, user_errors
from facetrain.export import ExportError, export_from_config
from facetrain.resources import config_dir


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def main(cfg: DictConfig) -> None:
    silence_library_noise()
    with user_errors("facetrain-export", export=ExportError):
        export_from_config(cfg)


if __name__ == "__main__":
    main()
