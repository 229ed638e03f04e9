"""The five-point templates aligned crops are warped onto.

Points are in crop pixels, ordered as insightface orders them: left eye, right eye, nose tip,
left mouth corner, right mouth corner (left = the viewer's left). Each entry is
``(points (5, 2) float32, (height, width))``.
"""

import numpy as np

TEMPLATES: dict[str, tuple[np.ndarray, tuple[int, int]]] = {
    # insightface's `arcface_dst` (python-package/insightface/utils/face_align.py), the crops
    # every ArcFace/CosFace model of insightface and arcface_torch is trained on.
    "arcface_112x112": (
        np.array(
            [
                [38.2946, 51.6963],
                [73.5318, 51.5014],
                [56.0252, 71.7366],
                [41.5493, 92.3655],
                [70.7299, 92.2041],
            ],
            dtype=np.float32,
        ),
        (112, 112),
    ),
    # SphereFace's 96x112 template (Liu et al., CVPR 2017, the sphereface repo's alignment
    # step); arcface_dst is this one shifted 8 px right to centre it in a 112-wide crop.
    "sphereface_112x96": (
        np.array(
            [
                [30.2946, 51.6963],
                [65.5318, 51.5014],
                [48.0252, 71.7366],
                [33.5493, 92.3655],
                [62.7299, 92.2041],
            ],
            dtype=np.float32,
        ),
        (112, 96),
    ),
}


def template(name: str) -> tuple[np.ndarray, tuple[int, int]]:
    """The template called ``name``; a ValueError naming the known ones otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted(TEMPLATES))
        raise ValueError(f"unknown alignment template {name!r}; known: {known}") from None
