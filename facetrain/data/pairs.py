"""Verification sets: pair lists, LFW ``pairs.txt`` and insightface ``.bin`` files, opened from
config by ``open_verification_set``, and pairs drawn from identities held out of training
(``HeldOutPairs``).

Every set yields each distinct image once, as (image, image index), and exposes ``name``,
``pairs`` (P, 2) image indices, ``same`` (P,) flags and ``identities`` (one name per image, or
None when the format does not record it), so embeddings are computed once however many pairs use
an image. Pair order is kept: LFW's files list 10 consecutive folds, which the 10-fold protocol
in ``facetrain.evaluation`` cuts along.

Pair list: text lines ``path1 path2 same`` (1 = same identity), paths relative to the file.
LFW ``pairs.txt`` (Huang et al. 2007): a header ``folds<TAB>n`` (or just ``n``), then per fold n
``name i j`` lines (same person) and n ``name1 i name2 j`` lines (different people); image i of
a person is ``<images>/<name>/<name>_<i:04d>.jpg``.
"""

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from facetrain.data.binset import BinDataset
from facetrain.data.images import DECODE_ERRORS, DatasetError, check_image_header, read_rgb

log = logging.getLogger(__name__)

FORMATS = ("pairs", "lfw", "bin")


def _index_pairs(
    path_pairs: list[tuple[Path, Path]], same: list[bool], source: Path
) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """(distinct paths, pair indices (P, 2), same (P,)) from pairs of paths."""
    if not path_pairs:
        raise DatasetError(f"verification pair list {str(source)!r} holds no pairs")
    same = np.array(same)
    if same.all() or not same.any():
        raise DatasetError(
            f"verification pair list {str(source)!r} needs both same and different pairs to "
            f"choose a threshold"
        )
    index: dict[Path, int] = {}
    pairs = [[index.setdefault(path, len(index)) for path in pair] for pair in path_pairs]
    return list(index), np.array(pairs), same


