"""Identity-folder datasets: the CASIA-WebFace layout ``root/<identity>/<image>``.

A folder of hundreds of thousands of identities is scanned once (identity folders in parallel,
each image's header parsed) and the result cached as JSON; later starts re-read the cache while
the folder's fingerprint is unchanged. Which identities train (minimum images, include/exclude
lists, identities held out for verification) is decided from the cached scan, so changing those
options never rescans.
"""

import hashlib
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from torch.utils.data import Dataset

from facetrain.data.failures import LoadFailures
from facetrain.data.gpu_decode import read_encoded_file
from facetrain.data.images import (
    DECODE_ERRORS,
    IMAGE_EXTENSIONS,
    DatasetError,
    check_image_header,
    read_rgb,
)

log = logging.getLogger(__name__)

INDEX_VERSION = 1
INDEX_FILE_NAME = ".facetrain-index.json"
SCAN_WORKERS = 8  # threads: the scan waits on the file system, not on the CPU


def shown(name: str) -> str:
    """A file name safe to print: bytes that are not UTF-8 appear as ``\\xff`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _scan_identity(directory: str) -> tuple[list[str], list[tuple[str, str]], int]:
    """(readable image names sorted, (name, reason) of unreadable images, count of ignored names)
    for one identity folder."""
    readable, unreadable, ignored = [], [], 0
    with os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            if (
                name.startswith(".")  # .DS_Store, macOS ._a.jpg resource forks, editor files
                or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS
                or not entry.is_file()
            ):
                ignored += 1
                continue
            problem = check_image_header(entry.path)
            if problem is None:
                readable.append(name)
            else:
                unreadable.append((name, problem))
    return sorted(readable), sorted(unreadable), ignored


@dataclass(frozen=True)
class FolderScan:
    """Everything a scan found under a root; what the index cache stores.

    ``identities`` maps every identity folder (sorted) to its readable image names (sorted,
    possibly none); ``skipped`` lists (``identity/name``, reason) for image files that cannot be
    read; ``ignored`` counts entries that are not image files (other extensions, sub-folders,
    names starting with a dot).
    """

    identities: dict[str, list[str]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0
    cached: bool = False  # read from the index cache instead of scanning

    @property
    def num_images(self) -> int:
        return sum(len(names) for names in self.identities.values())


def _identity_folders(root: Path) -> list[os.DirEntry]:
    if not root.is_dir():
        raise DatasetError(
            f"training data root {str(root)!r} does not exist or is not a folder; point "
            f"data.train_root at a folder laid out as <root>/<identity>/<image>"
        )
    with os.scandir(root) as entries:
        folders = [e for e in entries if not e.name.startswith(".") and e.is_dir()]
    return sorted(folders, key=lambda entry: entry.name)


def folder_fingerprint(root: Path, folders: Sequence[os.DirEntry]) -> str:
    """Hash of the root's real path and each identity folder's name and modification time.

    A folder's mtime changes when a file in it is added, removed or renamed, so those changes
    (and adding, removing or renaming identity folders) invalidate the index. Rewriting an image
    in place under the same name does not: a file corrupted that way is caught when it is loaded
    (the next image is used and the file is named in a warning). Delete the cache file or set
    ``data.index_cache=null`` to force a rescan.
    """
    digest = hashlib.sha256(f"{INDEX_VERSION}\0{os.path.realpath(root)}\0".encode())
    digest.update(" ".join(sorted(IMAGE_EXTENSIONS)).encode())
    for entry in folders:
        digest.update(os.fsencode(entry.name) + b"\0%d\0" % entry.stat().st_mtime_ns)
    return digest.hexdigest()


def index_cache_path(root: Path, index_cache: str | os.PathLike | None) -> Path | None:
    """Where the index of ``root`` is cached: ``auto`` = ``<root>/.facetrain-index.json`` when the
    root is writable, else ``$XDG_CACHE_HOME/facetrain/folder-index/<hash of root>.json``
    (``~/.cache`` by default); a path = that file; None = no cache."""
    if index_cache is None or index_cache is False:
        return None
    if str(index_cache) != "auto":
        return Path(index_cache)
    if os.access(root, os.W_OK):
        return root / INDEX_FILE_NAME
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(os.fsencode(os.path.realpath(root))).hexdigest()[:20]
    return cache_home / "facetrain" / "folder-index" / f"{key}.json"


def _read_index(path: Path, fingerprint: str) -> FolderScan | None:
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("ignoring unreadable index cache %s (%s); rescanning", path, error)
        return None
    if not isinstance(stored, dict) or stored.get("fingerprint") != fingerprint:
        return None
    return FolderScan(
        identities=stored["identities"],
        skipped=[tuple(item) for item in stored["skipped"]],
        ignored=stored["ignored"],
        cached=True,
    )


def _write_index(path: Path, fingerprint: str, root: Path, scan: FolderScan) -> None:
    """Write atomically (temporary file + rename): ranks racing on the first start are safe."""
    payload = {
        "version": INDEX_VERSION,
        "root": os.path.realpath(root),
        "fingerprint": fingerprint,
        "identities": scan.identities,
        "skipped": scan.skipped,
        "ignored": scan.ignored,
    }
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # ensure_ascii: names that are not UTF-8 (surrogate escapes) are stored as \udcXX
        temporary.write_text(json.dumps(payload, ensure_ascii=True, separators=(",", ":")))
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        log.warning("could not write the index cache %s (%s); the next start rescans", path, error)


def _show_progress() -> bool:
    """A progress bar on an interactive terminal, from the first process of a job only."""
    first_rank = os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"
    return first_rank and sys.stderr.isatty()


def scan_folder(
    root: str | Path, index_cache: str | os.PathLike | None = "auto", workers: int = SCAN_WORKERS
) -> FolderScan:
    """Scan ``root/<identity>/`` (identity folders in parallel) or reuse its cached index.

    Image files (by extension) whose header PIL cannot parse are skipped with a reason: empty
    file, not an image (e.g. text named .jpg), unreadable header, or more pixels than PIL's
    decompression-bomb limit.
    """
    root = Path(root)
    folders = _identity_folders(root)
    fingerprint = folder_fingerprint(root, folders)
    cache = index_cache_path(root, index_cache)
    if cache is not None and (scan := _read_index(cache, fingerprint)) is not None:
        return scan
    identities: dict[str, list[str]] = {}
    skipped: list[tuple[str, str]] = []
    ignored = 0
    with (
        ThreadPoolExecutor(max(1, workers)) as pool,
        Progress(
            console=Console(stderr=True), transient=True, disable=not _show_progress()
        ) as progress,
    ):
        task = progress.add_task(f"scanning {root}", total=len(folders))
        results = pool.map(_scan_identity, [entry.path for entry in folders])
        for entry, (readable, unreadable, ignored_here) in zip(folders, results, strict=True):
            identities[entry.name] = readable
            skipped.extend((f"{entry.name}/{name}", why) for name, why in unreadable)
            ignored += ignored_here
            progress.advance(task)
    scan = FolderScan(identities, skipped, ignored)
    if cache is not None:
        _write_index(cache, fingerprint, root, scan)
    return scan


def read_identity_list(path: str | Path, key: str) -> set[str]:
    """Identity folder names, one per line; blank lines and ``#`` comments are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as error:
        raise DatasetError(
            f"{key}={str(path)!r} cannot be read ({error}); it must be a text file with one "
            f"identity folder name per line"
        ) from None
    lines = (line.strip() for line in text.splitlines())
    return {line for line in lines if line and not line.startswith("#")}


