"""Export to ONNX / TorchScript: parity with PyTorch on real face images, a dynamic batch axis,
metadata a second tool can read, and no file left behind when the check fails."""

import copy
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from helpers import run_cli
from torch import nn

from facetrain import __version__
from facetrain.backbones import (
    IResNet,
    MobileFaceNet,
    SphereNet,
    TimmBackbone,
    TorchvisionResNet,
)
from facetrain.checkpoint import load_backbone
from facetrain.data.image_list import list_images
from facetrain.export import (
    ExportError,
    export_backbone,
    model_metadata,
    parity_images,
    read_metadata,
)

SIZE = (64, 64)
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.5, 0.2)  # distinct per channel: a swapped channel shows


def describe(backbone: nn.Module, target: str) -> dict:
    """What ``load_backbone`` returns next to a backbone: its config, input and normalisation."""
    return {
        "path": "runs/example/checkpoints/last.ckpt",
        "backbone": {"_target_": target, "embedding_size": backbone.embedding_size,
                     "input_size": list(backbone.input_size)},
        "image_size": list(backbone.input_size), "mean": list(MEAN), "std": list(STD),
        "embedding_size": backbone.embedding_size,
    }


def calibrated(backbone: nn.Module, images: torch.Tensor) -> nn.Module:
    """Set BatchNorm statistics from real images, as training would: a freshly initialised
    network's eval-mode outputs are ~1e-5 and would make any absolute tolerance meaningless."""
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass gives the batch statistics
    with torch.no_grad():
        backbone.train()(images)
    return backbone.eval()


@pytest.fixture(scope="module")
def faces_folder(tiny_faces):
    return tiny_faces.verification_root


@pytest.fixture(scope="module")
def exported(faces_folder, tmp_path_factory):
    torch.manual_seed(0)
    backbone = MobileFaceNet(embedding_size=128, input_size=SIZE)
    info = describe(backbone, "facetrain.backbones.MobileFaceNet")
    images = parity_images(info, faces_folder, count=8)
    calibrated(backbone, images)
    path = tmp_path_factory.mktemp("export") / "mobilefacenet.onnx"
    parity = export_backbone(backbone, path, images, model_metadata(info))
    return backbone, info, path, parity


def test_onnx_matches_pytorch_on_real_faces_at_batch_1_and_8(exported):
    backbone, _, path, parity = exported
    assert parity.batch_sizes == (1, 8)
    assert parity.max_abs_diff < 1e-4 * max(parity.max_abs_embedding, 1.0)
    assert parity.min_cosine > 0.99999
    assert parity.max_abs_embedding > 0.1, "calibrated embeddings are not vanishingly small"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "one self-contained file"


def test_onnx_batch_axis_is_dynamic(exported, faces_folder):
    backbone, info, path, _ = exported
    graph_input = onnx.load(str(path)).graph.input[0]
    assert graph_input.name == "images"
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, *SIZE]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = parity_images(info, faces_folder, count=13)  # a batch size never exported or checked
    with torch.no_grad():
        expected = backbone(images).numpy()
    (embeddings,) = session.run(["embeddings"], {"images": images.numpy()})
    assert embeddings.shape == (13, 128)
    np.testing.assert_allclose(embeddings, expected, atol=1e-4, rtol=0)


