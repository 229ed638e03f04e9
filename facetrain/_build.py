"""Build hook, named in pyproject.toml ([tool.setuptools.cmdclass]): the repository's top-level
``configs/`` ships inside the package as ``facetrain/configs/``, where
``facetrain.resources.config_dir()`` looks first.

setuptools' package discovery walks ``facetrain/`` only, so the tree is added here as one more
package, mapped to ``configs/``, whose YAML files are its package data. Wheels and sdists both
take their file lists from build_py, so both carry it; an editable install maps the package to
the checkout's ``configs/`` itself, edited in place.
"""

from setuptools.command.build_py import build_py

CONFIG_PACKAGE = "facetrain.configs"
CONFIG_SOURCE = "configs"


class BuildPy(build_py):
    def finalize_options(self) -> None:
        dist = self.distribution
        if CONFIG_PACKAGE not in dist.packages:
            dist.packages.append(CONFIG_PACKAGE)
        dist.package_dir = {**(dist.package_dir or {}), CONFIG_PACKAGE: CONFIG_SOURCE}
        dist.package_data = {**(dist.package_data or {}), CONFIG_PACKAGE: ["**/*.yaml"]}
        super().finalize_options()
