"""Backbone weights trained elsewhere, loaded into a freshly built backbone
(``model.init_from=SOURCE``). ``load_backbone_weights(backbone, SOURCE)`` accepts:

- a facetrain checkpoint (``.ckpt``, or a training run folder): its ``backbone.*`` tensors;
  its head (class centers of other identities) and optimizer state are not used;
- an insightface arcface_torch ``backbone.pth``: the state dict of its ``iresnet18…200``
  (any ``layers``) or ``mbf`` MobileFaceNet (any ``blocks``/``scale``: ``mbf_large`` too), or
  its ``checkpoint_gpu_*.pt`` (``state_dict_backbone``). The architecture is read from the
  tensors and every name is mapped onto facetrain's :class:`~facetrain.backbones.IResNet` or
  :class:`~facetrain.backbones.ArcFaceMobileFaceNet` (``backbone=iresnet50``, ``backbone=mbf``);
- a state dict of the configured facetrain backbone itself (the same tensor names);
- ``timm:NAME`` (or a bare timm pretrained name such as ``resnet18.a1_in1k``): timm's weights
  for the body of a ``backbone=timm`` network, from the local Hugging Face / torch hub cache;
  nothing is downloaded during a run.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only. A
file whose tensors do not fit the configured backbone is refused with one line naming the
first mismatching tensors and, for a recognised architecture, the ``backbone=`` that fits it.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from facetrain.backbones import available, load_config
from facetrain.backbones.iresnet import UNITS_PER_STAGE
from facetrain.checkpoint import (
    METADATA_KEY,
    CheckpointError,
    find_checkpoint,
    read_checkpoint,
    safe_load,
    state_dict_mismatch,
)

WEIGHT_FILES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar")
# Constructor arguments that change no tensor: left out of the backbone= a refusal suggests.
NOT_IN_TENSORS = {"fp16", "dropout", "zero_init_residual", "pretrained", "_convert_"}


def load_backbone_weights(backbone: nn.Module, source: str | Path) -> str:
    """Load ``source`` (see the module docstring) into ``backbone`` in place; return the one
    line that says what was loaded, e.g. ``init_from: arcface_torch r50 (512-D) backbone.pth as
    IResNet-50 (all 475 tensors)``. Raises :class:`CheckpointError` (one line) otherwise."""
    text = str(source)
    path = Path(text).expanduser()
    timm_name = _timm_name(text, path)
    if timm_name is not None:
        return _load_timm(backbone, timm_name)
    if not path.exists():
        raise CheckpointError(
            f"model.init_from={text}: no such file or folder; give a facetrain checkpoint (.ckpt "
            f"or run folder), an arcface_torch backbone.pth, or timm:NAME"
        )
    if path.is_dir() or path.suffix == ".ckpt":
        return _load_facetrain(backbone, path)
    state = _unwrap(read_weights(path), path)
    if state is None:  # a facetrain checkpoint under another suffix
        return _load_facetrain(backbone, path)
    if set(state) == set(backbone.state_dict()):  # torch.save(backbone.state_dict(), path)
        mismatch = state_dict_mismatch(backbone, state)
        if mismatch:
            raise CheckpointError(f"model.init_from={path}: its tensors are named as the "
                                  f"configured backbone's ({_name(backbone)}) but {mismatch}")
        _load(backbone, state, f"{path}: ")
        return f"init_from: {path.name} ({_name(backbone)} state dict, all {len(state)} tensors)"
    layout = detect_arcface_torch(state)
    if layout is None:
        raise CheckpointError(
            f"model.init_from={path}: its {len(state)} tensors are neither the configured "
            f"backbone's ({_name(backbone)}) nor an arcface_torch iresnet / mbf state dict; first "
            f"mismatching tensors: {state_dict_mismatch(backbone, state)}"
        )
    mapped = {layout.rename[key]: value for key, value in state.items()}
    mismatch = state_dict_mismatch(backbone, mapped)
    if mismatch:
        raise CheckpointError(
            f"model.init_from={path} holds an arcface_torch {layout.name}, which the configured "
            f"backbone ({_name(backbone)}) does not fit: run with "
            f"{suggest_backbone(layout.config, backbone)} (tensors as facetrain names them: "
            f"{mismatch})"
        )
    _load(backbone, mapped, f"{path}: ")
    return (f"init_from: arcface_torch {layout.name} {path.name} as {_name(backbone)} "
            f"(all {len(state)} tensors)")


def read_weights(path: Path) -> dict:
    """A weights file as plain containers of tensors: ``torch.load(weights_only=True)`` (memory
    mapped when the file is a zip, as ``torch.save`` writes them), or safetensors."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as error:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
    return safe_load(path, what="file")


