"""``model.init_from``: backbones trained elsewhere (facetrain.pretrained).

The arcface_torch cases run on state dicts that insightface's own model code wrote, with its
embeddings of a fixed input (tests/fixtures/arcface_torch_backbones.npz, made by
tests/fixtures/arcface_torch_make_fixture.py at a pinned insightface commit): the fixture is
data; our loader and our networks are under test.
"""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from facetrain.backbones import (
    ArcFaceMobileFaceNet,
    IResNet,
    MobileFaceNet,
    TimmBackbone,
    count_parameters,
    create,
)
from facetrain.backbones.iresnet import UNITS_PER_STAGE
from facetrain.checkpoint import UnsafeCheckpointError, describe_model
from facetrain.cli import user_errors
from facetrain.pretrained import detect_arcface_torch, load_backbone_weights, suggest_backbone

FIXTURE = Path(__file__).parent / "fixtures" / "arcface_torch_backbones.npz"

# fixture entry → (how arcface_torch built it, the facetrain backbone a user builds for it, the
# backbone= overrides that build it, its arcface_torch name)
ARCFACE_TORCH = {
    "iresnet": ({"layers": [1, 1, 1, 1], "num_features": 16},
                lambda: IResNet(10, embedding_size=16, units=(1, 1, 1, 1)),
                "backbone=iresnet backbone.depth=10 backbone.embedding_size=16 "
                "+backbone.units=[1,1,1,1]", "iresnet layers=[1, 1, 1, 1] (16-D)"),
    "mbf": ({"fp16": False, "num_features": 512},
            lambda: create("mbf"), "backbone=mbf", "mbf (512-D)"),
    "mbf_stem_residual": ({"fp16": False, "num_features": 32, "blocks": [2, 1, 2, 1], "scale": 1},
                          lambda: create("mbf", embedding_size=32, blocks=[2, 1, 2, 1], scale=1),
                          "backbone=mbf backbone.embedding_size=32 backbone.blocks=[2,1,2,1] "
                          "backbone.scale=1", "mbf blocks=[2, 1, 2, 1] scale=1 (32-D)"),
}


@functools.cache
def fixture() -> dict:
    with np.load(FIXTURE, allow_pickle=False) as arrays:
        return dict(arrays)


def on_grid(prefix: str) -> torch.Tensor:
    """A tensor the generator stored as int8 k and exponent e: k * 2**-e, exactly."""
    arrays = fixture()
    values = torch.from_numpy(arrays[f"{prefix}.q"])
    if f"{prefix}.e" in arrays:
        values = values.float() * 2.0 ** -int(arrays[f"{prefix}.e"])
    return values


def arcface_torch_state(key: str) -> dict[str, torch.Tensor]:
    names = fixture()[f"{key}.names"]
    return {str(name): on_grid(f"{key}.{i}") for i, name in enumerate(names)}


def backbone_pth(key: str, folder: Path) -> Path:
    """The file arcface_torch's training writes: torch.save(backbone.state_dict(), ...)."""
    path = folder / "backbone.pth"
    torch.save(arcface_torch_state(key), path)
    return path


@pytest.mark.parametrize("key", sorted(ARCFACE_TORCH))
def test_an_arcface_torch_backbone_pth_gives_arcface_torchs_embeddings(key, tmp_path):
    arguments, build, _, name = ARCFACE_TORCH[key]
    assert json.loads(str(fixture()[f"{key}.arguments"])) == arguments  # the network we mean
    backbone = build()
    line = load_backbone_weights(backbone, backbone_pth(key, tmp_path))
    tensors = len(fixture()[f"{key}.names"])
    assert line == (f"init_from: arcface_torch {name} backbone.pth as {backbone.architecture} "
                    f"(all {tensors} tensors)")
    with torch.no_grad():
        embeddings = backbone.eval()(on_grid("input"))
    expected = torch.from_numpy(fixture()[f"{key}.output"])
    assert expected.abs().mean() > 0.3  # activations of a usable scale: 1e-5 means something
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", sorted(ARCFACE_TORCH))
def test_every_arcface_torch_tensor_has_its_place_in_registration_order(key):
    """Both networks register their layers in the order they run: the i-th tensor of the
    arcface_torch file is the i-th of facetrain's network, whatever the names."""
    state = arcface_torch_state(key)
    layout = detect_arcface_torch(state)
    ours = ARCFACE_TORCH[key][1]().state_dict()
    assert list(layout.rename) == list(state)
    assert list(layout.rename.values()) == list(ours)
    assert [state[k].shape for k in state] == [v.shape for v in ours.values()]


