"""Photos in, aligned crops out: the work of ``facetrain-align SRC DST`` (``facetrain.cli.align``).

Every image of SRC (an identity folder, searched recursively, or a text list of image paths)
is read, its faces found (``MTCNN``) or taken from a landmark file (``landmarks.py``), one or
all of them chosen (``faces.select_faces``) and warped onto the template (``align_face``).
Crops go to ``DST/<same relative path>`` (``DST/<identity>/<image>.<ext>``), so DST is an
identity folder again: ``python train.py data=folder data.train_root=DST``.

``DST/align_report.tsv`` has a row per crop written and per image skipped: file, faces found,
chosen face, score, landmarks, output, and why it was skipped. It is appended to as images are
done, so a run that is stopped resumes: images whose crops the report lists and that exist are
not redone (skipped ones are retried).
"""

import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from facetrain.align.faces import SELECTIONS, Face, select_faces
from facetrain.align.landmarks import LandmarkEntry, image_key, read_landmarks
from facetrain.align.templates import TEMPLATES
from facetrain.align.transform import align_face
from facetrain.data.image_list import list_images
from facetrain.data.images import DECODE_ERRORS, check_image_header, read_rgb
from facetrain.progress import image_progress

REPORT_NAME = "align_report.tsv"
REPORT_COLUMNS = ("file", "faces", "chosen", "score", "landmarks", "output", "skipped")
FORMATS = ("same", "png", "jpg")
# format=same keeps .jpg/.jpeg/.png; other inputs (.bmp, grayscale .pgm) become .png.
_KEPT_SUFFIXES = (".jpg", ".jpeg", ".png")


class AlignConfigError(ValueError):
    """Alignment settings that cannot work; the message names the key and what to give."""


@dataclass(frozen=True)
class AlignOptions:
    """What decides the crops (and, apart from the detector's speed, nothing else does)."""

    template: str = "arcface_112x112"
    face: str = "largest"  # one of faces.SELECTIONS
    format: str = "same"  # same | png | jpg
    jpeg_quality: int = 95
    min_face: float = 20.0  # the detector's smallest face side, pixels
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)  # MTCNN's three stages

    def check(self) -> None:
        if self.template not in TEMPLATES:
            known = ", ".join(TEMPLATES)
            raise AlignConfigError(f"template={self.template}: unknown; choose one of {known}")
        if self.face not in SELECTIONS:
            raise AlignConfigError(f"face={self.face}: choose one of {', '.join(SELECTIONS)}")
        if self.format not in FORMATS:
            raise AlignConfigError(f"format={self.format}: choose one of {', '.join(FORMATS)}")
        if not 0 <= self.jpeg_quality <= 100:
            raise AlignConfigError(f"jpeg_quality={self.jpeg_quality}: give 0..100")
        if not self.min_face >= 12:
            raise AlignConfigError(f"min_face={self.min_face}: give at least 12 (pixels)")
        if len(self.thresholds) != 3 or not all(0 <= t < 1 for t in self.thresholds):
            raise AlignConfigError(f"thresholds={list(self.thresholds)}: give three in [0, 1)")


def read_photo(path: str | Path) -> np.ndarray:
    """An (H, W, 3) uint8 RGB photo as it is shown: ``read_rgb``'s decoding, then the EXIF
    orientation a phone records instead of rotating the pixels (cv2.imread applies it too, so
    landmarks made with insightface's tools refer to the turned image)."""
    image = read_rgb(path)
    with Image.open(path) as opened:
        orientation = opened.getexif().get(0x0112, 1)
    turns = {3: 2, 6: -1, 8: 1}  # 180 degrees; 90 clockwise; 90 anticlockwise
    if orientation in (2, 4):
        image = image[:, ::-1] if orientation == 2 else image[::-1]
    elif orientation in turns:
        image = np.rot90(image, turns[orientation])
    elif orientation in (5, 7):  # transpose; transverse (the transpose turned 180 degrees)
        image = image.transpose(1, 0, 2)
        image = image if orientation == 5 else image[::-1, ::-1]
    return np.ascontiguousarray(image)


class FaceAligner:
    """Crops of the chosen face(s) of a photo: detected with MTCNN (built on first use, once
    per process) unless the faces are given."""

    def __init__(self, options: AlignOptions):
        options.check()
        self.options = options
        self._detector = None

    def detect(self, image: np.ndarray) -> list[Face]:
        if self._detector is None:
            from facetrain.align.detector import MTCNN  # torch only when detecting

            self._detector = MTCNN(self.options.min_face, self.options.thresholds)
        return self._detector.detect(image)

    def __call__(
        self, image: np.ndarray, faces: list[Face] | None = None
    ) -> tuple[list[Face], list[tuple[int, np.ndarray]]]:
        """(all faces found, [(index of a chosen face, its crop), ...]); no crops: no face."""
        faces = self.detect(image) if faces is None else faces
        chosen = select_faces(faces, image.shape[0], image.shape[1], self.options.face)
        crops = [(k, align_face(image, faces[k].landmarks, self.options.template)) for k in chosen]
        return faces, crops