def _held_out(names: Sequence[str], heldout: float, seed: int) -> set[str]:
    """``heldout`` identities (a count, or a fraction of ``names`` when below 1), seeded."""
    count = round(heldout * len(names)) if 0 < heldout < 1 else int(heldout)
    if count == 0:
        return set()
    if count < 2 or count > len(names) - 1:
        raise DatasetError(
            f"data.heldout_identities={heldout} gives {count} held-out identities out of "
            f"{len(names)}; it must leave at least 2 for verification and 1 for training"
        )
    chosen = np.random.default_rng(seed).choice(len(names), size=count, replace=False)
    return {names[i] for i in chosen}


def select_identities(
    scan: FolderScan,
    min_images: int = 1,
    include: str | Path | None = None,
    exclude: str | Path | None = None,
) -> tuple[list[str], Counter[str], list[str]]:
    """(kept identity names in order, count of dropped identities by reason, names of the
    identities without a readable image)."""
    if min_images < 1:
        raise DatasetError(f"data.min_images_per_identity must be at least 1, got {min_images}")
    dropped: Counter[str] = Counter()
    names = list(scan.identities)
    if include is not None:
        wanted = read_identity_list(include, "data.include_identities")
        missing = sorted(wanted.difference(names))
        if missing:
            log.warning(
                "%d identities in %s are not folders under the training root: %s%s",
                len(missing), include, ", ".join(map(shown, missing[:10])),
                " ..." if len(missing) > 10 else "",
            )
        dropped["not in the include list"] = len(names) - (len(wanted) - len(missing))
        names = [name for name in names if name in wanted]
    if exclude is not None:
        unwanted = read_identity_list(exclude, "data.exclude_identities")
        dropped["in the exclude list"] = len(unwanted.intersection(names))
        names = [name for name in names if name not in unwanted]
    empty = [name for name in names if not scan.identities[name]]
    dropped["without a readable image"] = len(empty)
    kept = [name for name in names if len(scan.identities[name]) >= min_images]
    dropped[f"with fewer than {min_images} images"] = len(names) - len(empty) - len(kept)
    return kept, dropped, empty


def _warn_with_examples(what: str, items: Sequence[str], limit: int = 5) -> None:
    if items:
        more = " ..." if len(items) > limit else ""
        log.warning("skipped %d %s: %s%s", len(items), what, "; ".join(items[:limit]), more)