@pytest.mark.parametrize("key", sorted(ARCFACE_TORCH))
def test_the_backbone_to_use_is_read_from_the_file(key):
    layout = detect_arcface_torch(arcface_torch_state(key))
    assert (suggest_backbone(layout.config), layout.name) == ARCFACE_TORCH[key][2:]


def test_the_suggested_overrides_build_a_backbone_the_file_fits(tmp_path):
    """What a user types after a refusal, composed by Hydra as train.py composes the group."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from facetrain.resources import config_dir

    with initialize_config_dir(config_dir(), version_base="1.3"):
        for key, (_, _, overrides, _) in ARCFACE_TORCH.items():
            words = [f"+{word}" if word.startswith("backbone=") else word
                     for word in overrides.split()]
            cfg = compose(overrides=[*words, "+data.image_size=[112,112]"])
            folder = tmp_path / key
            folder.mkdir()
            line = load_backbone_weights(instantiate(cfg.backbone), backbone_pth(key, folder))
            assert line.startswith("init_from: arcface_torch "), key


def test_mbf_has_the_parameters_of_arcface_torchs_get_mbf():
    state = arcface_torch_state("mbf")
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    arcface_torch = sum(v.numel() for k, v in state.items() if not k.endswith(buffers))
    assert count_parameters(create("mbf")) == arcface_torch == 2_059_520


def arcface_torch_names(units: tuple[int, int, int, int]) -> list[str]:
    """The tensor names of an arcface_torch iresnet with ``units`` per stage, from those of the
    fixture's one-unit-per-stage network: later units of a stage repeat the first without
    downsample."""
    stages = {f"layer{i + 1}": count for i, count in enumerate(units)}
    names = []
    for name in map(str, fixture()["iresnet.names"]):
        stage, _, rest = name.partition(".0.")  # layer<N>.0.<tensor>
        names.append(name)
        if stage in stages and not rest.startswith("downsample"):
            names += [f"{stage}.{i}.{rest}" for i in range(1, stages[stage])]
    return names


# arcface_torch's get_model names: r18 ... r200 (whose layers (6, 26, 60, 6) are 198 deep)
@pytest.mark.parametrize(("depth", "units"), sorted(UNITS_PER_STAGE.items()))
def test_every_arcface_torch_iresnet_is_its_iresnet_config(depth, units):
    with torch.device("meta"):
        ours = IResNet(depth).state_dict()
        state = {name: torch.empty(0) for name in arcface_torch_names(units)}
    state["fc.weight"] = torch.empty(512, 512 * 7 * 7, device="meta")
    layout = detect_arcface_torch(state)
    assert layout.name == f"r{depth} (512-D)"
    assert suggest_backbone(layout.config) == f"backbone=iresnet{depth}"
    assert set(layout.rename.values()) == set(ours) and len(state) == len(ours)
    if depth == 50:
        assert len(ours) == 475


# Refusals: one line, naming the tensors and what to run instead.

def refusal(backbone, source) -> str:
    """What facetrain-train prints (facetrain.cli.user_errors) when loading fails."""
    with pytest.raises(SystemExit) as error, user_errors("facetrain-train"):
        load_backbone_weights(backbone, source)
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_an_arcface_torch_file_of_another_architecture_is_refused_naming_the_fit(tmp_path):
    # The default backbone (the paper's MobileFaceNet: 64 channels) and arcface_torch's mbf.
    message = refusal(MobileFaceNet(), backbone_pth("mbf", tmp_path))
    assert message.startswith(
        f"facetrain-train: checkpoint error: model.init_from={tmp_path / 'backbone.pth'} holds an "
        f"arcface_torch mbf (512-D), which the configured backbone (MobileFaceNet) does not fit: "
        f"run with backbone=mbf (tensors as facetrain names them: ")
    assert "features.0.0.weight (checkpoint (128, 3, 3, 3), model (64, 3, 3, 3))" in message
    message = refusal(create("mbf", embedding_size=128), tmp_path / "backbone.pth")
    assert "run with backbone=mbf (tensors" in message  # mbf.yaml's own 512-D
    assert "embedding.3.weight (checkpoint (512, 512), model (128, 512))" in message
    message = refusal(create("mbf", input_size=(112, 96)), tmp_path / "backbone.pth")
    assert "run with backbone=mbf data.image_size=[112,112] (tensors" in message


def test_an_iresnet_file_given_to_an_mbf_names_the_iresnet_to_build(tmp_path):
    message = refusal(create("mbf"), backbone_pth("iresnet", tmp_path))
    assert ("run with backbone=iresnet backbone.depth=10 backbone.embedding_size=16 "
            "+backbone.units=[1,1,1,1] (tensors as facetrain names them: missing: features.0.0."
            "weight, features.0.1.weight, features.0.1.bias and 330 more; unexpected: body.0."
            "weight, body.1.weight, body.1.bias and 112 more)") in message


def test_a_state_dict_of_an_unknown_architecture_names_the_first_mismatching_tensors(tmp_path):
    path = tmp_path / "squeezenet.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    backbone = create("mbf", embedding_size=32, blocks=[2, 1, 2, 1], scale=1)
    message = refusal(backbone, path)
    assert message == (
        f"facetrain-train: checkpoint error: model.init_from={path}: its 52 tensors are neither "
        f"the configured backbone's (MobileFaceNet-mbf) nor an arcface_torch iresnet / mbf state "
        f"dict; first mismatching tensors: missing: features.0.0.weight, features.0.1.weight, "
        f"features.0.1.bias and 203 more; unexpected: features.0.weight, features.0.bias, "
        f"features.3.squeeze.weight and 49 more"
    )


def test_files_that_are_not_weights_are_refused(tmp_path):
    backbone = create("mbf", embedding_size=32, blocks=[2, 1, 2, 1], scale=1)
    missing = tmp_path / "nowhere.pth"
    assert refusal(backbone, missing).endswith(
        f"model.init_from={missing}: no such file or folder; give a facetrain checkpoint (.ckpt or "
        f"run folder), an arcface_torch backbone.pth, or timm:NAME")
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": Path("x")}, pickled)  # a pickled object: could run code when loaded
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*pickled.pth"):
        load_backbone_weights(backbone, pickled)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    assert "not a state dict" in refusal(backbone, listed)


def test_a_ddp_saved_file_and_an_arcface_torch_training_checkpoint_load_too(tmp_path):
    state = arcface_torch_state("mbf_stem_residual")
    build = ARCFACE_TORCH["mbf_stem_residual"][1]
    for name, content in {
        "module.pth": {f"module.{key}": value for key, value in state.items()},
        "checkpoint_gpu_0.pt": {"epoch": 3, "state_dict_backbone": state,
                                "state_dict_softmax_fc": {"weight": torch.zeros(4, 32)}},
    }.items():
        torch.save(content, tmp_path / name)
        backbone = build()
        assert "(all 206 tensors)" in load_backbone_weights(backbone, tmp_path / name)
        renamed = detect_arcface_torch(state).rename
        for key, value in state.items():
            assert torch.equal(backbone.state_dict()[renamed[key]], value)


# facetrain checkpoints.

def facetrain_checkpoint(path: Path, backbone) -> None:
    """A training checkpoint as facetrain writes one: the module's state dict (backbone.* and
    classifier.* tensors) and the model description."""
    cfg = OmegaConf.create({
        "backbone": {"_target_": "facetrain.backbones.ArcFaceMobileFaceNet", "embedding_size": 32,
                     "blocks": [2, 1, 2, 1], "scale": 1, "input_size": [64, 64]},
        "loss": {"_target_": "facetrain.heads.ArcFace", "scale": 64.0, "margin": 0.5},
        "data": {"image_size": [64, 64]},
    })
    state = {f"backbone.{key}": value for key, value in backbone.state_dict().items()}
    state["classifier.weight"] = torch.randn(7, 32)
    torch.save({"state_dict": state, "global_step": 12, "epoch": 1,
                "facetrain": describe_model(cfg, 32, 7)}, path)


def test_a_facetrain_checkpoint_gives_its_backbone_only(tmp_path):
    torch.manual_seed(0)
    trained = ArcFaceMobileFaceNet(32, (64, 64), blocks=(2, 1, 2, 1), scale=1)
    for parameter in trained.parameters():
        parameter.data.normal_()
    facetrain_checkpoint(tmp_path / "last.ckpt", trained)
    backbone = ArcFaceMobileFaceNet(32, (64, 64), blocks=(2, 1, 2, 1), scale=1)
    line = load_backbone_weights(backbone, tmp_path / "last.ckpt")
    assert line == (f"init_from: facetrain checkpoint {tmp_path / 'last.ckpt'} (step 12): its "
                    f"backbone, MobileFaceNet-mbf, all 206 tensors; its head and optimizer are "
                    f"not used")
    for key, value in trained.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key
    torch.save(trained.state_dict(), tmp_path / "weights.pth")  # a facetrain backbone's own
    backbone = ArcFaceMobileFaceNet(32, (64, 64), blocks=(2, 1, 2, 1), scale=1)
    line = load_backbone_weights(backbone, tmp_path / "weights.pth")
    assert line == "init_from: weights.pth (MobileFaceNet-mbf state dict, all 206 tensors)"
    for key, value in trained.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key
    message = refusal(ArcFaceMobileFaceNet(16, (64, 64), blocks=(2, 1, 2, 1), scale=1),
                      tmp_path / "weights.pth")
    assert message.endswith("are named as the configured backbone's (MobileFaceNet-mbf) but "
                            "shape: embedding.3.weight (checkpoint (32, 512), model (16, 512)), "
                            "embedding.4.weight (checkpoint (32,), model (16,)), embedding.4.bias "
                            "(checkpoint (32,), model (16,)) and 2 more")
    message = refusal(create("mbf", embedding_size=32, input_size=(64, 64)), tmp_path)
    assert ("its backbone (facetrain.backbones.ArcFaceMobileFaceNet) does not fit the configured "
            "one (MobileFaceNet-mbf): run with backbone=mbf backbone.embedding_size=32 "
            "backbone.blocks=[2,1,2,1] backbone.scale=1 (tensors: missing: ") in message


@pytest.mark.slow
def test_a_training_run_folder_initialises_the_next_run(trained_run):
    """The run's best checkpoint, as facetrain-eval picks it (checkpoint.load_backbone)."""
    from hydra.utils import instantiate

    from facetrain.checkpoint import load_backbone

    trained, info = load_backbone(trained_run)
    backbone = instantiate(info["backbone"])  # the same backbone config, fresh weights
    line = load_backbone_weights(backbone, trained_run)
    assert line.startswith(f"init_from: facetrain checkpoint {info['path']} (step ")
    for key, value in trained.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key


