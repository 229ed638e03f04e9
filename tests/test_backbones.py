"""Backbones against their papers' model cards, and the contract every backbone keeps:
(N, 3, H, W) → (N, D) float embeddings, ``.embedding_size``, a clear error for a wrong input
size, channels_last and torch.compile giving the same numbers."""

import functools
import sys

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from facetrain.backbones import (
    ArcFaceMobileFaceNet,
    Backbone,
    IResNet,
    MobileFaceNet,
    SphereNet,
    TimmBackbone,
    TorchvisionResNet,
    available,
    count_macs,
    count_parameters,
    create,
    load_config,
)
from facetrain.backbones.iresnet import IRUnit
from facetrain.backbones.sphereface import ResidualUnit
from facetrain.resources import config_dir

# configs/backbone/NAME.yaml → (input size, parameters, MACs), measured once and pinned so that
# a refactor cannot change an architecture silently. Published figures are checked below.
PINNED = {
    "sphereface4": ((112, 96), 12_562_496, 164_290_560),
    "sphereface10": ((112, 96), 15_217_984, 758_833_152),
    "sphereface20": ((112, 96), 22_666_944, 1_749_737_472),
    "sphereface36": ((112, 96), 32_771_392, 3_335_184_384),
    "sphereface64": ((112, 96), 48_186_816, 6_109_716_480),
    "iresnet18": ((112, 112), 24_025_600, 2_609_954_816),
    "iresnet34": ((112, 112), 34_139_328, 4_459_642_880),
    "iresnet50": ((112, 112), 43_590_848, 6_309_330_944),
    "iresnet100": ((112, 112), 65_156_160, 12_089_606_144),
    "iresnet200": ((112, 112), 118_833_920, 23_418_945_536),
    "resnet18": ((112, 112), 24_016_448, 1_730_068_480),
    "resnet50": ((112, 112), 74_886_208, 4_042_178_560),
    "mobilefacenet": ((112, 112), 1_003_136, 220_965_376),
    "mbf": ((112, 112), 2_059_520, 437_520_896),
}


@functools.cache
def build_on_meta(name: str) -> nn.Module:
    """Shapes only: no memory, no compute, so even iresnet200 is built in a second."""
    with torch.device("meta"):
        return create(name, input_size=PINNED[name][0])


@functools.cache
def measured_macs(name: str) -> int:
    return count_macs(build_on_meta(name), PINNED[name][0])


@pytest.mark.parametrize("name", sorted(PINNED))
def test_parameter_and_mac_counts_are_pinned(name):
    _, parameters, macs = PINNED[name]
    model = build_on_meta(name)
    assert model.embedding_size == (128 if name == "mobilefacenet" else 512)
    assert count_parameters(model) == parameters
    assert measured_macs(name) == pytest.approx(macs, rel=1e-4)


# The family files the depth files inherit from: every depth of the family, given a depth.
FAMILIES = {"iresnet": IResNet, "sphereface": SphereNet, "resnet": TorchvisionResNet}


def test_every_backbone_config_is_pinned_or_optional():
    assert set(available()) == {*PINNED, "timm", *FAMILIES}


def test_sphereface20_matches_the_released_caffe_model():
    # OpenVINO's card of the released SphereFace-20 (112x96): 22.671 M parameters, 3.504
    # GFLOPs at 2 FLOPs per multiply-add. The Caffe model also stores the residual convs'
    # biases (frozen at zero, lr_mult 0), which we leave out.
    model = build_on_meta("sphereface20")
    residual_biases = sum(
        unit.body[0].out_channels * 2 for unit in model.modules() if isinstance(unit, ResidualUnit)
    )
    assert round((count_parameters(model) + residual_biases) / 1e3) == 22_671
    assert measured_macs("sphereface20") == pytest.approx(3.504e9 / 2, rel=0.005)


@pytest.mark.parametrize(
    "name, published_gmacs", [("iresnet18", 2.6), ("iresnet50", 6.3), ("iresnet100", 12.1),
                              ("iresnet200", 23.5)]
)
def test_iresnet_multiply_adds_match_arcface_torch(name, published_gmacs):
    # The arcface_torch README's "GFLOPs" column counts multiply-adds.
    assert measured_macs(name) / 1e9 == pytest.approx(published_gmacs, rel=0.005)