def read_pair_list(pairs_file: str | Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Parse a pair list into (distinct image paths, pair indices (P, 2), same flags (P,))."""
    pairs_file = Path(pairs_file)
    if not pairs_file.is_file():
        raise DatasetError(
            f"verification pair list {str(pairs_file)!r} does not exist; it must be a text file "
            f"of 'path1 path2 same' lines"
        )
    path_pairs, same = [], []
    for number, line in enumerate(pairs_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 3 or fields[2] not in ("0", "1"):
            raise DatasetError(
                f"{pairs_file}:{number}: expected 'path1 path2 same' with same 0 or 1, got {line!r}"
            )
        path_pairs.append(tuple((pairs_file.parent / field).resolve() for field in fields[:2]))
        same.append(fields[2] == "1")
    return _index_pairs(path_pairs, same, pairs_file)


def lfw_header(line: str) -> int | None:
    """The number of pairs an LFW header line announces (``folds n`` → 2·folds·n, ``n`` → 2n),
    or None when the line is not such a header."""
    fields = line.split()
    if not 1 <= len(fields) <= 2 or not all(field.isdigit() for field in fields):
        return None
    folds, per_fold = (1, int(fields[0])) if len(fields) == 1 else map(int, fields)
    return 2 * folds * per_fold


def _first_line(path: Path) -> str:
    with open(path, errors="replace") as file:
        return next((line for line in file if line.strip()), "")


def find_lfw_images(pairs_file: Path) -> Path:
    """The LFW image folder for a pairs.txt: the file's own folder or ``lfw/`` beside it,
    whichever holds the first listed person's folder."""
    lines = pairs_file.read_text().split("\n", 2)
    first_name = lines[1].split()[0] if len(lines) > 1 and lines[1].split() else ""
    candidates = [pairs_file.parent, pairs_file.parent / "lfw"]
    for candidate in candidates:
        if (candidate / first_name).is_dir():
            return candidate
    raise DatasetError(
        f"cannot find the LFW images for {pairs_file}: no folder {first_name!r} in "
        f"{' or '.join(str(c) for c in candidates)}; give the folder explicitly, "
        f"{{format: lfw, pairs: {pairs_file}, images: /path/to/lfw}}"
    )


def read_lfw_pairs(
    pairs_file: str | Path, images: str | Path | None = None
) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Parse an LFW ``pairs.txt`` over the image folder ``images`` (found beside the file when
    None) into (distinct image paths, pair indices (P, 2), same flags (P,)), in file order."""
    pairs_file = Path(pairs_file)
    if not pairs_file.is_file():
        raise DatasetError(f"LFW pairs file {str(pairs_file)!r} does not exist")
    images = Path(images) if images is not None else find_lfw_images(pairs_file)
    lines = [line for line in pairs_file.read_text().splitlines() if line.strip()]
    expected = lfw_header(lines[0]) if lines else None
    if expected is None:
        raise DatasetError(
            f"{pairs_file}:1: expected the LFW header 'folds<TAB>pairs_per_fold' or 'pairs', "
            f"got {lines[0] if lines else ''!r}"
        )

    def image(name: str, number: str) -> Path:
        return images / name / f"{name}_{int(number):04d}.jpg"

    path_pairs, same = [], []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            path_pairs.append((image(fields[0], fields[1]), image(fields[0], fields[2])))
            same.append(True)
        elif len(fields) == 4 and fields[1].isdigit() and fields[3].isdigit():
            path_pairs.append((image(fields[0], fields[1]), image(fields[2], fields[3])))
            same.append(False)
        else:
            raise DatasetError(
                f"{pairs_file}:{number}: expected 'name i j' (same person) or "
                f"'name1 i name2 j' (different people), got {line!r}"
            )
    if len(path_pairs) != expected:
        raise DatasetError(
            f"{pairs_file} announces {expected} pairs in its header but lists "
            f"{len(path_pairs)}; the file is cut short or edited, so its folds no longer line up"
        )
    return _index_pairs(path_pairs, same, pairs_file)


class ImagePairsDataset(Dataset):
    """The distinct image files of a set of pairs, yielded as (image, image index); every file
    must be a readable image (checked here, so results stay comparable across runs)."""

    def __init__(
        self,
        name: str,
        parsed: tuple[list[Path], np.ndarray, np.ndarray],
        source: str | Path,
        transform: Callable | None = None,
    ):
        self.name = name
        self.paths, self.pairs, self.same = parsed
        problems = [(p, "missing") if not p.is_file() else (p, check_image_header(p))
                    for p in self.paths]
        problems = [(path, why) for path, why in problems if why]
        if problems:
            shown = "; ".join(f"{path} ({why})" for path, why in problems[:5])
            raise DatasetError(
                f"verification set {name!r} ({source}) names {len(problems)} unreadable "
                f"image(s): {shown}; fix or remove those pairs so results stay comparable"
            )
        self.identities = [path.parent.name for path in self.paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        # No stand-in for an image of a pair: a failure stops, naming the file.
        try:
            image = read_rgb(self.paths[index])
        except DECODE_ERRORS as error:
            raise DatasetError(
                f"verification set {self.name!r}: {self.paths[index]} has a readable header but "
                f"does not decode ({type(error).__name__}: {error}); fix or remove the pairs "
                f"that use it"
            ) from None
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, index


class PairListDataset(ImagePairsDataset):
    """The images of a ``path1 path2 same`` pair list."""

    def __init__(self, pairs_file: str | Path, name: str, transform: Callable | None = None):
        super().__init__(name, read_pair_list(pairs_file), pairs_file, transform)


class LFWPairsDataset(ImagePairsDataset):
    """The images of an LFW ``pairs.txt`` over an LFW folder (found beside it when None)."""

    def __init__(
        self,
        pairs_file: str | Path,
        name: str,
        images: str | Path | None = None,
        transform: Callable | None = None,
    ):
        super().__init__(name, read_lfw_pairs(pairs_file, images), pairs_file, transform)


def _verification_pairs(
    counts: Sequence[int], num_pairs: int, rng: np.random.Generator
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Distinct same-identity and different-identity pairs of global image indices, at most
    ``num_pairs // 2`` of each (fewer when the identities cannot give that many)."""
    counts = np.asarray(counts)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    several = np.flatnonzero(counts >= 2)
    same: dict[tuple[int, int], None] = {}
    different: dict[tuple[int, int], None] = {}
    for _ in range(20 * (num_pairs // 2)):  # bounded: small sets run out of distinct pairs
        if len(same) >= num_pairs // 2:
            break
        identity = several[rng.integers(len(several))]
        a, b = sorted(rng.choice(counts[identity], size=2, replace=False))
        same[(int(offsets[identity] + a), int(offsets[identity] + b))] = None
    for _ in range(20 * (num_pairs // 2)):
        if len(different) >= num_pairs // 2:
            break
        i, j = rng.choice(len(counts), size=2, replace=False)
        a, b = int(offsets[i] + rng.integers(counts[i])), int(offsets[j] + rng.integers(counts[j]))
        different[(min(a, b), max(a, b))] = None
    return list(same), list(different)


class HeldOutPairs(ImagePairsDataset):
    """A verification set drawn from identities held out of training, in the LFW protocol's
    order: 10 folds, each its same-identity pairs then its different-identity pairs.

    Yields each distinct image once as (image, image index), like ``PairListDataset``; ``pairs``
    (P, 2) indexes ``paths`` and ``same`` (P,) flags same-identity pairs.
    """

    def __init__(
        self,
        identities: Mapping[str, Sequence[Path]],
        num_pairs: int = 2000,
        seed: int = 0,
        name: str = "heldout",
        transform: Callable | None = None,
    ):
        groups = [list(paths) for paths in identities.values()]
        if len(groups) < 2 or max(map(len, groups), default=0) < 2:
            raise DatasetError(
                f"verification set {name!r} needs at least 2 held-out identities, one with 2 or "
                f"more images; raise data.heldout_identities or data.min_images_per_identity"
            )
        paths: list[Path] = [path for group in groups for path in group]
        rng = np.random.default_rng(seed)
        same, different = _verification_pairs([len(g) for g in groups], num_pairs, rng)
        per_fold = min(len(same), len(different)) // 10
        if per_fold == 0:
            raise DatasetError(
                f"the held-out identities give only {len(same)} distinct same-identity pairs, "
                f"fewer than the 10 needed for 10-fold verification; raise "
                f"data.heldout_identities"
            )
        if 2 * per_fold * 10 < num_pairs:
            log.warning(
                "verification set %r: %d pairs instead of data.heldout_pairs=%d (the held-out "
                "identities give no more distinct pairs)", name, 20 * per_fold, num_pairs,
            )
        folds = [
            same[k * per_fold : (k + 1) * per_fold] + different[k * per_fold : (k + 1) * per_fold]
            for k in range(10)
        ]
        pairs = np.array([pair for fold in folds for pair in fold])
        same = np.tile(np.repeat([True, False], per_fold), 10)
        super().__init__(name, (paths, pairs, same), "held-out identities", transform)


def detect_format(path: Path) -> str:
    """``bin`` for a ``.bin`` file, ``lfw`` for a text file opening with LFW's header, else
    ``pairs``."""
    if path.suffix == ".bin":
        return "bin"
    return "lfw" if path.is_file() and lfw_header(_first_line(path)) is not None else "pairs"


def open_verification_set(name: str, spec, transform: Callable | None = None) -> Dataset:
    """The verification set configured as ``data.verification.<name>``: a path (format detected
    by ``detect_format``) or a mapping ``{format: pairs|lfw|bin, path: ...}`` — for LFW
    ``{format: lfw, pairs: .../pairs.txt, images: .../lfw}`` (images optional)."""
    key = f"data.verification.{name}"
    if isinstance(spec, str | Path):
        spec = {"format": detect_format(Path(spec)), "path": str(spec)}
    if not isinstance(spec, Mapping):
        raise DatasetError(f"{key} must be a path or a mapping with 'format', got {spec!r}")
    spec = dict(spec)
    fmt = spec.pop("format", None)
    allowed = {"pairs": {"path"}, "lfw": {"path", "pairs", "images"}, "bin": {"path"}}
    if fmt not in allowed:
        raise DatasetError(f"{key}.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if set(spec) - allowed[fmt]:
        raise DatasetError(
            f"{key}: unknown key(s) {sorted(set(spec) - allowed[fmt])} for format {fmt!r}; "
            f"allowed: {sorted(allowed[fmt])}"
        )
    path = spec.get("pairs", spec.get("path"))
    if path is None:
        raise DatasetError(f"{key} needs the set's file ('{'pairs' if fmt == 'lfw' else 'path'}')")
    if not Path(path).is_file():
        raise DatasetError(
            f"{key}: {path} does not exist; fix the path or drop the set with ~{key}"
        )
    if fmt == "bin":
        return BinDataset(path, name, transform)
    if fmt == "lfw":
        return LFWPairsDataset(path, name, spec.get("images"), transform)
    return PairListDataset(path, name, transform)
