"""MTCNN, the five-point face detector insightface aligned its training sets with (Zhang et al.,
"Joint Face Detection and Alignment using Multi-task Cascaded Convolutional Networks", IEEE
SPL 2016): P-Net proposes boxes over an image pyramid, R-Net and O-Net reject and refine them,
O-Net gives the five landmarks.

The weights are the authors' Caffe models as converted to PyTorch state dicts by
facenet-pytorch (MIT), read from the files its wheel ships (``facenet_pytorch/data/*.pt``),
installed with ``pip install -e ".[align]"`` and never downloaded. Only the files are used:
facenet-pytorch's own code (which pins an old torch) is never imported. The cascade follows
the reference implementation (davidsandberg/facenet's ``detect_face.py``): the same pyramid,
thresholds, NMS and box arithmetic, crops zero-padded where a box leaves the photo.
"""

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from facetrain.align.faces import Face
from facetrain.data.images import DatasetError

WEIGHTS_PACKAGE = "facenet-pytorch==2.5.2"  # the [align] extra; its files, not its code
INSTALL_HINT = (
    'pip install -e ".[align]" (the MTCNN weight files of facenet-pytorch), or give the '
    "landmarks in a file: landmarks=FILE"
)


class DetectorError(DatasetError):
    """The detector cannot run here; the message says what to install. A DatasetError, so
    every entry point reports it in one line (images that need a detector cannot be read)."""


def weights_dir() -> Path:
    """The folder of facenet-pytorch's MTCNN weight files, found without importing its code."""
    spec = importlib.util.find_spec("facenet_pytorch")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        data = Path(folder) / "data"
        if all((data / f"{net}.pt").is_file() for net in ("pnet", "rnet", "onet")):
            return data
    raise DetectorError(f"no face detector installed: {INSTALL_HINT}")


def _conv(cin: int, cout: int, kernel: int, index: int) -> dict[str, nn.Module]:
    return {f"conv{index}": nn.Conv2d(cin, cout, kernel), f"prelu{index}": nn.PReLU(cout)}


class PNet(nn.Module):
    """Proposal network: fully convolutional, a 12x12 window every 2 pixels."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict(
            {**_conv(3, 10, 3, 1), "pool1": nn.MaxPool2d(2, 2, ceil_mode=True),
             **_conv(10, 16, 3, 2), **_conv(16, 32, 3, 3)}
        )
        self.conv4_1 = nn.Conv2d(32, 2, 1)  # face / not face
        self.conv4_2 = nn.Conv2d(32, 4, 1)  # box offsets

    def forward(self, x):
        for layer in self.layers.values():
            x = layer(x)
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """Refinement network on 24x24 crops."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict(
            {**_conv(3, 28, 3, 1), "pool1": nn.MaxPool2d(3, 2, ceil_mode=True),
             **_conv(28, 48, 3, 2), "pool2": nn.MaxPool2d(3, 2, ceil_mode=True),
             **_conv(48, 64, 2, 3)}
        )
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x):
        for layer in self.layers.values():
            x = layer(x)
        # The Caffe weights flatten a transposed (W, H) map: permute to their order.
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output network on 48x48 crops: box, score and the five landmarks."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict(
            {**_conv(3, 32, 3, 1), "pool1": nn.MaxPool2d(3, 2, ceil_mode=True),
             **_conv(32, 64, 3, 2), "pool2": nn.MaxPool2d(3, 2, ceil_mode=True),
             **_conv(64, 64, 3, 3), "pool3": nn.MaxPool2d(2, 2, ceil_mode=True),
             **_conv(64, 128, 2, 4)}
        )
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2 = nn.Linear(256, 2), nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)  # 5 x then 5 y, in the crop's [0, 1]

    def forward(self, x):
        for layer in self.layers.values():
            x = layer(x)
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def _load(net: nn.Module, path: Path) -> nn.Module:
    state = torch.load(path, map_location="cpu", weights_only=True)
    # The files name layers flat (conv1.weight); ours group the trunk under `layers.`.
    trunk = set(net.layers.state_dict())
    net.load_state_dict({(f"layers.{k}" if k in trunk else k): v for k, v in state.items()})
    return net.eval()


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union"):
    """Indices kept by greedy non-maximum suppression, best score first. Overlap is
    intersection over union, or over the smaller box (``min``, MTCNN's last stage). Boxes are
    inclusive pixel ranges (area (x2 - x1 + 1)(y2 - y1 + 1)), as in the reference code."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores, kind="stable")[::-1]
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = w * h
        denominator = np.minimum(area[best], area[rest]) if mode == "min" else (
            area[best] + area[rest] - inter
        )
        order = rest[inter / denominator <= threshold]
    return np.array(keep, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Boxes widened to squares about their centres (the next network's input is square)."""
    boxes = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    boxes[:, 0] += (w - side) / 2
    boxes[:, 1] += (h - side) / 2
    boxes[:, 2:4] = boxes[:, 0:2] + side[:, None]
    return boxes


def _regress(boxes: np.ndarray, offsets: np.ndarray, extra: float = 1.0) -> np.ndarray:
    """Boxes moved by the network's offsets, in units of the box size (+1: inclusive ranges;
    the reference code's first stage uses the plain difference, extra=0)."""
    boxes = boxes.copy()
    size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1) + extra
    boxes[:, 0:4] += offsets * np.concatenate([size, size], axis=1)
    return boxes