def _output_stem(relative: str) -> str:
    return str(Path(relative).with_suffix(""))


def _output_suffix(relative: str, fmt: str) -> str:
    suffix = Path(relative).suffix.lower()
    if fmt == "same":
        return suffix if suffix in _KEPT_SUFFIXES else ".png"
    return f".{fmt}"


def output_names(relative: str, options: AlignOptions, count: int) -> list[str]:
    """Where the crops of ``relative`` go under DST: the same path (suffix per ``format``);
    with face=all, ``<stem>_<k>`` for its k-th face."""
    stem, suffix = _output_stem(relative), _output_suffix(relative, options.format)
    if options.face == "all":
        return [f"{stem}_{k}{suffix}" for k in range(count)]
    return [f"{stem}{suffix}"]


def _write_image(path: Path, rgb: np.ndarray, options: AlignOptions) -> None:
    """Encode and move into place, so an output that exists is complete (resume trusts it)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, options.jpeg_quality] if path.suffix != ".png" else []
    ok, encoded = cv2.imencode(path.suffix, np.ascontiguousarray(rgb[..., ::-1]), params)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(encoded.tobytes())
    os.replace(temporary, path)


def _format_landmarks(landmarks: np.ndarray) -> str:
    return ",".join(f"{v:.2f}" for v in np.asarray(landmarks).reshape(-1))


def _skip(relative: str, reason: str, faces: int | str = "") -> dict:
    return {**dict.fromkeys(REPORT_COLUMNS, ""), "file": relative, "faces": faces,
            "skipped": reason}


def _unreadable(path: Path, error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "missing"
    return check_image_header(path) or f"unreadable: {type(error).__name__}: {error}"


# One aligner per worker process (its detector is built once, not once per image).
_ALIGNER: FaceAligner | None = None


def _init_worker(options: AlignOptions) -> None:
    global _ALIGNER
    _ALIGNER = FaceAligner(options)


def _align_one(job: tuple[str, str, str, list[Face] | None]) -> list[dict]:
    """Report rows of one image: a row per crop written, or one row saying why none was."""
    relative, source, destination, given = job
    path = Path(source)
    if given is not None and not given:
        return [_skip(relative, "no line of the landmark file names it")]
    try:
        image = read_photo(path)
    except DECODE_ERRORS as error:  # FileNotFoundError is an OSError
        return [_skip(relative, _unreadable(path, error))]
    assert _ALIGNER is not None
    try:
        faces, crops = _ALIGNER(image, given)
    except ValueError as error:  # degenerate landmarks (all one point, NaN)
        return [_skip(relative, f"landmarks unusable: {error}")]
    if not crops:
        return [_skip(relative, "no face", 0)]
    names = output_names(relative, _ALIGNER.options, len(faces))
    rows = []
    for k, crop in crops:
        name = names[k if _ALIGNER.options.face == "all" else 0]
        _write_image(Path(destination) / name, crop, _ALIGNER.options)
        score = faces[k].score
        rows.append({
            "file": relative, "faces": len(faces), "chosen": k,
            "score": "" if score is None else f"{score:.4f}",
            "landmarks": _format_landmarks(faces[k].landmarks), "output": name, "skipped": "",
        })
    return rows


def _settings_line(options: AlignOptions, landmarks: str | None) -> str:
    source = f"landmarks={landmarks}" if landmarks else "detector=mtcnn"
    settings = {k: v for k, v in asdict(options).items() if landmarks is None or k not in (
        "min_face", "thresholds")}
    return "# facetrain-align " + " ".join(
        [source, *(f"{k}={v}" for k, v in settings.items())]
    )


def _read_report(path: Path) -> tuple[str | None, dict[str, list[dict]]]:
    """(settings line, {file: its rows}) of an earlier run's report; (None, {}) if none."""
    if not path.is_file():
        return None, {}
    lines = path.read_text().splitlines()
    settings = lines[0] if lines and lines[0].startswith("# ") else None
    rows: dict[str, list[dict]] = {}
    for line in lines:
        values = line.split("\t")
        if line.startswith("#") or len(values) != len(REPORT_COLUMNS) or values[0] == "file":
            continue
        row = dict(zip(REPORT_COLUMNS, values, strict=True))
        rows.setdefault(row["file"], []).append(row)
    return settings, rows


def _row_line(row: dict) -> str:
    return "\t".join(str(row[c]).replace("\t", " ").replace("\n", " ") for c in REPORT_COLUMNS)


@dataclass
class AlignResult:
    report: Path
    images: int  # images considered
    crops: int  # crops written by this run
    resumed: int  # images already done by an earlier run into the same DST
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    seconds: float = 0.0


