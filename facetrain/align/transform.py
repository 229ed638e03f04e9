"""The warp: a least-squares similarity transform from five landmarks onto a template.

Shared by ``facetrain-align``, ``align=true`` in embed/eval, and the IJB evaluation (which
ships its own landmarks). Pure numpy + cv2, no torch.
"""

import cv2
import numpy as np

from facetrain.align.templates import template as _template


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix ``M`` of the similarity (rotation, uniform scale, shift; no reflection)
    that minimises ``sum ||M @ [src_i, 1] - dst_i||^2`` (Umeyama, TPAMI 1991, eq. 40-42).

    ``src`` and ``dst`` are (N, 2) point sets, N >= 2, in the same order. Computed in float64.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two (N, 2) point sets, N >= 2; got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    # Umeyama's S: flip the last axis when the best orthogonal map would be a reflection.
    s = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        s[-1] = -1.0
    rotation = u @ np.diag(s) @ vt
    src_var = (src_c**2).sum() / len(src)
    if src_var == 0:
        raise ValueError("all source landmarks are the same point; no transform is defined")
    scale = (singular * s).sum() / src_var
    matrix = np.empty((2, 3), dtype=np.float64)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - matrix[:, :2] @ src_mean
    return matrix


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points`` (N, 2) mapped by the 2x3 ``matrix``."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def align_face(
    image: np.ndarray, landmarks: np.ndarray, template: str = "arcface_112x112"
) -> np.ndarray:
    """The crop of ``image`` (H x W x C or H x W, uint8, any channel order, returned in the
    same one) whose five ``landmarks`` ((5, 2) image pixels: left eye, right eye, nose tip,
    left mouth corner, right mouth corner) land on the ``template`` points.

    Bilinear, and pixels from outside the photo are black (constant 0) as in insightface's
    ``norm_crop``: the crops then match what insightface-trained models saw, and a face near
    the photo's edge is not padded with smeared edge pixels that look like texture.
    """
    points, (height, width) = _template(template)
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"need (5, 2) landmarks, got shape {landmarks.shape}")
    if not np.isfinite(landmarks).all():
        raise ValueError("landmarks contain NaN or infinity")
    matrix = similarity_transform(landmarks, points)
    return cv2.warpAffine(
        image,
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
