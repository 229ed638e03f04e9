"""Any timm model (github.com/huggingface/pytorch-image-models) as a face backbone.

``timm.create_model(model_name, num_classes=0)`` gives the network's pooled features; an
embedding layer, Dropout → FC → BN (the pooled form of ArcFace's output "E"), maps them to
``embedding_size``. Parameters and cost depend on the model: measure them with
``python -m benchmarks.backbone_speed --backbones timm``.

timm is an optional extra: ``pip install -e ".[timm]"``. ``pretrained=True`` downloads
ImageNet weights from the Hugging Face hub (needs network access).
"""

from collections.abc import Mapping

import torch
from torch import nn

from facetrain.backbones.layers import Backbone


def import_timm():
    try:
        import timm
    except ImportError as error:
        raise ImportError(
            'backbone=timm needs the timm package: pip install -e ".[timm]" (or pip install timm)'
        ) from error
    return timm


class TimmBackbone(Backbone):
    """timm ``model_name`` + embedding layer: (N, 3, H, W) → (N, ``embedding_size``).

    ``model_kwargs`` go to ``timm.create_model``, e.g. ``{"img_size": [112, 112]}`` for vision
    transformers, whose position embeddings fix the input size (on the command line:
    ``+backbone.model_kwargs.img_size=[112,112]``). ``fp16`` as every backbone
    (:class:`Backbone`): the timm model in float16 on CUDA, Dropout-FC-BN in float32.
    """

    def __init__(self, model_name: str, embedding_size: int = 512,
                 input_size: tuple[int, int] = (112, 112), pretrained: bool = False,
                 dropout: float = 0.0, model_kwargs: Mapping | None = None, fp16: bool = False):
        timm = import_timm()
        if not timm.is_model(model_name):
            raise ValueError(
                f"timm has no model named {model_name!r} (backbone.model_name); list them with "
                f"python -c \"import timm; print(timm.list_models('*resnet*'))\""
            )
        super().__init__(f"timm {model_name}", embedding_size, input_size, fp16)
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs or {})  # to rebuild it with pretrained weights
        self.body = timm.create_model(
            model_name, pretrained=pretrained, num_classes=0, **dict(model_kwargs or {})
        )
        self._check_input_size()
        self.output = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(self.body.num_features, embedding_size),
            nn.BatchNorm1d(embedding_size),
        )

    @property
    def embedding(self) -> nn.Module:
        return self.output  # saved as output.* in checkpoints

    def _check_input_size(self) -> None:
        """Run one image through the body so an unsupported size fails here, not mid-training."""
        was_training = self.body.training
        self.body.eval()
        try:
            with torch.no_grad():
                self.body(torch.zeros(1, 3, *self.input_size))
        except (RuntimeError, ValueError, AssertionError) as error:
            raise ValueError(
                f"timm model {self.model_name!r} does not accept {self.input_size[0]}x"
                f"{self.input_size[1]} inputs ({error}); choose another data.image_size, or for "
                f"a vision transformer add +backbone.model_kwargs.img_size=[H,W]"
            ) from error
        finally:
            self.body.train(was_training)
