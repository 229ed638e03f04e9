"""The GPU input pipeline (``data.decode=gpu``): DataLoader workers only read each training
image's JPEG bytes and draw its augmentation; the training device decodes the batch in one
batched ``torchvision.io.decode_jpeg`` call (nvJPEG on CUDA), resizes, augments and normalises
it, for step rates that CPU workers decoding with PIL cannot keep up with (arcface_torch uses
NVIDIA DALI for this).

The result is the CPU path's (``facetrain.data.transforms``): on the CPU device libjpeg-turbo
decodes to PIL's pixels (PIL decodes with libjpeg-turbo too); the resize is bilinear on the
half-pixel grid as albumentations' ``INTER_LINEAR``; each augmentation rounds to uint8 as
albumentations' uint8 operations do; normalisation is the float32 arithmetic of
``A.Normalize``'s lookup table. nvJPEG (CUDA) is not bit-identical to libjpeg-turbo (its IDCT
and chroma upsampling differ): torchvision's own tests bound the mean difference by 2 grey
levels, as tests/test_gpu_decode.py does on a GPU. Images the device decoder would not decode as
PIL does (PNG, CMYK, 12-bit, lossless or arithmetic-coded JPEG, a JPEG without its end marker)
are decoded by the worker as on the CPU path and only moved; a stream that passes that check
but fails on the device is replaced by another image of its batch and counted as a load failure.

The device runs the augmentations of ``configs/data/augmentation/default.yaml`` (and ToGray):
``HorizontalFlip``, ``ColorJitter``, ``ToGray``; a pipeline with any other is refused.
"""

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from facetrain.data.images import DatasetError, decode_rgb

DECODE_CHOICES = ("cpu", "gpu")
JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
# Frame markers SOF0..SOF15 (0xC4 DHT, 0xC8 JPG and 0xCC DAC are not frames); the device takes
# SOF0 baseline, SOF1 extended and SOF2 progressive Huffman coding (no lossless or arithmetic).
START_OF_FRAME = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
DEVICE_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
START_OF_SCAN = 0xDA
STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0..7: markers without a length
# torchvision 0.29 deprecates its image codecs for TorchCodec; decode_jpeg still is the batched
# nvJPEG decoder this pipeline is built on.
_CODEC_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"
# cv2.cvtColor(RGB2GRAY) of uint8 in 15-bit fixed point (0.299, 0.587, 0.114 x 2**15): the grey
# level albumentations' ColorJitter and ToGray compute, to the level.
GRAY_WEIGHTS, GRAY_SHIFT = (9798.0, 19235.0, 3735.0), 15


class EncodedImage(NamedTuple):
    """One training sample as a worker hands it over: ``data`` is the JPEG stream (1-D uint8)
    or, for an image the device decoder does not take, the decoded (3, H, W) uint8 image;
    ``position`` its dataset index; ``params`` its augmentation draw (``DevicePipeline``)."""

    data: torch.Tensor
    position: int
    params: torch.Tensor | None = None