def _unwrap(loaded, path: Path) -> dict[str, torch.Tensor] | None:
    """The state dict inside what a file holds, or None for a facetrain checkpoint."""
    if isinstance(loaded, dict) and "state_dict" in loaded and METADATA_KEY in loaded:
        return None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict_backbone"), dict):
        loaded = loaded["state_dict_backbone"]  # arcface_torch's checkpoint_gpu_<rank>.pt
    elif isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not (isinstance(loaded, dict) and loaded
            and all(isinstance(v, torch.Tensor) for v in loaded.values())):
        raise CheckpointError(f"model.init_from={path}: not a state dict (a mapping of tensor "
                              f"names to tensors), nor a checkpoint holding one")
    if all(key.startswith("module.") for key in loaded):  # saved from a DDP-wrapped network
        loaded = {key.removeprefix("module."): value for key, value in loaded.items()}
    return loaded


def _load_facetrain(backbone: nn.Module, path: Path) -> str:
    path = find_checkpoint(path)  # a run folder: its best checkpoint, as facetrain-eval takes
    checkpoint = read_checkpoint(path)
    stored = checkpoint[METADATA_KEY]
    state = {key.removeprefix("backbone."): value
             for key, value in checkpoint["state_dict"].items() if key.startswith("backbone.")}
    mismatch = state_dict_mismatch(backbone, state)
    if mismatch:
        config = dict(stored.get("backbone") or {})
        raise CheckpointError(
            f"model.init_from={path}: its backbone ({config.get('_target_', '?')}) does not fit "
            f"the configured one ({_name(backbone)}): run with "
            f"{suggest_backbone(config, backbone)} (tensors: {mismatch})"
        )
    _load(backbone, state, f"{path}: ")
    step = checkpoint.get("global_step")
    return (f"init_from: facetrain checkpoint {path} (step {step}): its backbone, "
            f"{_name(backbone)}, all {len(state)} tensors; its head and optimizer are not used")


def _load(backbone: nn.Module, state: dict, where: str) -> None:
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:  # what the checks before cannot see, e.g. a dtype it refuses
        raise CheckpointError(f"{where}{' '.join(str(error).split())}") from None


def _name(backbone: nn.Module) -> str:
    return getattr(backbone, "architecture", type(backbone).__name__)


# arcface_torch state dicts ------------------------------------------------------------------

# arcface_torch iresnet.py names → facetrain IResNet's (body: stem + units, output: option E).
IRESNET_TOP = {"conv1": "body.0", "bn1": "body.1", "prelu": "body.2", "bn2": "output.0",
               "fc": "output.3", "features": "output.4"}
IRESNET_UNIT = {"bn1": "body.0", "conv1": "body.1", "bn2": "body.2", "prelu": "body.3",
                "conv2": "body.4", "bn3": "body.5", "downsample.0": "shortcut.0",
                "downsample.1": "shortcut.1"}
ARCFACE_DEPTHS = {units: depth for depth, units in UNITS_PER_STAGE.items()}


@dataclass
class ArcFaceTorchLayout:
    """An arcface_torch network recognised from its tensors: its name there (``r50``,
    ``mbf``), the facetrain backbone config that builds it, and the name of each tensor in it."""

    name: str
    config: dict
    rename: dict[str, str] = field(repr=False)


def detect_arcface_torch(state: dict[str, torch.Tensor]) -> ArcFaceTorchLayout | None:
    """The arcface_torch iresnet or mbf whose state dict ``state`` is, or None."""
    for detect in (_iresnet_layout, _mbf_layout):
        layout = detect(state)
        if layout is not None and len(set(layout.rename.values())) == len(state):
            return layout
    return None


