"""Backbones by name: ``create("iresnet50")`` builds ``configs/backbone/iresnet50.yaml`` as
``python train.py backbone=iresnet50`` does, without Hydra's global state (usable inside a
Hydra run, a test or a notebook alike)."""

import inspect
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from facetrain.backbones.layers import Backbone
from facetrain.resources import config_dir


def config_folder() -> Path:
    return Path(config_dir()) / "backbone"


def available() -> list[str]:
    """The names ``create`` and ``backbone=NAME`` accept: every ``configs/backbone/*.yaml``
    (the family files ``iresnet``, ``sphereface``, ``resnet`` too: they need a ``depth``)."""
    return sorted(path.stem for path in config_folder().glob("*.yaml"))


def load_config(name: str) -> DictConfig:
    """``configs/backbone/NAME.yaml`` merged over the files its ``defaults:`` list names, in
    Hydra's order: each entry is another file of the same folder, ``_self_`` is where the file's
    own keys go (last when absent, as in Hydra 1.1+). Interpolations such as
    ``${data.image_size}`` stay unresolved."""
    return _compose(name, ())


def _compose(name: str, chain: tuple[str, ...]) -> DictConfig:
    path = config_folder() / f"{name}.yaml"
    if not path.is_file():
        where = (f"{config_folder() / chain[-1]}.yaml: defaults entry {name!r}" if chain
                 else f"unknown backbone {name!r}")
        raise ValueError(f"{where}; available: {', '.join(available())}")
    if name in chain:
        raise ValueError(f"{path}: the defaults lists loop: {' -> '.join((*chain, name))}")
    own = OmegaConf.load(path)
    defaults = list(own.pop("defaults", []))
    parts = []
    for entry in defaults if "_self_" in defaults else [*defaults, "_self_"]:
        if not isinstance(entry, str):
            raise ValueError(f"{path}: defaults entries name files of configs/backbone or "
                             f"_self_, got {entry!r}")
        parts.append(own if entry == "_self_" else _compose(entry, (*chain, name)))
    return OmegaConf.merge(*parts)


def create(name: str, **overrides) -> Backbone:
    """Build backbone ``name`` (a ``configs/backbone`` file) with ``overrides`` replacing its
    constructor arguments, e.g. ``create("sphereface20", embedding_size=256)``.

    ``input_size`` is ``${data.image_size}`` in the files, the training run's image size, which
    is unknown here: unless given, the constructor's default applies, the paper's input size
    (SphereFace 112x96, the others 112x112).
    """
    config = load_config(name)
    for key in list(config):
        if key not in overrides and OmegaConf.is_interpolation(config, key):
            del config[key]
    target = get_class(config._target_)
    parameters = inspect.signature(target).parameters
    unknown = sorted(set(overrides) - set(parameters))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        raise ValueError(
            f"{target.__name__} (backbone {name!r}) has no argument {', '.join(unknown)}; "
            f"its arguments: {', '.join(parameters)}"
        )
    missing = [key for key in config if OmegaConf.is_missing(config, key) and key not in overrides]
    if missing:
        raise ValueError(
            f"{config_folder() / name}.yaml leaves {', '.join(missing)} to choose: "
            f"create({name!r}, {missing[0]}=...)"
        )
    try:
        return instantiate(config, **overrides)
    except InstantiationException as error:
        if isinstance(error.__cause__, ValueError):  # the constructor's own one-line message
            raise error.__cause__ from None
        raise
