"""Where facetrain finds the files it ships beside its code (no facetrain imports: every layer
may use it)."""

from pathlib import Path


def config_dir() -> str:
    """The Hydra config tree: ``configs/`` of the source checkout."""
    return str(Path(__file__).resolve().parent.parent / "configs")
