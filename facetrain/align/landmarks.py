"""Five-point landmarks read from a file instead of detected: how insightface's face2rec lists,
IJB's ``*_name_5pts_score.txt`` and most benchmark sets ship them.

Formats, by the file's suffix (blank lines and lines starting with ``#`` are ignored):

- ``.lst``, insightface's face2rec list: tab-separated ``aligned path label x1 y1 x2 y2``
  (the face box) then the five x then the five y of the landmarks (17 fields).
- ``.csv``: ``path,x1,y1,x2,y2,...,x5,y5[,score]`` (landmark by landmark); a first line whose
  numbers do not parse is a header.
- anything else (``.txt``): the same as whitespace-separated fields, as IJB's files.

Landmarks are ordered left eye, right eye, nose tip, left mouth corner, right mouth corner in
image pixels. An image named on several lines has several faces.
"""

import csv
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from facetrain.align.faces import Face
from facetrain.data.images import DatasetError

FORMATS = {
    ".lst": "tab-separated: aligned, path, label, 4 box numbers, 5 x, 5 y (17 fields)",
    ".csv": "path, then 10 numbers x1,y1,...,x5,y5, then an optional score",
    "other": "path, then 10 numbers x1 y1 ... x5 y5, then an optional score (whitespace)",
}


class LandmarkFileError(DatasetError):
    """A landmark file cannot be read; the message names file:line."""


@dataclass
class LandmarkEntry:
    line: int  # where the image is first named (1-based)
    faces: list[Face] = field(default_factory=list)


def image_key(path: str) -> str:
    """The form image paths are matched in: forward slashes, no ``./`` or doubled slashes."""
    return str(PurePosixPath(path.strip().replace("\\", "/")))


def _numbers(fields: list[str]) -> np.ndarray | None:
    try:
        values = np.array([float(f) for f in fields], dtype=np.float64)
    except ValueError:
        return None
    return values if np.isfinite(values).all() else None


def _parse(fields: list[str], kind: str) -> tuple[str, Face] | str:
    """(image path, face) of one line's fields, or why the line is malformed."""
    if kind == ".lst":
        if len(fields) != 17:
            return f"{len(fields)} fields"
        values = _numbers(fields[3:])
        if values is None:
            return "a box or landmark field is not a finite number"
        landmarks = np.stack([values[4:9], values[9:14]], axis=1)  # 5 x, then 5 y
        return fields[1], Face(landmarks=landmarks, box=values[:4])
    if len(fields) not in (11, 12):
        return f"{len(fields)} fields"
    values = _numbers(fields[1:])
    if values is None:
        return "a landmark or score field is not a finite number"
    score = float(values[10]) if len(values) == 11 else None
    return fields[0], Face(landmarks=values[:10].reshape(5, 2), score=score)


def read_landmarks(path: str | Path) -> dict[str, LandmarkEntry]:
    """{image path as written (``image_key``): its faces} of a landmark file (formats above).

    A malformed line is an error naming ``file:line``, before any image is touched: a file
    read in the wrong format would otherwise skip every image one by one."""
    path = Path(path).expanduser()
    kind = path.suffix.lower() if path.suffix.lower() in (".lst", ".csv") else "other"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise LandmarkFileError(f"cannot read the landmark file {str(path)!r}: {error}") from None
    lines = text.splitlines()
    if kind == ".csv":
        rows = list(csv.reader(lines))
    elif kind == ".lst":
        rows = [line.split("\t") if "\t" in line else line.split() for line in lines]
    else:
        rows = [line.split() for line in lines]
    entries: dict[str, LandmarkEntry] = {}
    first = True
    for number, (line, fields) in enumerate(zip(lines, rows, strict=True), start=1):
        fields = [f.strip() for f in fields]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parsed = _parse(fields, kind)
        header, first = first and kind == ".csv" and _numbers(fields[1:]) is None, False
        if isinstance(parsed, str):
            if header:
                continue
            raise LandmarkFileError(
                f"{path}:{number}: malformed landmark line ({parsed}); expected "
                f"{FORMATS[kind]}. Fix or delete the line"
            )
        image, face = parsed
        entries.setdefault(image_key(image), LandmarkEntry(number)).faces.append(face)
    if not entries:
        raise LandmarkFileError(f"{path} names no images; expected lines of {FORMATS[kind]}")
    return entries
