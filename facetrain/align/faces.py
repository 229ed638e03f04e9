"""A face found in a photo (five landmarks, optionally a box and a score) and which of several
faces a photo's crop is taken from."""

from dataclasses import dataclass

import numpy as np

# largest: the largest, most central face (insightface's FaceAnalysis rule: box area minus
# twice the squared distance of the box centre from the image centre); score: the highest
# detection score (faces without one rank last, ties by the largest rule); all: every face.
SELECTIONS = ("largest", "score", "all")


@dataclass(frozen=True)
class Face:
    landmarks: np.ndarray  # (5, 2) image pixels: left eye, right eye, nose, mouth left, right
    score: float | None = None  # the detector's confidence, or a landmark file's score column
    box: np.ndarray | None = None  # (4,) x1, y1, x2, y2; None: the box of the landmarks

    def extent(self) -> np.ndarray:
        if self.box is not None:
            return np.asarray(self.box, dtype=np.float64)
        points = np.asarray(self.landmarks, dtype=np.float64)
        return np.concatenate([points.min(axis=0), points.max(axis=0)])


def _centrality(face: Face, height: int, width: int) -> float:
    x1, y1, x2, y2 = face.extent()
    offset = np.array([(x1 + x2) / 2 - width / 2, (y1 + y2) / 2 - height / 2])
    return float((x2 - x1) * (y2 - y1) - 2.0 * (offset**2).sum())


def select_faces(faces: list[Face], height: int, width: int, how: str = "largest") -> list[int]:
    """Indices into ``faces`` of the face(s) to crop from an image of ``height`` x ``width``:
    one for ``largest`` and ``score``, all of them in their order for ``all`` (see SELECTIONS).
    Empty when there are no faces."""
    if how not in SELECTIONS:
        raise ValueError(f"unknown face selection {how!r}; choose one of {', '.join(SELECTIONS)}")
    if not faces:
        return []
    if how == "all":
        return list(range(len(faces)))
    central = [_centrality(face, height, width) for face in faces]
    if how == "largest":
        return [int(np.argmax(central))]
    scores = [face.score if face.score is not None else -np.inf for face in faces]
    keys = list(zip(scores, central, strict=True))
    return [max(range(len(faces)), key=keys.__getitem__)]