def test_metadata_is_enough_to_use_the_model_without_facetrain(exported, faces_folder):
    """A second tool (onnx, onnxruntime, OpenCV) reads the metadata, preprocesses a face from it
    alone and gets the embedding PyTorch computes through facetrain's evaluation pipeline."""
    backbone, info, path, _ = exported
    from_onnx = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    from_runtime = session.get_modelmeta().custom_metadata_map
    assert from_onnx == from_runtime == read_metadata(path) == model_metadata(info)
    assert json.loads(from_runtime["input_size"]) == list(SIZE)
    assert json.loads(from_runtime["mean"]) == list(MEAN)
    assert json.loads(from_runtime["std"]) == list(STD)
    assert from_runtime["channel_order"] == "RGB" and from_runtime["input_layout"] == "NCHW"
    assert from_runtime["embedding_size"] == "128"
    assert from_runtime["facetrain_version"] == __version__
    assert json.loads(from_runtime["backbone"])["_target_"] == "facetrain.backbones.MobileFaceNet"
    assert from_runtime["source_checkpoint"].endswith("runs/example/checkpoints/last.ckpt")

    root, paths = list_images(faces_folder)
    image = cv2.cvtColor(cv2.imread(str(root / paths[0])), cv2.COLOR_BGR2RGB)
    height, width = json.loads(from_runtime["input_size"])
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    mean = np.array(json.loads(from_runtime["mean"]), dtype=np.float32)
    std = np.array(json.loads(from_runtime["std"]), dtype=np.float32)
    blob = ((image / np.float32(255) - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
    (embedding,) = session.run(None, {"images": blob})

    reference = parity_images(info, faces_folder, count=2)[:1]
    with torch.no_grad():
        expected = backbone(reference).numpy()
    np.testing.assert_allclose(embedding, expected, atol=1e-3, rtol=0)


def faces_from_metadata(path, folder, count: int) -> np.ndarray:
    """``count`` face images of ``folder`` read with OpenCV and preprocessed from the ONNX file's
    metadata alone (input_size, mean, std): no facetrain code between the file and the pixels."""
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    height, width = json.loads(metadata["input_size"])
    mean, std = (np.array(json.loads(metadata[key]), np.float32) for key in ("mean", "std"))
    files = sorted(Path(folder).rglob("*.jpg"))[:count]
    faces = []
    for file in files:
        image = cv2.cvtColor(cv2.imread(str(file)), cv2.COLOR_BGR2RGB)
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        faces.append(((image / np.float32(255) - mean) / std).transpose(2, 0, 1))
    return np.stack(faces).astype(np.float32)


def assert_onnxruntime_matches_pytorch(path, backbone: nn.Module, folder, batch: int = 7):
    """A fresh onnxruntime session on the exported file against the backbone run in PyTorch
    (eval mode, no grad), at batch 1 and at ``batch`` (a size the exporter never checked):
    largest |difference| within 1e-4 of the largest embedding value, cosine above 0.99999."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = faces_from_metadata(path, folder, batch)
    backbone.eval()
    with torch.no_grad():
        expected = backbone(torch.from_numpy(images)).numpy()
    scale = np.abs(expected).max()
    assert scale > 0.1, "embeddings vanishingly small: any tolerance would pass"
    for size in (1, batch):
        (got,) = session.run(["embeddings"], {"images": images[:size]})
        reference = expected[:size]
        assert got.shape == reference.shape
        diff = np.abs(got - reference).max()
        cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) \
            / np.linalg.norm(reference, axis=1)
        assert diff <= 1e-4 * max(scale, 1.0), f"batch {size}: max |diff| {diff:.3g}"
        assert cosine.min() > 0.99999, f"batch {size}: min cosine {cosine.min():.7f}"


def test_an_independent_onnxruntime_session_agrees_with_pytorch(exported, faces_folder):
    backbone, _, path, _ = exported
    assert_onnxruntime_matches_pytorch(path, backbone, faces_folder)


def test_the_independent_check_sees_weights_changed_after_export(exported, faces_folder):
    """The check above can fail: the file no longer matches a backbone changed by 1% in one
    layer."""
    backbone, _, path, _ = exported
    changed = copy.deepcopy(backbone)
    with torch.no_grad():
        next(changed.parameters()).mul_(1.01)
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        assert_onnxruntime_matches_pytorch(path, changed, faces_folder)


FAMILIES = {  # the smallest member of each family at 64x64
    "SphereNet": lambda: SphereNet(depth=4, embedding_size=64, input_size=SIZE),
    "IResNet": lambda: IResNet(depth=18, embedding_size=64, input_size=SIZE),
    "TorchvisionResNet": lambda: TorchvisionResNet(depth=18, embedding_size=64, input_size=SIZE),
    "TimmBackbone": lambda: TimmBackbone("test_resnet", embedding_size=64, input_size=SIZE),
}


@pytest.mark.parametrize(
    "family",
    ["SphereNet", *(pytest.param(name, marks=pytest.mark.slow)  # 12-17 s each to export
                    for name in ("IResNet", "TorchvisionResNet", "TimmBackbone"))],
)
def test_every_backbone_family_exports_what_pytorch_computes(family, faces_folder, tmp_path):
    if family == "TimmBackbone":
        pytest.importorskip("timm")
    torch.manual_seed(0)
    backbone = FAMILIES[family]()
    info = describe(backbone, f"facetrain.backbones.{family}")
    calibrated(backbone, parity_images(info, faces_folder, count=8))
    path = tmp_path / "backbone.onnx"
    export_backbone(backbone, path, parity_images(info, faces_folder, count=4),
                    model_metadata(info))
    assert_onnxruntime_matches_pytorch(path, backbone, faces_folder)


class PooledLinear(nn.Module):
    """A tiny deterministic backbone: average-pooled pixels through a linear layer."""

    embedding_size = 8
    input_size = SIZE

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(12, self.embedding_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(images).flatten(1))


class RandomAtInference(PooledLinear):
    """A backbone that still draws random numbers in eval mode (a noise layer that ignores
    ``self.training``): its exported graph cannot agree with PyTorch run to run."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.pool(images).flatten(1)
        return self.fc(features + torch.rand_like(features))


def test_failed_parity_check_leaves_the_previous_file_untouched(faces_folder, tmp_path):
    model = RandomAtInference().eval()
    info = describe(model, "tests.RandomAtInference")
    images = parity_images(info, faces_folder, count=4)
    output = tmp_path / "model.onnx"
    output.write_bytes(b"the model exported last week")
    with pytest.raises(ExportError, match=r"disagrees with PyTorch.*max \|diff\|.*rtol=0\.0001"):
        export_backbone(model, output, images, model_metadata(info))
    assert output.read_bytes() == b"the model exported last week"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"], "no temporary left"


def test_opsets_below_17_use_the_torchscript_based_exporter(faces_folder, tmp_path):
    """torch.export's exporter writes opset 18 and cannot convert most graphs below 17; the
    older exporter writes 13 natively, still with a dynamic batch axis and within tolerance."""
    torch.manual_seed(0)
    model = PooledLinear().eval()
    info = describe(model, "tests.PooledLinear")
    images = parity_images(info, faces_folder, count=5)
    path = tmp_path / "opset13.onnx"
    parity = export_backbone(model, path, images, model_metadata(info), opset=13)
    assert parity.batch_sizes == (1, 5) and parity.max_abs_diff < 1e-5
    exported = onnx.load(str(path))
    assert [o.version for o in exported.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert exported.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert read_metadata(path) == model_metadata(info)


def test_torchscript_export_matches_and_carries_the_metadata(faces_folder, tmp_path):
    torch.manual_seed(1)
    backbone = SphereNet(depth=4, embedding_size=64, input_size=SIZE).eval()  # a small graph
    info = describe(backbone, "facetrain.backbones.SphereNet")
    images = parity_images(info, faces_folder, count=6)
    path = tmp_path / "backbone.pt"
    parity = export_backbone(backbone, path, images, model_metadata(info), format="torchscript")
    assert parity.batch_sizes == (1, 6) and parity.max_abs_diff < 1e-5
    assert parity.max_abs_embedding > 0.1
    assert read_metadata(path) == model_metadata(info)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated since 2.9
        module = torch.jit.load(str(path))
    with torch.no_grad():
        np.testing.assert_allclose(module(images[:3]).numpy(), backbone(images[:3]).numpy(),
                                   atol=1e-5, rtol=0)


def test_parity_needs_two_readable_images(tmp_path):
    (tmp_path / "only.png").write_bytes(b"not a png")
    info = describe(MobileFaceNet(input_size=SIZE), "facetrain.backbones.MobileFaceNet")
    with pytest.raises(Exception, match="needs at least 2 readable images"):
        parity_images(info, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make", "target"),
    [(lambda: SphereNet(depth=4, embedding_size=64, input_size=SIZE), "SphereNet"),
     (lambda: IResNet(depth=18, embedding_size=64, input_size=SIZE), "IResNet")],
    ids=["spherenet4", "iresnet18"],
)
def test_other_backbone_families_export_with_parity(make, target, faces_folder, tmp_path):
    torch.manual_seed(0)
    backbone = make()
    info = describe(backbone, f"facetrain.backbones.{target}")
    images = parity_images(info, faces_folder, count=6)
    calibrated(backbone, images)
    parity = export_backbone(backbone, tmp_path / "b.onnx", images, model_metadata(info))
    assert parity.max_abs_diff < 1e-4 * max(parity.max_abs_embedding, 1.0)
    assert parity.min_cosine > 0.99999


@pytest.mark.slow
def test_cli_exports_a_trained_checkpoint_at_the_chosen_opset(trained_run, faces_folder, tmp_path):
    output = tmp_path / "model.onnx"
    result = run_cli(
        "export", f"checkpoint={trained_run}", f"output={output}", "opset=17",
        f"images={faces_folder}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "onnxruntime vs PyTorch on 16 images" in log and "batch 1 and 16" in log

    model = onnx.load(str(output))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    backbone, info = load_backbone(trained_run)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata == model_metadata(info)
    assert json.loads(metadata["input_size"]) == [64, 64]
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    images = parity_images(info, faces_folder, count=5)
    with torch.no_grad():
        expected = backbone(images).numpy()
    np.testing.assert_allclose(session.run(None, {"images": images.numpy()})[0], expected,
                               atol=1e-4, rtol=0)


@pytest.mark.slow
def test_cli_names_the_allowed_formats(trained_run, tmp_path):
    result = run_cli("export", f"checkpoint={trained_run}", "format=tflite", cwd=tmp_path)
    assert result.returncode != 0
    assert "facetrain-export: export error: format='tflite' is not one of: onnx, torchscript" \
        in result.stderr