def _jobs(
    root: Path, paths: list[str], dst: Path, entries: dict[str, LandmarkEntry] | None
) -> list[tuple[str, str, str, list[Face] | None]]:
    """(relative path, source path, DST, given faces or None to detect) per image; with a
    landmark file, also its images that SRC lacks (they are reported missing)."""
    if entries is None:
        return [(p, str(root / p), str(dst), None) for p in paths]
    by_key: dict[str, LandmarkEntry] = {}
    for key, entry in entries.items():
        absolute = Path(key)
        if absolute.is_absolute() and absolute.is_relative_to(root.absolute()):
            key = absolute.relative_to(root.absolute()).as_posix()  # matches its relative form
        by_key[key] = entry
    jobs = [(p, str(root / p), str(dst), by_key.get(image_key(p), LandmarkEntry(0)).faces)
            for p in paths]
    listed = {image_key(p) for p in paths}
    jobs += [(key, str(root / key), str(dst), entry.faces)
             for key, entry in by_key.items() if key not in listed]
    return jobs


def _check_collisions(jobs, options: AlignOptions) -> None:
    seen: dict[str, str] = {}
    for relative, *_ in jobs:
        target = _output_stem(relative) + _output_suffix(relative, options.format)
        if target in seen:
            raise AlignConfigError(
                f"{seen[target]} and {relative} would both be written to {target}; rename one, "
                f"or keep their suffixes apart with format=same"
            )
        seen[target] = relative


def align_images(
    src: str | Path,
    dst: str | Path,
    options: AlignOptions = AlignOptions(),
    *,
    landmarks: str | Path | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> AlignResult:
    """Align every image of ``src`` into ``dst`` (see the module docstring); ``landmarks``: a
    landmark file instead of the detector; ``workers``: processes (None: one per CPU; 0 or
    1: this process); ``overwrite``: redo everything instead of resuming."""
    start = time.perf_counter()
    options.check()
    if workers is not None and workers < 0:
        raise AlignConfigError(f"workers={workers}: give 0 or more (0 and 1: no extra process)")
    root, paths = list_images(src)
    dst = Path(dst).expanduser()
    if dst.resolve().is_relative_to(root.resolve()):  # a rerun would align the crops again
        raise AlignConfigError(f"DST {dst} is inside SRC {root}; give a folder outside it")
    entries = read_landmarks(landmarks) if landmarks is not None else None
    if entries is None:
        from facetrain.align.detector import weights_dir

        weights_dir()  # a missing detector is one message now, not one per image
    jobs = _jobs(root, paths, dst, entries)
    _check_collisions(jobs, options)

    report = dst / REPORT_NAME
    where = None if landmarks is None else str(Path(landmarks).expanduser().resolve())
    settings = _settings_line(options, where)
    previous_settings, previous = (None, {}) if overwrite else _read_report(report)
    if previous and previous_settings != settings:
        raise AlignConfigError(
            f"{dst} holds crops of another alignment ({(previous_settings or '?')[2:]}); give "
            f"a new DST, the same settings to resume, or overwrite=true to redo it"
        )
    done = {
        file for file, rows in previous.items()
        if all(row["output"] and (dst / row["output"]).is_file() for row in rows)
    }
    todo = [job for job in jobs if job[0] not in done]
    dst.mkdir(parents=True, exist_ok=True)
    carried = [row for job in jobs if job[0] in done for row in previous[job[0]]]
    with report.open("w") as out:  # rewritten now, appended to as images finish
        out.write(settings + "\n" + "\t".join(REPORT_COLUMNS) + "\n")
        out.writelines(_row_line(row) + "\n" for row in carried)

    results: dict[str, list[dict]] = {}
    with image_progress(progress) as bar, report.open("a") as out:
        task = bar.add_task("aligning", total=len(jobs), completed=len(jobs) - len(todo))
        for rows in _run(todo, options, workers):
            results[rows[0]["file"]] = rows
            out.writelines(_row_line(row) + "\n" for row in rows)
            out.flush()
            bar.advance(task)

    ordered = [row for job in jobs for row in (previous[job[0]] if job[0] in done
                                               else results[job[0]])]
    temporary = report.with_name(REPORT_NAME + ".tmp")
    temporary.write_text(settings + "\n" + "\t".join(REPORT_COLUMNS) + "\n"
                         + "".join(_row_line(row) + "\n" for row in ordered))
    os.replace(temporary, report)
    skipped = [(row["file"], row["skipped"]) for row in ordered if row["skipped"]]
    crops = sum(1 for rows in results.values() for row in rows if row["output"])
    return AlignResult(report, len(jobs), crops, len(done), skipped, time.perf_counter() - start)


def _run(jobs: list, options: AlignOptions, workers: int | None) -> Iterator[list[dict]]:
    """Each job's report rows, in any order; over ``workers`` processes."""
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    workers = min(workers, len(jobs))
    if workers <= 1:
        _init_worker(options)
        yield from map(_align_one, jobs)
        return
    # fork: workers start in milliseconds and inherit the imports; the parent never runs
    # torch, so no thread pool is forked. Elsewhere (macOS, Windows) fork is unsafe: spawn.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(workers, _init_worker, (options,)) as pool:
        yield from pool.imap_unordered(_align_one, jobs, chunksize=4)
