"""``align=true`` for the tools that take images a trained backbone embeds (``facetrain-embed``,
``facetrain-eval``): each photo is detected and aligned before the checkpoint's preprocessing.

``align`` is false (images already aligned), true (the template of the checkpoint's input
size, else arcface_112x112; the preprocessing then resizes the crop) or a template name.
"""

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from facetrain.align.detector import weights_dir
from facetrain.align.pipeline import AlignOptions, FaceAligner, read_photo
from facetrain.align.templates import TEMPLATES
from facetrain.data.image_list import ImageListDataset
from facetrain.data.images import DECODE_ERRORS, DatasetError

log = logging.getLogger(__name__)


def template_for(align, image_size) -> str | None:
    """The template ``align`` asks for, for a checkpoint of input ``image_size`` (H, W); None
    for align=false."""
    if align is None or align is False or str(align).lower() == "false":
        return None
    if align is True or str(align).lower() == "true":
        fitting = [name for name, (_, size) in TEMPLATES.items() if list(size) == list(image_size)]
        return fitting[0] if fitting else "arcface_112x112"
    if str(align) not in TEMPLATES:
        raise DatasetError(
            f"align={align}: give false, true (the template of the checkpoint's input size) or "
            f"a template: {', '.join(TEMPLATES)}"
        )
    return str(align)


def aligner_for(align, image_size) -> FaceAligner | None:
    """The aligner of ``align`` (None for false); checks the detector is installed, once."""
    template = template_for(align, image_size)
    if template is None:
        return None
    weights_dir()
    return FaceAligner(AlignOptions(template=template))


class AlignedImageList(ImageListDataset):
    """``ImageListDataset`` of photos: each read as shown (EXIF orientation), its largest face
    aligned, then ``transform``ed; a photo without a face yields (index, None, "no face"), so
    the embedder skips and lists it like an unreadable file."""

    def __init__(self, root: str | Path, paths: list[str], transform: Callable | None,
                 aligner: FaceAligner):
        super().__init__(root, paths, transform)
        self.aligner = aligner

    def __getitem__(self, index: int):
        try:
            image = read_photo(self.root / self.paths[index])
        except FileNotFoundError:
            return index, None, "missing"
        except DECODE_ERRORS as error:
            return index, None, f"{type(error).__name__}: {error}"
        _, crops = self.aligner(image)
        if not crops:
            return index, None, "no face"
        crop = crops[0][1]
        return index, self.transform(image=crop)["image"] if self.transform else crop, None


class AligningTransform:
    """A transform (albumentations call convention) that aligns the largest face first. For
    verification pairs every image must give an embedding: one without a face is used whole
    (resized by ``transform``), as insightface's LFW alignment falls back to the full image."""

    def __init__(self, aligner: FaceAligner, transform: Callable):
        self.aligner, self.transform = aligner, transform
        self.unaligned = 0  # in this process (each DataLoader worker counts its own)

    def __call__(self, image: np.ndarray, **_) -> dict:
        _, crops = self.aligner(image)
        if crops:
            image = crops[0][1]
        else:
            if not self.unaligned:
                log.warning("align=true: an image without a detected face is embedded whole "
                            "(resized), not aligned; later ones are not reported one by one")
            self.unaligned += 1
        return self.transform(image=image)


def aligning_transform(align, image_size, transform: Callable) -> Callable:
    """``transform``, aligning first when ``align`` asks for it (verification sets)."""
    aligner = aligner_for(align, image_size)
    return transform if aligner is None else AligningTransform(aligner, transform)


def image_list(align, image_size, root: Path, paths: list[str], transform: Callable):
    """The dataset ``facetrain-embed`` reads: aligned photos when ``align`` asks for it."""
    aligner = aligner_for(align, image_size)
    if aligner is None:
        return ImageListDataset(root, paths, transform)
    return AlignedImageList(root, paths, transform, aligner)
