"""Face alignment: five landmarks → a similarity warp onto a template crop.

    from facetrain.align import align_face, similarity_transform, TEMPLATES
    crop = align_face(image, landmarks, "arcface_112x112")   # (112, 112, C), same channels

``templates`` holds the template points, ``transform`` the warp (shared with the IJB
evaluation), ``landmarks`` the landmark-file readers, ``detector`` the optional detector
(``pip install -e ".[align]"``), ``pipeline`` the folder-to-folder run of ``facetrain-align``.
This package imports no torch unless the detector is asked for.
"""

from facetrain.align.templates import TEMPLATES
from facetrain.align.transform import align_face, similarity_transform, transform_points

__all__ = ["TEMPLATES", "align_face", "similarity_transform", "transform_points"]