# timm pretrained names: the local cache only.

TIMM_NAME = "test_resnet.r160_in1k"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache (and torch hub folder) for this test alone."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))
    return tmp_path / "hub"


def cache_timm_weights(cache: Path, state: dict) -> Path:
    """What timm.create_model(TIMM_NAME, pretrained=True) leaves in the cache when online."""
    from safetensors.torch import save_file

    repo = cache / "models--timm--test_resnet.r160_in1k"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file(state, snapshot / "model.safetensors")
    return snapshot / "model.safetensors"


def test_a_timm_name_loads_the_cached_weights_into_the_body(hub_cache):
    import timm

    torch.manual_seed(0)
    imagenet = timm.create_model("test_resnet", num_classes=1000).state_dict()  # with its fc
    file = cache_timm_weights(hub_cache, {k: v.contiguous() for k, v in imagenet.items()})
    for source in (f"timm:{TIMM_NAME}", TIMM_NAME):
        backbone = TimmBackbone("test_resnet", embedding_size=64, input_size=(64, 64))
        embedding_layer = {k: v.clone() for k, v in backbone.output.state_dict().items()}
        line = load_backbone_weights(backbone, source)
        body = backbone.body.state_dict()
        assert line == (f"init_from: timm {TIMM_NAME} pretrained weights ({file}) into the body of "
                        f"timm test_resnet, all {len(body)} tensors; the embedding layer is new")
        assert set(imagenet) - set(body) == {"fc.weight", "fc.bias"}  # the ImageNet classifier
        for key, value in body.items():
            assert torch.equal(value, imagenet[key]), key
        for key, value in backbone.output.state_dict().items():
            assert torch.equal(value, embedding_layer[key]), key