@pytest.mark.parametrize("name, published", [("iresnet50", 43.576e6), ("iresnet100", 65.131e6)])
def test_iresnet_parameters_match_the_released_mxnet_models(name, published):
    # OpenVINO model zoo cards of LResNet50E-IR / LResNet100E-IR (the ArcFace MXNet release).
    assert count_parameters(build_on_meta(name)) == pytest.approx(published, rel=1e-3)


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_is_stock_torchvision_with_a_face_stem_and_embedding_output(depth):
    """Counts from stock torchvision at 224x224: swap the 7x7/2 stem for a 3x3/1 one and the
    1000-way classifier for BN-FC-BN on the flattened 7x7 map (independent arithmetic)."""
    with torch.device("meta"):
        ours = TorchvisionResNet(depth)
        stock = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    channels = stock.fc.in_features
    stem_7x7, stem_3x3, fc_in = 3 * 64 * 7 * 7, 3 * 64 * 3 * 3, channels * 7 * 7
    expected_macs = (
        count_macs(stock, (224, 224)) - 112 * 112 * (stem_7x7 - stem_3x3)
        - channels * 1000 + fc_in * 512
    )
    assert count_macs(ours, (112, 112)) == expected_macs
    expected_parameters = (
        count_parameters(stock) - (stem_7x7 - stem_3x3) - (channels * 1000 + 1000)
        + 2 * channels + (fc_in * 512 + 512) + 2 * 512
    )
    assert count_parameters(ours) == expected_parameters


def test_mobilefacenet_multiply_adds_match_paper():
    # Chen et al., CCBR 2018, Table 2: 0.99 M parameters, 221 M MAdds at 112x112.
    assert measured_macs("mobilefacenet") == pytest.approx(221e6, rel=0.01)


# Small members of each family, for the tests that run images through the network.
SMALL = {
    "sphereface4": lambda **kw: SphereNet(4, **kw),
    "iresnet18": lambda **kw: IResNet(18, **kw),
    "resnet18": lambda **kw: TorchvisionResNet(18, **kw),
    "mobilefacenet": lambda **kw: MobileFaceNet(**kw),
    "mbf": lambda **kw: ArcFaceMobileFaceNet(**kw),
    "timm test_resnet": lambda **kw: TimmBackbone("test_resnet", **kw),
}


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("size", [(112, 112), (112, 96)])
def test_embedding_shape_at_paper_sizes(name, size):
    model = SMALL[name](input_size=size, embedding_size=256).eval()
    with torch.no_grad():
        embeddings = model(torch.randn(2, 3, *size))
    assert embeddings.shape == (2, 256) and model.embedding_size == 256
    assert embeddings.dtype == torch.float32 and torch.isfinite(embeddings).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_wrong_input_shape_names_the_expected_size(name):
    model = SMALL[name](input_size=(112, 96)).eval()
    with pytest.raises(ValueError, match="built for 112x96 inputs but got 112x112"):
        model(torch.randn(1, 3, 112, 112))
    with pytest.raises(ValueError, match=r"\(N, 3, 112, 96\)"):
        model(torch.randn(1, 1, 112, 96))


@pytest.mark.parametrize("name", sorted(set(SMALL) - {"timm test_resnet"}))
@pytest.mark.parametrize("size", [(100, 100), (112, 120)])
def test_input_size_not_divisible_by_16_states_the_rule(name, size):
    with pytest.raises(ValueError, match=f"divisible by 16.*got {size[0]}x{size[1]}"):
        SMALL[name](input_size=size)


@pytest.mark.parametrize("family", [SphereNet, IResNet, TorchvisionResNet])
def test_unknown_depth_lists_the_allowed_depths(family):
    with pytest.raises(ValueError, match=r"depth must be one of \[.*\].*got 7"):
        family(depth=7)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_channels_last_gives_the_same_embeddings(name):
    torch.manual_seed(0)
    # Training mode: BatchNorm normalises with batch statistics, so the embeddings have the
    # magnitudes of a trained network (untrained running statistics would give ~1e5).
    model = SMALL[name](input_size=(32, 32)).train()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        contiguous = model(images)
        model.to(memory_format=torch.channels_last)
        nhwc = model(images.contiguous(memory_format=torch.channels_last))
    # Same math, different summation order in the convolution kernels.
    torch.testing.assert_close(nhwc, contiguous, rtol=1e-3, atol=1e-3)


def test_torch_compile_traces_the_whole_network_and_its_gradients():
    """One graph (no breaks, the input check included), same loss and gradients as eager.
    AOTAutograd traces forward and backward; inductor's C++ code generation takes ~40 s on a
    2-core CPU, so the compiled speed is measured in benchmarks.backbone_speed --compile."""
    torch.manual_seed(0)
    model = SphereNet(4, embedding_size=64, input_size=(32, 32))
    images = torch.randn(4, 3, 32, 32)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(images).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(images).square().sum().backward()
    for compiled_grad, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(compiled_grad, p.grad)
    with pytest.raises(Exception, match="built for 32x32 inputs but got 64x64"):
        compiled(torch.randn(1, 3, 64, 64))  # dynamo re-traces the new shape into our check