class IdentityFolderDataset(Dataset):
    """Images of ``root/<identity>/`` labelled by the index of the identity in sorted order.

    Identities are kept when they hold at least ``min_images_per_identity`` readable images,
    appear in ``include_identities`` (a file of names; None = all) and not in
    ``exclude_identities``; ``heldout_identities`` of the kept ones (a count, or a fraction when
    below 1; chosen with ``heldout_seed``) are moved out of training into ``heldout``
    (identity → image paths) for a verification set. One log line reports the counts.

    An image that passed the header check but fails to decode when loaded (e.g. a truncated
    JPEG body) is replaced by the next sample, with its own label, named in a warning and
    recorded in ``load_failures`` (shared with the DataLoader workers).

    With ``encoded`` (``data.decode=gpu``) the image is not decoded here: the transform gets
    its JPEG bytes (``gpu_decode.read_encoded``) for the training device to decode.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None = None,
        *,
        min_images_per_identity: int = 1,
        include_identities: str | Path | None = None,
        exclude_identities: str | Path | None = None,
        heldout_identities: float = 0,
        heldout_seed: int = 0,
        index_cache: str | os.PathLike | None = "auto",
        scan_workers: int = SCAN_WORKERS,
        encoded: bool = False,
    ):
        self.root = Path(root)
        self.transform = transform
        self.encoded = encoded
        self.load_failures = LoadFailures()  # made here, before any worker starts
        scan = scan_folder(self.root, index_cache, scan_workers)
        names, dropped, empty = select_identities(
            scan, min_images_per_identity, include_identities, exclude_identities
        )
        heldout = _held_out(names, heldout_identities, heldout_seed)

        root_bytes = os.fsencode(self.root)
        self.heldout: dict[str, list[Path]] = {
            name: [self.root / name / image for image in scan.identities[name]]
            for name in names if name in heldout
        }
        self.classes = [name for name in names if name not in heldout]
        files = [
            root_bytes + b"/" + os.fsencode(name) + b"/" + os.fsencode(image)
            for name in self.classes for image in scan.identities[name]
        ]
        if not files:
            raise DatasetError(
                f"no readable images found under {str(self.root)!r} (dropped identities: "
                f"{self._dropped(dropped)}); expected <root>/<identity>/<image> with images "
                f"of type {'/'.join(sorted(IMAGE_EXTENSIONS))}"
            )
        # One bytes array, not a list of Path objects: DataLoader workers read it without
        # touching Python reference counts (no copy-on-write of a million small objects), and
        # names that are not UTF-8 stay exact.
        self._files = np.array(files)
        self.labels = np.repeat(
            np.arange(len(self.classes)), [len(scan.identities[n]) for n in self.classes]
        )
        self._report(scan, dropped, empty)

    @staticmethod
    def _dropped(dropped: Mapping[str, int]) -> str:
        return ", ".join(f"{count} {why}" for why, count in dropped.items() if count) or "none"

    def _report(self, scan: FolderScan, dropped: Counter, empty: Sequence[str]) -> None:
        reasons = Counter(why for _, why in scan.skipped)
        log.info(
            "%s %s: %d identities, %d images; skipped %d image files (%s), ignored %d other "
            "entries; dropped identities: %s%s",
            "index of" if scan.cached else "scanned", self.root, len(self.classes), len(self),
            len(scan.skipped), ", ".join(f"{n} {why}" for why, n in reasons.items()) or "none",
            scan.ignored, self._dropped(dropped),
            f"; held out {len(self.heldout)} identities "
            f"({sum(map(len, self.heldout.values()))} images) for verification"
            if self.heldout else "",
        )
        _warn_with_examples(
            f"unreadable image file(s) under {self.root}",
            [f"{self.root}/{shown(path)} ({why})" for path, why in scan.skipped],
        )
        _warn_with_examples(
            f"identity folder(s) without a readable image under {self.root}",
            [shown(name) for name in empty], limit=10,
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def path(self, index: int) -> Path:
        return Path(os.fsdecode(self._files[index]))

    def __len__(self) -> int:
        return len(self._files)

    def sample_name(self, index: int) -> str:
        """The file of sample ``index``, as a warning names it."""
        return shown(str(self.path(index)))

    @property
    def failed_loads(self) -> Counter[Path]:
        """Files that failed to decode in any process (the first ``LoadFailures.keep``
        failures), with how often each failed."""
        return Counter(self.path(i) for i in self.load_failures.run()[1])

    def __getitem__(self, index: int):
        for attempt in range(len(self._files)):
            sample = (index + attempt) % len(self._files)
            try:
                path = self._files[sample]
                image = read_encoded_file(path, sample) if self.encoded else read_rgb(path)
            except DECODE_ERRORS as error:
                self.load_failures.add(sample)
                log.warning(
                    "could not decode %s (%s); using the next image instead",
                    self.sample_name(sample), error,
                )
                continue
            if self.transform is not None:
                image = self.transform(image=image)["image"]
            return image, int(self.labels[sample])
        raise DatasetError(f"no image under {self.root} could be decoded")


def scan_identity_folder(root: str | Path, **options) -> tuple[list[str], list[tuple[Path, int]]]:
    """(classes, [(image path, label)]) of an identity folder; ``options`` as for
    ``IdentityFolderDataset``."""
    dataset = IdentityFolderDataset(root, **options)
    return dataset.classes, [(dataset.path(i), int(y)) for i, y in enumerate(dataset.labels)]
