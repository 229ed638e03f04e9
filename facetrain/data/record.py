"""insightface RecordIO packs (``train.rec`` + ``train.idx`` + ``property``), read without mxnet
(``facetrain.data.writers`` writes them).

Framing (dmlc-core ``recordio.cc``): a record is uint32 magic 0xCED7230A, uint32 ``lrec``
(``cflag = lrec >> 29``, ``length = lrec & (2**29 - 1)``), the payload, zero padding to 4 bytes.
Where the magic word occurs in a payload at a 4-byte aligned offset the writer cuts the payload
there and drops the word (parts flagged 1 start, 2 middle, 3 end; 0 is a whole record); the
reader puts it back. ``.idx`` is text, one ``key<TAB>offset`` line per record.

Payload (``mxnet.recordio.pack``): the IRHeader struct ``<IfQQ`` (flag, label, id, id2); when
flag > 0 the label is instead the ``flag`` float32 values after the header. The encoded image
follows.

insightface layout (arcface_torch ``MXFaceDataset``): record 0 is a header without an image whose
label is (first identity key, end of identity keys); images are keys 1 .. first-1; identity k's
record, key first+k, holds the (start, end) range of its image keys. ``property`` is the text
``num_classes,height,width``. Packs without the header record (plain im2rec lists) read each
record's own label.
"""

import logging
import os
import struct
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from torch.utils.data import Dataset

from facetrain.data.failures import LoadFailures
from facetrain.data.gpu_decode import read_encoded
from facetrain.data.images import DECODE_ERRORS, DatasetError, decode_rgb

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_BITS = 29
MAX_LENGTH = (1 << LENGTH_BITS) - 1
IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
REINDEX_HINT = "rebuild the index with `facetrain-pack --reindex {rec}` or re-copy the pack"


# --- framing ------------------------------------------------------------------------------------


def read_record(file: BinaryIO, offset: int, rec_path: Path, limit: int | None = None) -> bytes:
    """The payload of the record at ``offset``, joined from its parts; only its first ``limit``
    bytes (or a little more) when ``limit`` is given."""
    file.seek(offset)
    parts: list[bytes] = []
    size = 0
    while True:
        head = file.read(8)
        if len(head) < 8:
            raise DatasetError(
                f"{rec_path} ends inside the record at offset {offset}: the file is truncated; "
                f"re-copy the pack"
            )
        magic, lrec = struct.unpack("<II", head)
        cflag, length = lrec >> LENGTH_BITS, lrec & MAX_LENGTH
        if magic != MAGIC or (not parts and cflag not in (0, 1)) or (parts and cflag not in (2, 3)):
            raise DatasetError(
                f"no RecordIO record starts at offset {offset} of {rec_path} (its .idx does not "
                f"match the .rec); {REINDEX_HINT.format(rec=rec_path)}"
            )
        wanted = length if limit is None else min(length, max(limit - size, 0))
        data = file.read(wanted)
        if len(data) < wanted:
            raise DatasetError(
                f"{rec_path} ends inside the record at offset {offset}: the file is truncated; "
                f"re-copy the pack"
            )
        parts.append(data)
        size += wanted
        if cflag in (0, 3) or (limit is not None and size >= limit):
            return b"".join(parts)
        file.seek(length - wanted + (-length % 4), os.SEEK_CUR)
        parts.append(MAGIC_BYTES)
        size += 4


def scan_records(rec_path: Path) -> Iterable[tuple[int, bytes]]:
    """(offset, payload) of every record in file order, by walking the framing from the start."""
    with open(rec_path, "rb") as file:
        offset, size = 0, os.fstat(file.fileno()).st_size
        while offset < size:
            payload = read_record(file, offset, rec_path)
            yield offset, payload
            offset = file.tell() + (-file.tell() % 4)


# --- image-record payloads ----------------------------------------------------------------------


def unpack_payload(payload: bytes) -> tuple[np.ndarray, int, bytes]:
    """(label values, id, image bytes) of a payload; a scalar label comes back as one value."""
    if len(payload) < IR_HEADER.size:
        raise ValueError(f"a record of {len(payload)} bytes is shorter than the IRHeader")
    flag, label, key, _ = IR_HEADER.unpack_from(payload)
    if flag == 0:
        return np.array([label], dtype=np.float32), key, payload[IR_HEADER.size :]
    end = IR_HEADER.size + 4 * flag
    return np.frombuffer(payload[IR_HEADER.size : end], "<f4"), key, payload[end:]


# --- locating and indexing a pack -----------------------------------------------------------------


def is_record_pack(path: str | Path) -> bool:
    """True for a ``.rec`` file or a folder holding ``train.rec``."""
    path = Path(path)
    return path.suffix == ".rec" or (path / "train.rec").is_file()