def _crops(image: np.ndarray, boxes: np.ndarray, side: int) -> torch.Tensor:
    """The network input for each box: its pixels (zeros outside the photo) resized to side x
    side, normalised as in training ((x - 127.5) / 128), NCHW float32."""
    height, width = image.shape[:2]
    out = np.empty((len(boxes), side, side, 3), dtype=np.float32)
    # Integer boxes in the reference's 1-based inclusive form: columns x1 - 1 .. x2 - 1.
    for k, (x1, y1, x2, y2) in enumerate(np.trunc(boxes[:, :4]).astype(np.int64)):
        patch = np.zeros((y2 - y1 + 1, x2 - x1 + 1, 3), dtype=np.float32)
        top, left = max(y1 - 1, 0), max(x1 - 1, 0)
        bottom, right = min(y2, height), min(x2, width)
        if bottom > top and right > left:
            patch[top - (y1 - 1):bottom - (y1 - 1), left - (x1 - 1):right - (x1 - 1)] = image[
                top:bottom, left:right
            ]
        out[k] = cv2.resize(patch, (side, side), interpolation=cv2.INTER_AREA)
    return torch.from_numpy((out - 127.5) * 0.0078125).permute(0, 3, 1, 2)


class MTCNN:
    """``MTCNN().detect(rgb_image) -> [Face, ...]``, best score first.

    ``min_face``: the smallest face side looked for, in pixels (20 as the paper; larger is
    faster on big photos). ``thresholds``: the three networks' score thresholds (the
    reference's 0.6, 0.7, 0.7). ``factor``: the pyramid's scale step (0.709).
    """

    def __init__(
        self,
        min_face: float = 20.0,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        weights: str | Path | None = None,
    ):
        folder = Path(weights) if weights is not None else weights_dir()
        self.pnet = _load(PNet(), folder / "pnet.pt")
        self.rnet = _load(RNet(), folder / "rnet.pt")
        self.onet = _load(ONet(), folder / "onet.pt")
        self.min_face, self.thresholds, self.factor = float(min_face), thresholds, factor

    def _scales(self, height: int, width: int) -> list[float]:
        scale = 12.0 / self.min_face
        shortest = min(height, width) * scale
        scales = []
        while shortest >= 12:
            scales.append(scale)
            scale *= self.factor
            shortest *= self.factor
        return scales

    def _propose(self, image: np.ndarray) -> np.ndarray:
        """P-Net's boxes (x1, y1, x2, y2, score, 4 offsets) over the pyramid."""
        height, width = image.shape[:2]
        found = []
        for scale in self._scales(height, width):
            size = (int(width * scale + 1), int(height * scale + 1))
            level = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            level = torch.from_numpy((level - 127.5) * 0.0078125).permute(2, 0, 1)[None]
            offsets, probability = self.pnet(level)
            score = probability[0, 1].numpy()
            ys, xs = np.nonzero(score >= self.thresholds[0])
            if not len(ys):
                continue
            # Window (x, y) of the output map covers input pixels 2x .. 2x + 11 of this level.
            cells = np.stack([xs, ys], axis=1).astype(np.float64)
            boxes = np.concatenate(
                [np.floor((2 * cells + 1) / scale), np.floor((2 * cells + 12) / scale),
                 score[ys, xs][:, None], offsets[0].numpy()[:, ys, xs].T],
                axis=1,
            )
            found.append(boxes[nms(boxes[:, :4], boxes[:, 4], 0.5)])
        return np.concatenate(found) if found else np.empty((0, 9))

    def detect(self, image: np.ndarray) -> list[Face]:
        """The faces of an (H, W, 3) uint8 RGB image, best score first.

        Runs on one torch thread (restored after): the networks are so small that intra-op
        threads cost more in synchronisation than they save, and collapse when the cores are
        busy (measured on 2 loaded cores: 2 s per photo on 2 threads, 30 ms on one).
        Parallelism comes from processes (``facetrain-align workers=``, DataLoader workers).
        """
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"need an (H, W, 3) RGB image, got shape {image.shape}")
        threads = torch.get_num_threads()
        if threads != 1:
            torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                return self._detect(image.astype(np.float32))
        finally:
            if threads != 1:
                torch.set_num_threads(threads)

    def _detect(self, image: np.ndarray) -> list[Face]:
        boxes = self._propose(image)
        if not len(boxes):
            return []
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        boxes = _square(np.concatenate([_regress(boxes[:, :4], boxes[:, 5:9], 0.0),
                                        boxes[:, 4:5]], axis=1))

        offsets, probability = self.rnet(_crops(image, boxes, 24))
        score = probability[:, 1].numpy()
        passed = score > self.thresholds[1]
        boxes = np.concatenate([boxes[passed, :4], score[passed, None]], axis=1)
        offsets = offsets.numpy()[passed]
        if not len(boxes):
            return []
        keep = nms(boxes[:, :4], boxes[:, 4], 0.7)
        boxes = _square(_regress(boxes[keep], offsets[keep]))

        offsets, points, probability = self.onet(_crops(image, boxes, 48))
        score = probability[:, 1].numpy()
        passed = score > self.thresholds[2]
        if not passed.any():
            return []
        boxes = np.concatenate([boxes[passed, :4], score[passed, None]], axis=1)
        points, offsets = points.numpy()[passed], offsets.numpy()[passed]
        size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1) + 1
        landmarks = np.stack(
            [size[:, 0:1] * points[:, 0:5] + boxes[:, 0:1] - 1,
             size[:, 1:2] * points[:, 5:10] + boxes[:, 1:2] - 1],
            axis=2,
        )
        boxes = _regress(boxes, offsets)
        keep = nms(boxes[:, :4], boxes[:, 4], 0.7, mode="min")
        return [
            Face(landmarks=landmarks[k], score=float(boxes[k, 4]), box=boxes[k, :4])
            for k in keep
        ]
