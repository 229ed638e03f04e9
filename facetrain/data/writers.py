"""Writing insightface-format data without mxnet: RecordIO training packs from an identity folder,
their ``.idx``, and verification ``.bin`` files from a pair list or LFW ``pairs.txt``.

The formats are described where they are read (``facetrain.data.record``,
``facetrain.data.binset``); the writers import the readers, never the reverse.
"""

import io
import logging
import os
import pickle
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from facetrain.data.folder import scan_identity_folder
from facetrain.data.images import DatasetError
from facetrain.data.pairs import open_verification_set
from facetrain.data.record import (
    IR_HEADER,
    LENGTH_BITS,
    MAGIC,
    MAGIC_BYTES,
    MAX_LENGTH,
    scan_records,
    unpack_payload,
)

log = logging.getLogger(__name__)


# --- RecordIO packs ------------------------------------------------------------------------------


def _frame(cflag: int, part: bytes) -> bytes:
    return struct.pack("<II", MAGIC, (cflag << LENGTH_BITS) | len(part)) + part


def encode_record(payload: bytes) -> bytes:
    """One record, framed as dmlc's RecordIOWriter writes it (split at aligned magic words)."""
    if len(payload) > MAX_LENGTH:
        raise ValueError(f"a RecordIO record holds at most {MAX_LENGTH} bytes, got {len(payload)}")
    parts, start = [], 0
    for cut in range(0, len(payload) - 3, 4):
        if payload[cut : cut + 4] == MAGIC_BYTES:
            parts.append(_frame(1 if start == 0 else 2, payload[start:cut]))
            start = cut + 4
    parts.append(_frame(3 if start else 0, payload[start:]))
    return b"".join(parts) + b"\0" * (-len(payload) % 4)


def pack_payload(key: int, label: float | Iterable[float], image: bytes = b"") -> bytes:
    """IRHeader + optional float32 label vector + image bytes (``mxnet.recordio.pack``)."""
    if isinstance(label, int | float):
        return IR_HEADER.pack(0, float(label), key, 0) + image
    values = np.asarray(list(label), dtype="<f4")
    return IR_HEADER.pack(values.size, 0.0, key, 0) + values.tobytes() + image


def write_index(rec_path: str | Path) -> Path:
    """Rebuild ``.idx`` beside ``rec_path`` by walking the framing; keys are the IRHeader ids
    (which insightface's and mxnet's packers set to the record keys)."""
    rec_path = Path(rec_path)
    idx_path = rec_path.with_suffix(".idx")
    lines = [
        f"{unpack_payload(payload)[1]}\t{offset}\n" for offset, payload in scan_records(rec_path)
    ]
    _write_atomic(idx_path, "".join(lines).encode())
    return idx_path


def _write_atomic(path: Path, data: bytes) -> None:
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_bytes(data)
    staging.replace(path)


def encoded_image(path: Path, quality: int = 95) -> tuple[bytes, tuple[int, int]]:
    """The bytes to pack for an image file and its (height, width): a JPEG's own bytes (no
    second lossy pass), anything else re-encoded as JPEG at ``quality``."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        size = (image.height, image.width)
        if image.format == "JPEG":
            return data, size
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue(), size


def pack_identity_folder(root: str | Path, output_dir: str | Path, quality: int = 95) -> Path:
    """Pack ``root/<identity>/<image>`` into ``output_dir/train.rec``, ``train.idx`` and
    ``property`` in insightface's layout (header record 0, images 1..N, identity records after)."""
    classes, samples = scan_identity_folder(root)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rec_path = output_dir / "train.rec"
    first = len(samples) + 1
    ranges: list[list[int]] = [[0, 0] for _ in classes]
    staging = rec_path.with_name(f".{rec_path.name}.tmp-{os.getpid()}")
    index_lines = []
    size = None
    with open(staging, "wb") as rec:

        def write(key: int, payload: bytes) -> None:
            index_lines.append(f"{key}\t{rec.tell()}\n")
            rec.write(encode_record(payload))

        write(0, pack_payload(0, [first, first + len(classes)]))
        for key, (path, label) in enumerate(samples, start=1):
            data, image_size = encoded_image(path, quality)
            size = size or image_size
            ranges[label] = [ranges[label][0] or key, key + 1]
            write(key, pack_payload(key, float(label), data))
        for identity, (start, stop) in enumerate(ranges):
            write(first + identity, pack_payload(first + identity, [start, stop]))
    staging.replace(rec_path)
    _write_atomic(rec_path.with_suffix(".idx"), "".join(index_lines).encode())
    (output_dir / "property").write_text(f"{len(classes)},{size[0]},{size[1]}\n")
    log.info("packed %d images of %d identities into %s", len(samples), len(classes), rec_path)
    return rec_path


# --- verification .bin files ---------------------------------------------------------------------


def write_bin(path: str | Path, images: Sequence[bytes | np.ndarray], same: Sequence[bool]) -> Path:
    """Write ``(list(images), list(same))`` as insightface does; pair i is images 2i, 2i+1."""
    if len(images) != 2 * len(same):
        raise ValueError(f"{len(images)} images for {len(same)} pairs; need 2 per pair")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = ([bytes(i) if isinstance(i, bytes | bytearray) else i for i in images],
               [bool(s) for s in same])
    path.write_bytes(pickle.dumps(payload, protocol=4))
    return path


def write_bin_from_set(spec: str | Path, output: str | Path) -> Path:
    """Convert a pair list or LFW ``pairs.txt`` (anything ``open_verification_set`` reads from
    image files) into a ``.bin``, storing each image file's own bytes."""
    dataset = open_verification_set(Path(output).stem, str(spec))
    if not hasattr(dataset, "paths"):
        raise DatasetError(f"{spec} is already a .bin; nothing to convert")
    images = [dataset.paths[index].read_bytes() for pair in dataset.pairs for index in pair]
    return write_bin(output, images, dataset.same)
