"""Where facetrain finds the files it ships beside its code.

It imports no other facetrain module, so that every layer (entry points, library, tests,
benchmarks) may use it without an import cycle.
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> str:
    """The Hydra config tree, by one rule: ``facetrain/configs/`` inside the package when it is
    there, else ``configs/`` beside the package.

    The repository keeps the tree at its top level (``configs/``); building a wheel copies it
    into the package as ``facetrain/configs/`` (``facetrain._build``, named in pyproject.toml),
    so ``pip install .``, an installed wheel and the Docker image find it from any folder, and
    a source checkout or an editable install (which has no ``facetrain/configs/``) finds the
    checkout's own tree.
    """
    packaged = PACKAGE_DIR / "configs"
    if packaged.is_dir():
        return str(packaged)
    return str(PACKAGE_DIR.parent / "configs")