def test_spherenet_initialisation_follows_the_caffe_prototxt():
    torch.manual_seed(0)
    model = SphereNet(20)
    strided = [m for m in model.features if isinstance(m, nn.Conv2d)]
    residual = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m not in strided]
    for conv in strided:  # "xavier": uniform in ±sqrt(3 / fan_in), zero bias
        bound = (3 / conv.weight[0].numel()) ** 0.5
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
        assert not conv.bias.any()
    for conv in residual:  # "gaussian" std 0.01, bias frozen at zero = no bias
        assert conv.bias is None
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.05)
    fc5 = model.embedding[1]
    assert fc5.weight.abs().max() <= (3 / fc5.in_features) ** 0.5 and not fc5.bias.any()
    slopes = [m.weight for m in model.modules() if isinstance(m, nn.PReLU)]
    assert len(slopes) == 4 + 2 * 8 and all((s == 0.25).all() for s in slopes)


def test_iresnet_initialisation_and_frozen_embedding_scale():
    torch.manual_seed(0)
    model = IResNet(18)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert torch.cat([w.flatten() for w in convs]).std().item() == pytest.approx(0.1, rel=0.01)
    features = model.output[-1]
    assert not features.weight.requires_grad and (features.weight == 1).all()
    assert count_parameters(model) - count_parameters(model, trainable_only=True) == 512


def test_zero_init_residual_makes_every_unit_start_as_its_shortcut():
    torch.manual_seed(0)
    model = IResNet(18, zero_init_residual=True)
    x = torch.randn(2, 64, 28, 28)
    units = [m for m in model.modules() if isinstance(m, IRUnit)]
    with torch.no_grad():
        assert torch.equal(units[1](x), x)  # a stride-1 unit: exactly the identity


def test_fp16_keeps_the_embedding_layers_in_float32_inside_mixed_precision():
    torch.manual_seed(0)
    # 32x32: bfloat16 convolutions are emulated on CPUs without native support (64x64: ~18 s).
    full = IResNet(18, input_size=(32, 32)).eval()
    half = IResNet(18, input_size=(32, 32), fp16=True).eval()
    half.load_state_dict(full.state_dict())
    seen = {}
    half.body.register_forward_hook(lambda m, i, out: seen.update(body=out.dtype))
    half.output[3].register_forward_hook(lambda m, i, out: seen.update(fc=i[0].dtype))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(half(images), full(images))  # float32 on CPU, as arcface_torch
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as under trainer.precision=bf16-mixed
            embeddings = half(images)
    assert seen == {"body": torch.bfloat16, "fc": torch.float32}
    assert embeddings.dtype == torch.float32
    assert torch.cosine_similarity(embeddings, full(images).detach()).min() > 0.99


def test_timm_backbone_wraps_any_timm_model():
    model = TimmBackbone("test_resnet", embedding_size=128, input_size=(64, 64))
    assert model.embedding_size == 128
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 128)
    with pytest.raises(ValueError, match="no model named 'no_such_net'"):
        TimmBackbone("no_such_net")


def test_timm_vision_transformer_needs_its_image_size():
    fixed_size = {"dynamic_img_size": False}  # as most ViTs (test_vit's default is dynamic)
    with pytest.raises(ValueError, match="model_kwargs.img_size"):
        TimmBackbone("test_vit", input_size=(64, 64), model_kwargs=fixed_size)
    model = TimmBackbone(
        "test_vit", input_size=(64, 64), model_kwargs={**fixed_size, "img_size": [64, 64]}
    )
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 512)


def test_missing_timm_tells_the_user_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm raises
    with pytest.raises(ImportError, match=r'pip install -e "\.\[timm\]"'):
        TimmBackbone("resnet18")


# The interface every family keeps (facetrain.backbones.Backbone).

