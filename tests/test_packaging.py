"""The package as users install it: console scripts and ``python -m`` run the same mains, and
a wheel carries the config tree, so its console scripts run from any folder."""

import json
import shutil
import site
import subprocess
import sys
import venv
from importlib import import_module
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run_cli, tiny_overrides

from facetrain import resources


def test_every_console_script_is_a_cli_main():
    """``facetrain-NAME`` = ``python -m facetrain.cli.NAME``: the script names that module's own
    ``main`` (the one its ``__main__`` block calls)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"facetrain-train", "facetrain-eval", "facetrain-embed", "facetrain-export"} <= set(
        scripts
    )
    for script, target in scripts.items():
        module, _, function = target.partition(":")
        assert callable(getattr(import_module(module), function)), target
        if module.startswith("facetrain.cli."):
            assert (module, function) == (f"facetrain.cli.{script.removeprefix('facetrain-')}",
                                          "main"), f"{script} = {target}"
            source = (REPO / Path(*module.split("."))).with_suffix(".py").read_text()
            assert 'if __name__ == "__main__":\n    main()' in source, module


def test_config_dir_prefers_the_packaged_tree(tmp_path, monkeypatch):
    assert resources.config_dir() == str(REPO / "configs")  # a checkout: no facetrain/configs
    package = tmp_path / "site-packages" / "facetrain"
    (package / "configs").mkdir(parents=True)
    monkeypatch.setattr(resources, "PACKAGE_DIR", package)
    assert resources.config_dir() == str(package / "configs")


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """A virtual environment outside the repository holding facetrain from a freshly built wheel
    (dependencies from the system's site-packages, nothing downloaded). The wheel is built from
    a copy of the sources, so no build folders appear in the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("facetrain", "configs"):
        shutil.copytree(REPO / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"),
                    str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (root / "dist").glob("facetrain-*.whl")

    environment = root / "venv"
    venv.create(environment, system_site_packages=True, with_pip=False)
    python = environment / "bin" / "python"
    # Run from a virtual environment, the dependencies are in its site-packages, which the new
    # venv (based on the base interpreter) does not see: list them after its own, as plain paths
    # (their .pth files, such as the checkout's editable install, are not processed).
    (site_packages,) = environment.glob("lib/python*/site-packages")
    (site_packages / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # The venv has no pip of its own: the system's runs, installing into the venv's prefix.
    # --ignore-installed: the system's (editable) facetrain is seen but neither used nor touched.
    subprocess.run([str(python), *pip[1:], "install", "--no-deps", "--no-index",
                    "--ignore-installed", str(wheel)], check=True, capture_output=True,
                   timeout=300)
    return environment


def installed_paths(environment: Path, cwd: Path) -> tuple[Path, Path]:
    """Where the venv's Python, isolated from this checkout, imports facetrain and its configs."""
    result = subprocess.run(
        [str(environment / "bin" / "python"), "-I", "-c",
         "import facetrain, facetrain.resources as r; print(facetrain.__file__); "
         "print(r.config_dir())"],
        cwd=cwd, capture_output=True, text=True, check=True, timeout=120,
    )
    package, configs = result.stdout.split()
    return Path(package), Path(configs)


@pytest.mark.slow
def test_wheel_console_scripts_train_and_evaluate_from_any_folder(
    installed_wheel, tiny_faces, tmp_path
):
    package, configs = installed_paths(installed_wheel, tmp_path)
    assert package.is_relative_to(installed_wheel) and configs.is_relative_to(installed_wheel)
    assert configs == package.parent / "configs"
    shipped = sorted(p.relative_to(configs) for p in configs.rglob("*.yaml"))
    assert shipped == sorted(p.relative_to(REPO / "configs")
                             for p in (REPO / "configs").rglob("*.yaml"))

    run_dir = tmp_path / "run"
    result = run_cli(
        "train", *tiny_overrides(tiny_faces, run_dir), "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3", "measure_baselines=false", "logger=none",
        cwd=tmp_path, venv=installed_wheel,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Hydra records where it read the config tree: the wheel's copy, not this checkout's.
    sources = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"][
        "config_sources"]
    main = next(s for s in sources if s["provider"] == "main")
    assert Path(main["path"]) == configs
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 3

    out = tmp_path / "eval"
    result = run_cli("eval", f"checkpoint={run_dir}", f"hydra.run.dir={out}", "num_workers=0",
                     cwd=tmp_path, venv=installed_wheel)
    assert result.returncode == 0, result.stderr[-3000:]
    (evaluated,) = json.loads((out / "metrics.json").read_text())["checkpoints"].values()
    assert Path(evaluated["path"]).parent == run_dir / "checkpoints"
    assert evaluated["sets"]["synthetic"]["num_pairs"] == tiny_faces.num_pairs


def test_constraints_pin_every_requirement_within_its_range():
    """constraints.txt (scripts/refresh_constraints.py) must satisfy pyproject.toml: an install
    with ``-c constraints.txt`` fails when a pin falls outside a requirement's range."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = (REPO / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert all(canonicalize_name(name) == name for name in pins), "names as pip writes them"
    required = [*project["dependencies"], *project["optional-dependencies"]["dev"],
                *project["optional-dependencies"]["timm"]]
    for line in required:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is required but not pinned"
        assert requirement.specifier.contains(pins[name], prereleases=True), (line, pins[name])