def _iresnet_layout(state) -> ArcFaceTorchLayout | None:
    if not {"conv1.weight", "layer1.0.conv1.weight", "fc.weight"} <= set(state):
        return None
    parsed = {}  # key → (stage, unit index, module inside the unit, parameter); stage 0: top
    for key in state:
        module, parameter = key.rsplit(".", 1)
        if unit := re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", module):
            parsed[key] = (int(unit[1]), int(unit[2]), unit[3], parameter)
        else:
            parsed[key] = (0, 0, module, parameter)
        stage, _, module, _ = parsed[key]
        if module not in (IRESNET_UNIT if stage else IRESNET_TOP):
            return None
    units = [1 + max((i for s, i, _, _ in parsed.values() if s == stage), default=-1)
             for stage in (1, 2, 3, 4)]
    rename = {
        key: f"body.{3 + sum(units[:stage - 1]) + i}.{IRESNET_UNIT[module]}.{parameter}" if stage
        else f"{IRESNET_TOP[module]}.{parameter}"
        for key, (stage, i, module, parameter) in parsed.items()
    }
    embedding_size, flat = state["fc.weight"].shape
    side = round((flat / 512) ** 0.5)  # arcface_torch's FC takes the 512 x 7 x 7 map
    depth = ARCFACE_DEPTHS.get(tuple(units), 2 * sum(units) + 2)  # iresnet200 has 198 layers
    config = {"_target_": "facetrain.backbones.IResNet", "depth": depth,
              "embedding_size": int(embedding_size), "input_size": [16 * side, 16 * side]}
    name = f"r{depth}" if tuple(units) in ARCFACE_DEPTHS else f"iresnet layers={units}"
    if tuple(units) not in ARCFACE_DEPTHS:
        config["units"] = units
    return ArcFaceTorchLayout(f"{name} ({embedding_size}-D)", config, rename)


def _mbf_layout(state) -> ArcFaceTorchLayout | None:
    if not {"layers.0.layers.0.weight", "conv_sep.layers.0.weight",
            "features.layers.2.weight"} <= set(state):
        return None
    # arcface_torch mobilefacenet.py: layers.<i> is a ConvBlock (.layers.<m>), a DepthWise
    # unit (.layers.<k>.layers.<m>) or a Residual stack of them (.layers.<j>.layers.<k>...):
    # 0 the stem conv, 1 its second conv or a stack, then a strided unit and a stack per stage
    # (an empty stack has no tensors). facetrain's features hold the same units flat.
    kinds, units, parsed = {}, {}, {}
    for key in state:
        *path, parameter = key.split(".")
        indices = path[1::2]  # (i, m), (i, k, m) or (i, j, k, m)
        if (len(path) % 2 or not 2 <= len(indices) <= 4 or set(path[0::2]) != {"layers"}
                or not all(index.isdigit() for index in indices)):
            continue  # conv_sep and features: below
        i, *inner = (int(index) for index in indices)
        kind = {2: "block", 3: "unit", 4: "stack"}[len(indices)]
        j = inner.pop(0) if kind == "stack" else 0
        rest = ".".join(map(str, inner)) if kind == "block" else "body." + ".".join(map(str, inner))
        if kinds.setdefault(i, kind) != kind:
            return None
        units[i] = max(units.get(i, 0), j + 1)
        parsed[key] = (i, j, f"{rest}.{parameter}")
    expected = {0: {"block"}, 1: {"block", "stack"}, 2: {"unit"}, 3: {"stack"}, 4: {"unit"},
                5: {"stack"}, 6: {"unit"}, 7: {"stack"}}
    if any(kinds.get(i, "stack") not in allowed for i, allowed in expected.items()) \
            or not set(kinds) <= set(expected):
        return None
    start, position = {}, 0
    for i in expected:
        start[i] = position
        position += units.get(i, 0)
    rename = {key: f"features.{start[i] + j}.{rest}" for key, (i, j, rest) in parsed.items()}
    tail = {r"conv_sep\.layers\.(\d+)": "embedding.0.{}",
            r"features\.layers\.0\.layers\.(\d+)": "embedding.1.{}",
            r"features\.layers\.2": "embedding.3", r"features\.layers\.3": "embedding.4"}
    for key in state:
        if key in rename:
            continue
        module, parameter = key.rsplit(".", 1)
        for pattern, name in tail.items():
            if match := re.fullmatch(pattern, module):
                rename[key] = f"{name.format(*match.groups())}.{parameter}"
                break
        else:
            return None
    blocks = [1 if kinds.get(1) == "block" else units.get(1, 0)] + [
        units.get(i, 0) for i in (3, 5, 7)]
    scale = state["layers.0.layers.0.weight"].shape[0] // 64
    embedding_size = state["features.layers.2.weight"].shape[0]
    kernel = state["features.layers.0.layers.0.weight"].shape[-2:]
    config = {"_target_": "facetrain.backbones.ArcFaceMobileFaceNet",
              "embedding_size": int(embedding_size), "blocks": blocks, "scale": int(scale),
              "input_size": [16 * kernel[0], 16 * kernel[1]]}
    name = {((1, 4, 6, 2), 2): "mbf", ((2, 8, 12, 4), 4): "mbf_large"}.get(
        (tuple(blocks), scale), f"mbf blocks={blocks} scale={scale}")
    return ArcFaceTorchLayout(f"{name} ({embedding_size}-D)", config, rename)


