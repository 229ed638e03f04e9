"""Rewrite constraints.txt: the exact versions, in this environment, of facetrain's dependency
closure (its requirements with the ``dev`` and ``timm`` extras, their requirements, and so on).

Run it after a deliberate upgrade, once the tests pass on the upgraded environment:

    pip install -U -e ".[dev]"           # or upgrade the one package you mean to
    pytest                               # the new versions must pass before they are pinned
    python scripts/refresh_constraints.py

and commit constraints.txt with the change that needed it. Installs then reproduce the tested
set: ``pip install -e ".[dev]" -c constraints.txt`` (.ci/run and the Dockerfile do).

Only installed distributions that facetrain's requirements reach are written, so the file
holds no unrelated packages of this environment. Requirements whose markers do not apply here
(another OS, another Python) are not followed; the pins are those of the platform they were
made on (see the header this writes).
"""

import platform
import re
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement

PROJECT = "facetrain"
EXTRAS = ("dev", "timm")
OUTPUT = Path(__file__).resolve().parent.parent / "constraints.txt"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(project: str, extras: tuple[str, ...]) -> dict[str, str]:
    """{distribution name: installed version} of everything ``project[extras]`` requires here."""
    pins: dict[str, str] = {}
    pending = [(project, set(extras))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, wanted = pending.pop()
        if (canonical(name), frozenset(wanted)) in seen:
            continue
        seen.add((canonical(name), frozenset(wanted)))
        try:
            found = distribution(name)
        except PackageNotFoundError:
            sys.exit(f"refresh_constraints: {name} is required but not installed; install it "
                     f"(pip install -e \".[dev]\") before pinning")
        if canonical(name) != canonical(project):
            pins[canonical(found.metadata["Name"])] = found.version
        for line in found.requires or []:
            requirement = Requirement(line)
            applies = requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in wanted | {""}
            )
            if applies:
                pending.append((requirement.name, set(requirement.extras)))
    return pins


def main() -> None:
    pins = closure(PROJECT, EXTRAS)
    header = (
        f"# Exact versions of facetrain's dependency closure (extras: {', '.join(EXTRAS)}),\n"
        f"# as installed and tested on Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}.\n"
        "# Use: pip install -e \".[dev]\" -c constraints.txt\n"
        "# Refresh, after an upgrade that passes the tests: python scripts/refresh_constraints.py\n"
    )
    OUTPUT.write_text(header + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins)))
    print(f"wrote {len(pins)} pins to {OUTPUT}")


if __name__ == "__main__":
    main()