def pack_files(path: str | Path) -> tuple[Path, Path]:
    """(``.rec``, ``.idx``) of a pack given as its folder or its ``.rec`` file."""
    path = Path(path)
    rec = path if path.suffix == ".rec" else path / "train.rec"
    if not rec.is_file():
        raise DatasetError(
            f"RecordIO pack {str(rec)!r} does not exist; point data.train_root at a folder with "
            f"train.rec + train.idx or at a .rec file"
        )
    idx = rec.with_suffix(".idx")
    if not idx.is_file():
        raise DatasetError(
            f"RecordIO pack {rec} has no index {idx.name} beside it; "
            f"{REINDEX_HINT.format(rec=rec)}"
        )
    return rec, idx


class RecordIndex:
    """Record keys (sorted) and their byte offsets in the ``.rec``, held as two numpy arrays: a
    pack of millions of records costs 16 bytes per record and no Python objects, which forked
    DataLoader workers would otherwise copy as they touch them."""

    def __init__(self, keys: np.ndarray, offsets: np.ndarray):
        order = np.argsort(keys, kind="stable")
        self.keys, self.offsets = keys[order], offsets[order]

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        position = np.searchsorted(self.keys, key)
        return bool(position < len(self.keys) and self.keys[position] == key)

    def __getitem__(self, key: int) -> int:
        position = np.searchsorted(self.keys, key)
        if position == len(self.keys) or self.keys[position] != key:
            raise KeyError(key)
        return int(self.offsets[position])


def _index_table(idx_path: Path, rec_path: Path) -> np.ndarray:
    """The (key, offset) rows of a ``.idx``; a malformed line is reported by number."""
    text = idx_path.read_text()
    rows = text.count("\n") + (not text.endswith("\n"))
    if text.count("\t") == rows:  # mxnet's own layout: parse in C (MS1MV2: 5.8M lines in ~1 s)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns, not raises, on a token it cannot parse
            try:
                table = np.fromstring(text, dtype=np.int64, sep=" ")
            except (DeprecationWarning, ValueError):
                table = np.empty(0, dtype=np.int64)
        if table.size == 2 * rows:
            return table.reshape(-1, 2)
    rows_found = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if fields and len(fields) == 2 and all(f.lstrip("-").isdigit() for f in fields):
            rows_found.append([int(fields[0]), int(fields[1])])
        elif fields:
            raise DatasetError(
                f"{idx_path}:{number}: expected 'key<TAB>offset', got {line!r}; "
                f"{REINDEX_HINT.format(rec=rec_path)}"
            )
    return np.array(rows_found, dtype=np.int64).reshape(-1, 2)


def read_index(idx_path: Path, rec_path: Path) -> RecordIndex:
    """The ``.idx`` of ``rec_path``, checked against it (range, alignment, and the magic word at
    a spread of offsets) so a stale or foreign index fails here, not mid-epoch."""
    table = _index_table(idx_path, rec_path)
    if not len(table):
        raise DatasetError(f"{idx_path} lists no records; {REINDEX_HINT.format(rec=rec_path)}")
    keys, offsets = table[:, 0], table[:, 1]
    rec_size = rec_path.stat().st_size
    bad = np.flatnonzero((offsets % 4 != 0) | (offsets < 0) | (offsets >= rec_size))
    if len(bad):
        key, offset = keys[bad[0]], offsets[bad[0]]
        raise DatasetError(
            f"{idx_path} puts record {key} at offset {offset}, but {rec_path} is {rec_size} "
            f"bytes with records at multiples of 4: the .rec is truncated or the .idx belongs "
            f"to another pack; {REINDEX_HINT.format(rec=rec_path)}"
        )
    ordered = np.sort(offsets)
    spread = np.unique(np.linspace(0, len(ordered) - 1, min(len(ordered), 64)).astype(int))
    with open(rec_path, "rb") as file:
        for position in spread:
            read_record(file, int(ordered[position]), rec_path, limit=0)
        read_record(file, int(ordered[-1]), rec_path)  # the last record is whole: not truncated
    return RecordIndex(keys, offsets)


# --- the dataset --------------------------------------------------------------------------------


