"""What a benchmark reports to ``python -m benchmarks``: figures, each a ratio to a baseline.

Every benchmark module keeps its own command line (``python -m benchmarks.NAME --help``) and
also defines ``quick() -> list[Figure]``: the same measurement at a size that lets the whole set
run in about 10 minutes on 2 CPU cores. ``python -m benchmarks`` calls each ``quick()`` and
writes ``benchmarks/results.json`` and the markdown table the README's performance section is.
A module may also define ``full() -> list[Figure]``, its command line's default sizes, which
``python -m benchmarks`` without ``--quick`` runs, and raise ``Skip`` where it cannot run.
"""

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Figure:
    """One measured ratio. ``ratio`` = measured / baseline, both timed in the same run."""

    benchmark: str  # the module's name, e.g. "head_speed"
    name: str  # what was measured, e.g. "arcface fwd+bwd, C=100k, D=512, batch 128"
    ratio: float
    baseline: str  # what the ratio divides by, e.g. "F.linear + cross-entropy"
    detail: str = ""  # the absolute numbers behind the ratio, for the reader ("12.1 ms / 8.3 ms")
    aim: str = ""  # the target an issue set, if any, e.g. "<= 1.15x"

    def as_dict(self) -> dict:
        return asdict(self)


class Skip(Exception):
    """Raised by ``quick()`` when the benchmark cannot run here (e.g. it needs a GPU): the
    message is the table's row, and the run does not count as failed."""