# The submodule names each family's checkpoints were saved under (state_dict key prefixes).
CHECKPOINT_PREFIXES = {
    "sphereface4": {"features", "embedding"},
    "mobilefacenet": {"features", "embedding"},
    "mbf": {"features", "embedding"},
    "iresnet18": {"body", "output"},
    "resnet18": {"body", "output"},
    "timm test_resnet": {"body", "output"},
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_family_is_a_body_then_an_embedding(name):
    torch.manual_seed(0)
    model = SMALL[name](input_size=(32, 32), embedding_size=64).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        embeddings = model.embedding(model.body(images))
        assert torch.equal(model(images), embeddings)
    assert embeddings.shape == (2, model.embedding_size) == (2, 64)
    assert model.input_size == (32, 32) and model.fp16 is False
    # The two parts are the whole network, and checkpoints keep their key names.
    parts = count_parameters(model.body) + count_parameters(model.embedding)
    assert parts == count_parameters(model)
    assert {key.split(".")[0] for key in model.state_dict()} == CHECKPOINT_PREFIXES[name]
    assert type(model).forward is Backbone.forward  # one input check, one fp16 code path


def dtypes_seen(model: nn.Module) -> dict:
    """Records, on every forward, the dtype the body returns and the embedding sees/returns."""
    seen = {}
    model.body.register_forward_hook(lambda m, i, out: seen.update(body=out.dtype))
    model.embedding.register_forward_hook(
        lambda m, i, out: seen.update(embedding_input=i[0].dtype, embedding=out.dtype)
    )
    return seen


@pytest.mark.parametrize("name", sorted(SMALL))
def test_fp16_means_the_same_on_every_family(name):
    """The arcface_torch recipe: the body under autocast, the embedding in float32 even inside
    an outer autocast; on the CPU nothing else changes (float32 stays float32)."""
    torch.manual_seed(0)
    full = SMALL[name](input_size=(32, 32)).eval()
    half = SMALL[name](input_size=(32, 32), fp16=True).eval()
    half.load_state_dict(full.state_dict())
    seen = dtypes_seen(half)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(half(images), full(images))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as trainer.precision=bf16-mixed
            half(images)
    assert seen == {"body": torch.bfloat16, "embedding_input": torch.float32,
                    "embedding": torch.float32}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocasts the body on CUDA only")
@pytest.mark.parametrize("name", sorted(SMALL))
def test_fp16_runs_the_body_in_float16_on_cuda(name):
    model = SMALL[name](input_size=(32, 32), fp16=True).cuda().eval()
    seen = dtypes_seen(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32, device="cuda"))
    assert seen == {"body": torch.float16, "embedding_input": torch.float32,
                    "embedding": torch.float32}


# create(name) and the config files.

# Every configs/backbone file as it was when each was flat (before the depth files inherited
# from a family file), composed with data.image_size=[112,96]: inheritance must give these.
ARCFACE_E_OPTIONS = {"embedding_size": 512, "input_size": [112, 96], "dropout": 0.0,
                     "fp16": False, "zero_init_residual": False}
FLAT_CONFIGS = {
    **{f"iresnet{depth}": {"_target_": "facetrain.backbones.IResNet", "depth": depth,
                           **ARCFACE_E_OPTIONS} for depth in (18, 34, 50, 100, 200)},
    **{f"resnet{depth}": {"_target_": "facetrain.backbones.TorchvisionResNet", "depth": depth,
                          **ARCFACE_E_OPTIONS} for depth in (18, 50)},
    **{f"sphereface{depth}": {"_target_": "facetrain.backbones.SphereNet", "depth": depth,
                              "embedding_size": 512, "input_size": [112, 96]}
       for depth in (4, 10, 20, 36, 64)},
    "mobilefacenet": {"_target_": "facetrain.backbones.MobileFaceNet", "embedding_size": 128,
                      "input_size": [112, 96]},
    "timm": {"_target_": "facetrain.backbones.TimmBackbone", "_convert_": "all",
             "model_name": "resnet18", "embedding_size": 512, "input_size": [112, 96],
             "pretrained": False, "dropout": 0.0, "model_kwargs": {}},
}