def _jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(frame marker, sample precision, components) of a JPEG's frame header, found by walking
    its marker segments from the start; None where that walk fails (then PIL decides)."""
    position = 2
    while position + 10 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker in STANDALONE:
            position += 2
        elif marker in START_OF_FRAME:
            return marker, data[position + 4], data[position + 9]
        elif marker == START_OF_SCAN:
            return None
        else:
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None


def _device_decodable(data: bytes) -> bool:
    """A JPEG that libjpeg-turbo and nvJPEG decode to PIL's RGB: 8-bit Huffman-coded baseline,
    extended or progressive, grey or colour (not CMYK), ending in its end-of-image marker (PIL
    refuses a truncated stream; libjpeg would pad it)."""
    if not data.startswith(JPEG_START) or not data.rstrip(b"\0").endswith(JPEG_END):
        return False
    frame = _jpeg_frame(data)
    return frame is not None and frame[0] in DEVICE_FRAMES and frame[1] == 8 and frame[2] in (1, 3)


def read_encoded(data: bytes, position: int) -> EncodedImage:
    """``data`` (an encoded image) as the device pipeline takes it. Raises what ``decode_rgb``
    raises for an image that does not decode (``DECODE_ERRORS``), so the readers replace it by
    the next one as on the CPU path."""
    if _device_decodable(data):
        return EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), position)
    return EncodedImage(torch.from_numpy(decode_rgb(data).transpose(2, 0, 1).copy()), position)


def read_encoded_file(path: str | bytes, position: int) -> EncodedImage:
    with open(path, "rb") as file:
        return read_encoded(file.read(), position)


@dataclass
class EncodedBatch:
    """A training batch of ``data.decode=gpu`` before the device decodes it. The JPEG streams
    travel end to end in one tensor: a worker hands each tensor over through its own shared
    memory segment, one per batch is cheap, one per image is not."""

    streams: torch.Tensor  # the batch's JPEG streams, end to end (1-D uint8)
    spans: list[tuple[int, int] | None]  # sample i's stream: streams[start:end]; None: decoded
    decoded: dict[int, torch.Tensor]  # sample -> its (3, H, W) uint8 image, decoded by the worker
    params: torch.Tensor  # (B, parameters of the augmentations) float32
    positions: torch.Tensor  # (B,) int64 dataset indices
    labels: torch.Tensor  # (B,) int64

    @property
    def images(self) -> list[torch.Tensor]:
        """Per sample, its JPEG stream (a view) or its decoded image."""
        return [self.decoded[i] if span is None else self.streams[span[0] : span[1]]
                for i, span in enumerate(self.spans)]

    def pin_memory(self) -> "EncodedBatch":
        return self  # decode_jpeg reads the streams from pageable memory and copies them itself

    def __len__(self) -> int:
        return len(self.spans)


def collate_encoded(samples: Sequence[tuple[EncodedImage, int]]) -> EncodedBatch:
    """The DataLoader's ``collate_fn`` for ``data.decode=gpu``."""
    images, labels = zip(*samples, strict=True)
    spans, decoded, streams, end = [], {}, [], 0
    for i, image in enumerate(images):
        if image.data.dim() == 1:
            streams.append(image.data)
            spans.append((end, end + len(image.data)))
            end += len(image.data)
        else:
            spans.append(None)
            decoded[i] = image.data
    params = [image.params if image.params is not None else torch.zeros(0) for image in images]
    return EncodedBatch(
        streams=torch.cat(streams) if streams else torch.zeros(0, dtype=torch.uint8),
        spans=spans,
        decoded=decoded,
        params=torch.stack(params),
        positions=torch.tensor([image.position for image in images], dtype=torch.int64),
        labels=torch.tensor(labels, dtype=torch.int64),
    )