class RecordDataset(Dataset):
    """The images of an insightface RecordIO pack, labelled by identity, read at random through
    the ``.idx``. Each process (DataLoader worker) opens its own handle to the ``.rec``.

    Labels come from the identity records (one small read per identity, not per image) when the
    pack has insightface's header record, else from each image record. A record whose image does
    not decode is replaced by the next one and recorded in ``load_failures`` (shared with the
    DataLoader workers), as in ``IdentityFolderDataset``.

    With ``encoded`` (``data.decode=gpu``) the image is not decoded here: the transform gets
    its JPEG bytes (``gpu_decode.read_encoded``) for the training device to decode.
    """

    def __init__(self, path: str | Path, transform: Callable | None = None,
                 encoded: bool = False):
        self.rec_path, self.idx_path = pack_files(path)
        self.transform = transform
        self.encoded = encoded
        self.load_failures = LoadFailures()  # made here, before any worker starts
        self._index = read_index(self.idx_path, self.rec_path)
        self._file: BinaryIO | None = None
        self._opened_by: int | None = None
        with open(self.rec_path, "rb") as file:
            self.keys, self.labels, self.num_classes = self._read_labels(file)
        if not len(self.keys):
            raise DatasetError(f"RecordIO pack {self.rec_path} holds no image records")
        self._check_property()
        log.info(
            "opened %s: %d identities, %d images", self.rec_path, self.num_classes, len(self.keys)
        )

    def _head(self, file: BinaryIO, key: int) -> tuple[np.ndarray, int, bytes]:
        if key not in self._index:
            raise DatasetError(
                f"{self.idx_path} has no record {key}, which the pack's header refers to; "
                f"{REINDEX_HINT.format(rec=self.rec_path)}"
            )
        return unpack_payload(read_record(file, self._index[key], self.rec_path, limit=2048))

    def _read_labels(self, file: BinaryIO) -> tuple[np.ndarray, np.ndarray, int]:
        header = self._head(file, 0) if 0 in self._index else None
        if header is None or len(header[0]) < 2 or header[2]:  # no header record: a plain list
            keys = self._index.keys
            labels = np.array(
                [int(self._head(file, int(key))[0][0]) for key in keys], dtype=np.int64
            )
            if labels.min() < 0:
                raise DatasetError(f"{self.rec_path} has records with negative labels")
            return keys, labels, int(labels.max()) + 1
        first, end = int(header[0][0]), int(header[0][1])
        keys = np.arange(1, first, dtype=np.int64)
        missing = keys[~np.isin(keys, self._index.keys)]
        if len(missing):
            raise DatasetError(
                f"{self.idx_path} lacks {len(missing)} of the image records 1..{first - 1} that "
                f"the pack's header announces (first: {missing[0]}); "
                f"{REINDEX_HINT.format(rec=self.rec_path)}"
            )
        labels = np.full(len(keys), -1, dtype=np.int64)
        for identity, key in enumerate(range(first, end)):
            start, stop = (int(v) for v in self._head(file, key)[0][:2])
            if not 1 <= start <= stop <= first or (labels[start - 1 : stop - 1] >= 0).any():
                raise DatasetError(
                    f"{self.rec_path}: identity record {key} claims images [{start}, {stop}), "
                    f"outside [1, {first}) or overlapping another identity; the pack is damaged"
                )
            labels[start - 1 : stop - 1] = identity
        if (labels < 0).any():
            missing = int(keys[labels < 0][0])
            raise DatasetError(
                f"{self.rec_path}: image record {missing} belongs to no identity record; "
                f"the pack is damaged"
            )
        return keys, labels, end - first

    def _check_property(self) -> None:
        """``property`` is informational (insightface reads num_classes from its own config);
        a disagreement is worth a warning, not a refusal."""
        prop = self.rec_path.parent / "property"
        if not prop.is_file():
            return
        fields = prop.read_text().strip().split(",")
        if not fields[0].strip().isdigit() or int(fields[0]) != self.num_classes:
            log.warning(
                "%s says %r but the records of %s hold %d identities; using the records",
                prop, prop.read_text().strip(), self.rec_path, self.num_classes,
            )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_file=None, _opened_by=None)  # an open file does not cross processes
        return state

    def _handle(self) -> BinaryIO:
        # A forked worker inherits the parent's handle, whose file position is shared: reopen.
        if self._opened_by != os.getpid():
            self._file, self._opened_by = open(self.rec_path, "rb"), os.getpid()  # noqa: SIM115
        return self._file

    def __len__(self) -> int:
        return len(self.keys)

    def sample_name(self, index: int) -> str:
        """The record of sample ``index``, as a warning names it."""
        return f"record {int(self.keys[index])} of {self.rec_path}"

    @property
    def failed_loads(self) -> Counter[int]:
        """Record keys that failed to decode in any process (the first ``LoadFailures.keep``
        failures), with how often each failed."""
        return Counter(int(self.keys[i]) for i in self.load_failures.run()[1])

    def __getitem__(self, index: int):
        for attempt in range(len(self.keys)):
            position = (index + attempt) % len(self.keys)
            key = int(self.keys[position])
            label_values, _, data = unpack_payload(
                read_record(self._handle(), self._index[key], self.rec_path)
            )
            label = int(label_values[0])
            if label != self.labels[position]:
                raise DatasetError(
                    f"{self.rec_path}: image record {key} is labelled {label} but its identity "
                    f"record says {self.labels[position]}; the pack is damaged"
                )
            try:
                image = read_encoded(data, position) if self.encoded else decode_rgb(data)
            except DECODE_ERRORS as error:
                self.load_failures.add(position)
                log.warning(
                    "could not decode record %d of %s (%s); using the next image instead",
                    key, self.rec_path, error,
                )
                continue
            if self.transform is not None:
                image = self.transform(image=image)["image"]
            return image, label
        raise DatasetError(f"no image in {self.rec_path} could be decoded")