def suggest_backbone(config: dict, backbone: nn.Module | None = None) -> str:
    """The overrides that build ``config`` (a backbone config with plain values): the
    ``configs/backbone`` file of its class needing the fewest overrides, then those, e.g.
    ``backbone=iresnet100`` or ``backbone=mbf backbone.embedding_size=128``, and
    ``data.image_size=[H,W]`` when ``backbone`` was built for another input size."""
    target = config.get("_target_")
    wanted = {k: v for k, v in config.items()
              if k not in NOT_IN_TENSORS | {"_target_", "input_size"}}
    best = None
    for name in available():
        candidate = OmegaConf.to_container(load_config(name))  # "???" where it must be given
        if candidate.get("_target_") != target:
            continue
        overrides = []
        for key, value in wanted.items():
            if key not in candidate:
                overrides.append(f"+backbone.{key}={_cli(value)}")
            elif candidate[key] != value:
                overrides.append(f"backbone.{key}={_cli(value)}")
        if best is None or (len(overrides), len(name)) < (len(best[1]), len(best[0])):
            best = (name, overrides)
    if best is None:
        return f"a backbone config with _target_ {target} and {wanted}"
    words = [f"backbone={best[0]}", *best[1]]
    size = config.get("input_size")
    if size and backbone is not None and list(getattr(backbone, "input_size", size)) != list(size):
        words.append(f"data.image_size={_cli(size)}")
    return " ".join(words)


def _cli(value) -> str:
    return f"[{','.join(str(v) for v in value)}]" if isinstance(value, list | tuple) else str(value)


# timm --------------------------------------------------------------------------------------

def _timm_name(text: str, path: Path) -> str | None:
    """The timm pretrained name ``text`` means (``timm:NAME``, or a bare name timm knows that
    is not a file here), or None for a path."""
    if text.startswith("timm:"):
        return text.removeprefix("timm:")
    if path.exists() or "/" in text or text.endswith(WEIGHT_FILES):
        return None
    try:
        import timm
    except ImportError:
        return None
    return text if timm.models.get_pretrained_cfg(text) is not None else None


def _load_timm(backbone: nn.Module, name: str) -> str:
    from facetrain.backbones import TimmBackbone
    from facetrain.backbones.timm_backbone import import_timm

    try:
        timm = import_timm()
    except ImportError as error:
        raise CheckpointError(f"model.init_from=timm:{name}: {error}") from None
    architecture, _ = timm.models.split_model_name_tag(name)
    pretrained = timm.models.get_pretrained_cfg(name)
    if pretrained is None:
        raise CheckpointError(
            f"model.init_from=timm:{name}: timm has no pretrained weights of that name; list "
            f"them with python -c \"import timm; print(timm.list_pretrained('{architecture}*'))\""
        )
    if not isinstance(backbone, TimmBackbone) or backbone.model_name != architecture:
        raise CheckpointError(
            f"model.init_from=timm:{name} holds a timm {architecture}; the configured backbone is "
            f"{_name(backbone)}: run with backbone=timm backbone.model_name={architecture}"
        )
    file = _cached_timm_weights(pretrained)
    if file is None:
        raise CheckpointError(
            f"model.init_from=timm:{name}: its weights are not in the local cache (Hugging Face "
            f"hub cache, HF_HUB_CACHE; torch hub checkpoints) and facetrain does not download "
            f"during a run; fetch them once where there is network access: python -c \"import "
            f"timm; timm.create_model('{name}', pretrained=True)\""
        )
    body = timm.create_model(name, pretrained=True, num_classes=0,
                             pretrained_cfg_overlay={"file": str(file)}, **backbone.model_kwargs)
    state = body.state_dict()
    mismatch = state_dict_mismatch(backbone.body, state)
    if mismatch:
        raise CheckpointError(f"model.init_from=timm:{name}: its weights do not fit the body of "
                              f"{_name(backbone)}: {mismatch}")
    _load(backbone.body, state, f"timm {name}: ")
    return (f"init_from: timm {name} pretrained weights ({file}) into the body of "
            f"{_name(backbone)}, all {len(state)} tensors; the embedding layer is new")


def _cached_timm_weights(pretrained) -> Path | None:
    """The locally cached weight file of a timm pretrained config, without network access."""
    if pretrained.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = pretrained.hf_hub_id.partition("@")
        names = ([pretrained.hf_hub_filename] if pretrained.hf_hub_filename
                 else ["model.safetensors", "pytorch_model.bin"])
        for filename in names:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    if pretrained.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(pretrained.url).name
        if cached.is_file():
            return cached
    return None