def test_a_timm_name_without_cached_weights_says_how_to_get_them(hub_cache):
    backbone = TimmBackbone("test_resnet", embedding_size=64, input_size=(64, 64))
    assert refusal(backbone, f"timm:{TIMM_NAME}") == (
        f"facetrain-train: checkpoint error: model.init_from=timm:{TIMM_NAME}: its weights are not "
        f"in the local cache (Hugging Face hub cache, HF_HUB_CACHE; torch hub checkpoints) and "
        f"facetrain does not download during a run; fetch them once where there is network "
        f"access: python -c \"import timm; timm.create_model('{TIMM_NAME}', pretrained=True)\""
    )
    assert refusal(create("mbf"), f"timm:{TIMM_NAME}").endswith(
        f"model.init_from=timm:{TIMM_NAME} holds a timm test_resnet; the configured backbone is "
        f"MobileFaceNet-mbf: run with backbone=timm backbone.model_name=test_resnet")
    assert "timm has no pretrained weights of that name" in refusal(backbone, "timm:no_such_net")


# The constructor options the arcface_torch files need.

def test_iresnet_units_are_arcface_torchs_layers():
    with torch.device("meta"):
        assert IResNet(10, units=[1, 1, 1, 1]).units == (1, 1, 1, 1)
        assert IResNet(50).units == (3, 4, 14, 3)
    with pytest.raises(ValueError, match=r"units \[1, 1, 1, 1\] make an IResNet-10, not 50: set "
                                         r"backbone.depth=10"):
        IResNet(50, units=[1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"4 positive numbers.*got \[1, 0, 1, 1\]"):
        IResNet(8, units=[1, 0, 1, 1])