@functools.cache
def composed_by_hydra() -> dict[str, dict]:
    """The backbone group ``backbone=NAME data.image_size=[112,96]`` composes, for every name
    (the group alone: composing all of train.yaml 14 times costs ~10 s more, same group files)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir(), version_base="1.3"):
        return {
            name: OmegaConf.to_container(
                compose(overrides=[f"+backbone={name}", "+data.image_size=[112,96]"]).backbone,
                resolve=True,
            )
            for name in FLAT_CONFIGS
        }


@pytest.mark.parametrize("name", sorted(FLAT_CONFIGS))
def test_configs_compose_to_the_values_of_the_flat_files(name):
    assert composed_by_hydra()[name] == FLAT_CONFIGS[name]
    # load_config follows the same defaults lists without Hydra.
    root = OmegaConf.create({"data": {"image_size": [112, 96]}, "backbone": load_config(name)})
    assert OmegaConf.to_container(root.backbone, resolve=True) == FLAT_CONFIGS[name]


def test_load_config_merges_defaults_in_hydras_order(tmp_path, monkeypatch):
    """Where ``_self_`` stands decides who wins (last when absent), as Hydra composes the same
    files; a file's missing value (``???``) never replaces a value."""
    from hydra import compose, initialize_config_dir

    import facetrain.backbones.configs as configs

    group = tmp_path / "backbone"
    group.mkdir()
    files = {
        "base": "width: 1\ndepth: ???\nname: base\n",
        "after": "defaults: [base, _self_]\nwidth: 2\n",
        "before": "defaults: [_self_, base]\nwidth: 2\n",
        "implicit": "defaults: [base]\nwidth: 2\n",
        "two_levels": "defaults: [after, _self_]\ndepth: 3\n",
    }
    for name, text in files.items():
        (group / f"{name}.yaml").write_text(text)
    monkeypatch.setattr(configs, "config_folder", lambda: group)
    expected = {"after": (2, "???"), "before": (1, "???"), "implicit": (2, "???"),
                "two_levels": (2, 3)}
    with initialize_config_dir(str(tmp_path), version_base="1.3"):
        for name, (width, depth) in expected.items():
            by_hydra = compose(overrides=[f"+backbone={name}"]).backbone
            ours = configs.load_config(name)
            assert OmegaConf.to_container(ours) == OmegaConf.to_container(by_hydra)
            assert (ours.width, OmegaConf.to_container(ours)["depth"]) == (width, depth)


@pytest.mark.parametrize("name", sorted(FLAT_CONFIGS))
def test_create_builds_what_train_py_builds(name):
    with torch.device("meta"):
        ours = create(name, input_size=(112, 96))
        trained = instantiate(composed_by_hydra()[name])
    assert type(ours) is type(trained)
    assert ({k: v.shape for k, v in ours.state_dict().items()}
            == {k: v.shape for k, v in trained.state_dict().items()})


EXPECTED_CLASS = {"iresnet": IResNet, "sphereface": SphereNet, "resnet": TorchvisionResNet,
                  "mobilefacenet": MobileFaceNet, "mbf": ArcFaceMobileFaceNet,
                  "timm": TimmBackbone}


@pytest.mark.parametrize("name", available())
def test_create_builds_every_config_by_name(name):
    family = name.rstrip("0123456789")
    depth = {"iresnet": 34, "sphereface": 10, "resnet": 34}.get(name)  # family files: any depth
    with torch.device("meta"):
        model = create(name, fp16=True, **({"depth": depth} if depth else {}))
    assert type(model) is EXPECTED_CLASS[family]
    assert model.embedding_size == (128 if name == "mobilefacenet" else 512)
    assert model.input_size == ((112, 96) if family == "sphereface" else (112, 112))  # papers'
    assert model.fp16 is True
    if family != name:
        assert model.depth == int(name[len(family):])
    elif depth:
        assert model.depth == depth


def test_create_overrides_constructor_arguments():
    model = create("sphereface4", embedding_size=64, input_size=[32, 32])
    assert (model.embedding_size, model.input_size) == (64, (32, 32))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)


@pytest.mark.parametrize("call, message", [
    (lambda: create("iresnet51"),
     r"^unknown backbone 'iresnet51'; available: iresnet, iresnet100, .*sphereface20.*, timm$"),
    (lambda: create("iresnet50", depht=34),
     r"^IResNet \(backbone 'iresnet50'\) has no argument depht; its arguments: depth, .*fp16"),
    (lambda: create("sphereface"), r"sphereface\.yaml leaves depth to choose: "
                                   r"create\('sphereface', depth=\.\.\.\)$"),
    (lambda: create("iresnet50", depth=7), r"^IResNet depth must be one of \[18, 34, 50"),
])
def test_create_errors_are_one_line(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_train_sphereface4_with_a_softmax_learns(tiny_faces, tmp_path):
    """``python train.py backbone=sphereface4 loss=sphereface``: the paper's pair, end to end."""
    import json

    from helpers import run_cli, tiny_overrides

    run_dir = tmp_path / "run"
    result = run_cli(
        "train.py", *tiny_overrides(tiny_faces, run_dir), "backbone=sphereface4", "loss=sphereface",
        "trainer.max_epochs=2", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    trained = metrics["verification"]["synthetic"]["accuracy"]
    # Measured: untrained 0.685, trained 0.775-0.845 after two epochs (50 steps; CPU kernels
    # are not bit-deterministic from run to run).
    assert trained > metrics["baselines"]["untrained"]["synthetic"] + 0.05