# --- augmentations on the device --------------------------------------------------------------
# Each draws its parameters per sample on the host (the worker, seeded per sample as the CPU
# path's albumentations are: resumable, independent of the worker) and applies them to a
# (B, 3, H, W) float batch of integral levels 0..255 with torch.where (no host synchronisation).


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) grey levels of (B, 3, H, W) levels, as OpenCV rounds them (exact in
    float32: the sums stay below 2**24)."""
    r, g, b = x.unbind(1)
    weighted = r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]
    return torch.floor((weighted + 2 ** (GRAY_SHIFT - 1)) / 2**GRAY_SHIFT).unsqueeze(1)


def _levels(x: torch.Tensor, floor: bool = False) -> torch.Tensor:
    """Back to uint8 levels: albucore's lookup tables truncate, OpenCV's arithmetic rounds."""
    x = x.clamp(0, 255)
    return torch.floor(x) if floor else torch.round(x)


def adjust_affine(x: torch.Tensor, operation: torch.Tensor, factor: torch.Tensor
                  ) -> torch.Tensor:
    """Per sample, brightness (``operation`` 0: x f), contrast (1: x f + mean grey (1 - f)) or
    saturation (2: x f + grey (1 - f)) by ``factor``, as albumentations computes them on uint8;
    any other operation leaves the sample as it is. One pass for the three: x a + grey b + c."""
    brightness, contrast, saturation = (operation == k for k in range(3))
    gray = _gray(x)
    scale = torch.where(brightness | contrast | saturation, factor, 1)
    gray_weight = torch.where(saturation, 1 - factor, 0)
    offset = torch.where(contrast, 1 - factor, 0) * gray.mean(dim=(1, 2, 3))
    y = x * _per_sample(scale) + gray * _per_sample(gray_weight) + _per_sample(offset)
    return torch.where(_per_sample(saturation), _levels(y), _levels(y, floor=True))


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``factor`` of a turn (RGB -> HSV -> RGB, in float; OpenCV's uint8 HSV
    quantises the hue to 2 degrees)."""
    rgb = x / 255
    r, g, b = rgb.unbind(1)
    value, _ = rgb.max(dim=1)
    delta = value - rgb.min(dim=1).values
    saturation = delta / torch.where(value > 0, value, 1)
    safe = torch.where(delta > 0, delta, 1)
    hue = torch.where(value == r, (g - b) / safe,
                      torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(delta > 0, hue / 6, 0)
    hue = torch.remainder(hue + factor.view(-1, 1, 1), 1) * 6
    sector = torch.floor(hue)
    fraction = hue - sector
    p = value * (1 - saturation)
    q = value * (1 - saturation * fraction)
    t = value * (1 - saturation * (1 - fraction))
    sector = sector.long().remainder(6).unsqueeze(1)
    channels = [torch.stack(c, dim=1) for c in ((value, q, p, p, t, value),
                                                (t, value, value, q, p, p),
                                                (p, p, t, value, value, q))]
    out = torch.cat([c.gather(1, sector) for c in channels], dim=1)
    return _levels(out * 255)


class _Op:
    """One augmentation: ``size`` parameters per sample, drawn by ``draw`` and applied by
    ``apply``."""

    size = 1

    def __init__(self, transform: A.BasicTransform):
        self.p = float(transform.p)

    def draw(self, rng: np.random.Generator) -> list[float]:
        return [float(rng.random() < self.p)]


class _HorizontalFlip(_Op):
    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return torch.where(_per_sample(params[:, 0]) > 0, x.flip(-1), x)


class _ToGray(_Op):
    def __init__(self, transform: A.ToGray):
        super().__init__(transform)
        if transform.method != "weighted_average" or transform.num_output_channels != 3:
            raise ValueError("only method=weighted_average with 3 output channels")

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return torch.where(_per_sample(params[:, 0]) > 0, _gray(x).expand_as(x), x)


class _ColorJitter(_Op):
    """albumentations' ColorJitter: brightness, contrast, saturation and hue factors drawn from
    their ranges, applied in an order shuffled per sample. Parameters: applied, 4 factors, the
    4 steps' operations."""

    size = 9
    HUE = 3

    def __init__(self, transform: A.ColorJitter):
        super().__init__(transform)
        ranges = (transform.brightness, transform.contrast, transform.saturation, transform.hue)
        self.low, self.high = np.array(ranges, dtype=np.float64).T
        self.hue = bool(self.low[self.HUE] or self.high[self.HUE])  # (0, 0): no hue pass

    def draw(self, rng: np.random.Generator) -> list[float]:
        applied = float(rng.random() < self.p)
        factors = rng.uniform(self.low, self.high)
        return [applied, *factors, *rng.permutation(4)]

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        applied, factors = params[:, 0] > 0, params[:, 1:5]
        for step in range(4):
            operation = torch.where(applied, params[:, 5 + step].long(), -1)
            factor = factors.gather(1, operation.clamp(min=0)[:, None])[:, 0]
            x = adjust_affine(x, operation, factor)
            if self.hue:
                hued = _per_sample(operation == self.HUE)
                x = torch.where(hued, adjust_hue(x, factors[:, self.HUE]), x)
        return x


DEVICE_AUGMENTATIONS: dict[type, type[_Op]] = {
    A.HorizontalFlip: _HorizontalFlip,
    A.ColorJitter: _ColorJitter,
    A.ToGray: _ToGray,
}


def device_augmentations(augmentations: Sequence[A.BasicTransform]) -> list[_Op]:
    """The device versions of ``augmentations``; one that has none is refused, by its key."""
    ops = []
    for number, transform in enumerate(augmentations):
        name = type(transform).__name__
        supported = ", ".join(cls.__name__ for cls in DEVICE_AUGMENTATIONS)
        op = DEVICE_AUGMENTATIONS.get(type(transform))
        why = f"the device applies only {supported}"
        if op is not None:
            try:
                ops.append(op(transform))
                continue
            except ValueError as error:
                why = f"the device's {name} takes {error}"
        raise DatasetError(
            f"data.train_augmentations[{number}] ({name}) cannot run with data.decode=gpu: "
            f"{why}; remove it (e.g. data/augmentation=default) or set data.decode=cpu"
        )
    return ops


def _resized(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)
    return _levels(resized[0]).to(torch.uint8)


class DevicePipeline:
    """``data.decode=gpu``'s training transform. In the DataLoader worker it is the dataset's
    ``transform``: it draws each sample's augmentation (seeded per sample through
    ``set_random_state``, as ``SeededSamples`` seeds albumentations). On the device, ``decode``
    turns an ``EncodedBatch`` into the (images, labels) the CPU path's ``build_transform``
    would give: resized to ``image_size``, augmented, normalised with ``mean`` / ``std``."""

    def __init__(self, augmentations: Sequence[A.BasicTransform], image_size: Sequence[int],
                 mean: Sequence[float], std: Sequence[float]):
        self.ops = device_augmentations(augmentations)
        self.size = (int(image_size[0]), int(image_size[1]))
        # A.Normalize's float32 constants: the same arithmetic as its lookup table.
        self.mean = np.array(mean, dtype=np.float32) * 255.0
        self.scale = np.reciprocal(np.array(std, dtype=np.float32) * 255.0)
        self._rng: np.random.Generator | None = None

    # --- host side: the worker ---

    def set_random_state(self, random_generator: np.random.Generator, py_random=None) -> None:
        self._rng = random_generator

    def __call__(self, *, image: EncodedImage) -> dict:
        # A draw seeded for this sample, once; unseeded reads (a plain index) draw fresh entropy.
        rng, self._rng = self._rng or np.random.default_rng(), None
        params = np.array([value for op in self.ops for value in op.draw(rng)], np.float32)
        return {"image": image._replace(params=torch.from_numpy(params))}

    # --- device side ---

    def decode(
        self,
        batch: EncodedBatch,
        device: torch.device | str,
        on_failure: Callable[[int, Exception], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, 3, H, W) float32 on ``device``, labels (B,) int64 there). A stream the
        device cannot decode is replaced by another image of the batch, with its label, and
        reported to ``on_failure(position, error)``."""
        device = torch.device(device)
        images, labels = self._decoded(batch, device, on_failure)
        x = torch.stack([_resized(image, self.size) for image in images]).float()
        params = batch.params.to(device, non_blocking=True)
        start = 0
        for op in self.ops:
            x = op.apply(x, params[:, start : start + op.size])
            start += op.size
        mean = torch.from_numpy(self.mean).to(device).view(1, 3, 1, 1)
        scale = torch.from_numpy(self.scale).to(device).view(1, 3, 1, 1)
        return (x - mean) * scale, labels.to(device, non_blocking=True)

    @staticmethod
    def _decode_jpegs(streams: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_CODEC_DEPRECATION)
            return decode_jpeg(streams, mode=ImageReadMode.RGB, device=device)

    def _decoded(self, batch: EncodedBatch, device: torch.device, on_failure
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
        images: list[torch.Tensor | None] = list(batch.images)
        jpegs = [i for i, data in enumerate(images) if data.dim() == 1]
        failed: dict[int, Exception] = {}
        if jpegs:
            try:
                decoded = self._decode_jpegs([images[i] for i in jpegs], device)
            except RuntimeError:  # one bad stream fails the whole call: find which
                decoded = []
                for i in jpegs:
                    try:
                        decoded += self._decode_jpegs([images[i]], device)
                    except RuntimeError as error:
                        decoded.append(None)
                        failed[i] = error
            for i, image in zip(jpegs, decoded, strict=True):
                images[i] = image
        images = [image if i in failed else image.to(device, non_blocking=True)
                  for i, image in enumerate(images)]
        labels = batch.labels
        if failed:
            good = [i for i in range(len(images)) if i not in failed]
            if not good:
                raise DatasetError(
                    f"no image of a training batch decodes on {device} (first: "
                    f"{next(iter(failed.values()))}); check the data with data.decode=cpu"
                )
            labels = labels.clone()
            for i, error in failed.items():
                stand_in = next((j for j in good if j > i), good[0])
                images[i], labels[i] = images[stand_in], labels[stand_in]
                if on_failure is not None:
                    on_failure(int(batch.positions[i]), error)
        return images, labels


def check_decode(decode: str, on_cpu_device: bool = False) -> None:
    """Refuse a ``data.decode`` this machine cannot run, before any data is read."""
    if decode not in DECODE_CHOICES:
        raise DatasetError(f"data.decode must be one of {', '.join(DECODE_CHOICES)}, "
                           f"got {decode!r}")
    if decode == "gpu" and not on_cpu_device and not torch.cuda.is_available():
        raise DatasetError(
            "data.decode=gpu needs a CUDA device; torch finds none here "
            "(torch.cuda.is_available() is False); set data.decode=cpu"
        )
