"""Every speed claim in one command: each benchmark's figures, a ratio to a baseline timed in the
same run, collected into ``benchmarks/results.json`` and the markdown table ``results.md``.

    python -m benchmarks --quick                  # every benchmark at its quick size (~10 min)
    python -m benchmarks --quick --only scan_speed eval_speed
    python -m benchmarks --quick --readme         # also put the table in README.md
    python -m benchmarks                          # full sizes: each module's full()
    python -m benchmarks --table-only --readme    # the README's table from results.json, no run

A benchmark is a module of this folder that defines ``quick() -> list[Figure]`` (the protocol in
``benchmarks/figures.py``); it is found by reading the source, not by importing it. Each one runs
in a fresh ``python`` process (its own threads, memory and imports; a crash or a hang is that
benchmark's failure, not the end of the run), one after the other so that none competes with
another for the cores. A failed benchmark is a row of the table and makes the exit status
non-zero; a ``Skip`` it raises (e.g. it needs a GPU) is a row and not a failure. Without
``--quick`` each module's ``full()`` runs (its command line's default sizes); a module without
one is skipped with a pointer to its own command line. ``--only`` writes results of just those.

``--readme`` replaces what README.md holds between the lines ``<!-- benchmarks:begin -->`` and
``<!-- benchmarks:end -->`` with the table and a line naming the machine it ran on. Each
benchmark's CPU time is recorded beside its wall time: on a machine others are using, it is the
better guide to what the run takes on idle cores, and ``--threads 1`` keeps OpenMP threads from
spin-waiting for a descheduled sibling (a 2-thread MobileFaceNet step took 4x the wall time of a
1-thread one on a 2-core machine at load 15).
"""

import argparse
import ast
import contextlib
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

from benchmarks.figures import Figure, Skip

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
NOT_BENCHMARKS = {"figures"}  # modules of this folder that are shared code, not benchmarks
OUTPUT_KEPT = 6000  # characters of each benchmark's printed output kept in results.json
TAIL_SHOWN = 15  # lines of a failed benchmark's output printed with the progress


def functions(path: Path) -> set[str]:
    """The names of the module's top-level functions, read from its source (not imported)."""
    tree = ast.parse(path.read_text(), str(path))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def discover(package: Path) -> list[str]:
    """The modules of ``package`` with a top-level ``def quick``, by name."""
    return [path.stem for path in sorted(package.glob("*.py"))
            if not path.stem.startswith("_") and path.stem not in NOT_BENCHMARKS
            and "quick" in functions(path)]


def check_figures(figures, name: str) -> list[dict]:
    """``figures`` as JSON-ready dicts, or a ``TypeError`` naming what is wrong with them."""
    if not isinstance(figures, list | tuple) or not all(isinstance(f, Figure) for f in figures):
        raise TypeError(f"{name}: quick()/full() must return a list of benchmarks.figures.Figure, "
                        f"got {type(figures).__name__}")
    for figure in figures:
        if not isinstance(figure.ratio, int | float) or not math.isfinite(figure.ratio):
            raise TypeError(f"{name}: figure {figure.name!r} has ratio {figure.ratio!r}, "
                            f"not a finite number")
    return [{**f.as_dict(), "ratio": float(f.ratio)} for f in figures]


def child(package: Path, name: str, quick: bool, result: Path) -> None:
    """In the benchmark's own process: import it, run it, write its figures (or its skip)."""
    sys.path.insert(0, str(package.parent))
    module = importlib.import_module(f"{package.name}.{name}")
    try:
        outcome = {"figures": check_figures(module.quick() if quick else module.full(), name)}
    except Skip as skip:
        outcome = {"skipped": str(skip)}
    torch = sys.modules.get("torch")
    if torch is not None:  # what the benchmark ran on, as it saw it
        outcome["torch"] = {
            "version": torch.__version__, "threads": torch.get_num_threads(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [],
        }
    result.write_text(json.dumps(outcome))


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def run_one(package: Path, name: str, quick: bool, timeout: float | None,
            threads: int | None) -> dict:
    """Run benchmark ``name`` in a fresh process; its outcome as one entry of results.json."""
    if not quick and "full" not in functions(package / f"{name}.py"):
        return {"name": name, "status": "skipped", "seconds": 0.0, "figures": [],
                "reason": f"no full(): full sizes are python -m {package.name}.{name}"}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(HERE.parent), str(package.parent), env.get("PYTHONPATH")])
    )
    if threads:  # read by torch (OpenMP), oneDNN/MKL and onnxruntime's default when they start
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix="facetrain-bench-") as folder:
        result, log = Path(folder) / "result.json", Path(folder) / "output.txt"
        command = [sys.executable, "-m", "benchmarks", "--child", name, "--package",
                   str(package), "--result", str(result), *(["--quick"] if quick else [])]
        start, cpu = time.perf_counter(), cpu_seconds()
        with log.open("w") as output:
            # its own session: a timeout or Ctrl-C ends the benchmark's worker processes too
            process = subprocess.Popen(command, cwd=package.parent, env=env, stdout=output,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:  # also after Ctrl-C, and for workers the benchmark left behind
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        seconds = time.perf_counter() - start
        text = log.read_text(errors="replace")
        entry = {"name": name, "seconds": round(seconds, 1),
                 "cpu_seconds": round(cpu_seconds() - cpu, 1), "output": text[-OUTPUT_KEPT:]}
        if returncode is None:
            return {**entry, "status": "failed", "figures": [],
                    "error": f"timed out after {timeout:.0f} s"}
        if returncode != 0 or not result.is_file():
            return {**entry, "status": "failed", "figures": [],
                    "error": f"exit status {returncode}: {last_line(text)}"}
        outcome = json.loads(result.read_text())
    entry["torch"] = outcome.get("torch")
    if "skipped" in outcome:
        return {**entry, "status": "skipped", "figures": [], "reason": outcome["skipped"]}
    return {**entry, "status": "ok", "figures": outcome["figures"]}


def cpu_seconds() -> float:
    """User + system CPU time of the finished child processes: on a shared machine, what a
    benchmark would take on idle cores is nearer this over the cores than its wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(entries: list[dict]) -> dict:
    """What the figures were measured on, for the reader of the table: the torch, threads and
    GPUs are as the first benchmark that imported torch saw them (this process does not import
    it: seconds on a loaded machine)."""
    seen = next((entry["torch"] for entry in entries if entry.get("torch")), None)
    if seen is None:
        try:
            seen = {"version": importlib.metadata.version("torch"), "threads": None, "gpus": None}
        except importlib.metadata.PackageNotFoundError:
            seen = {"version": None, "threads": None, "gpus": None}
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": seen["version"],
        "torch_threads": seen["threads"],
        "gpus": seen["gpus"],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def ratio_text(ratio: float) -> str:
    """Enough digits to tell the ratio from 1 (checkpoint overheads) or from 0 (memory)."""
    if abs(ratio - 1) < 0.01:
        return f"{ratio:.4f}x"
    return f"{ratio:.3g}x" if ratio < 0.1 else f"{ratio:.2f}x"


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def machine_line(results: dict) -> str:
    """One line naming the command, the machine, the commit and the time it all took."""
    m = results["machine"]
    threads = m["torch_threads"]
    threads = f", {threads} torch thread{'' if threads == 1 else 's'}" if threads else ""
    gpu = "GPU not checked" if m["gpus"] is None else ", ".join(m["gpus"]) or "no GPU"
    commit = m["commit"][:10] or "unknown commit"
    commit += " + local changes" if m["uncommitted_changes"] else ""
    minutes, seconds = divmod(round(results["total_seconds"]), 60)
    before, after = results["load_average"]
    return (f"`{results['command']}` on {m['cpu']} ({m['cpus_usable'] or m['cpus']} cores"
            f"{threads}), {gpu}; torch {m['torch']}, Python {m['python']}; commit {commit}, "
            f"{results['date']}; {minutes} min {seconds} s in all, {results['cpu_seconds']:.0f} "
            f"s of CPU (load average {before:.1f} at the start, {after:.1f} at the end).")


def markdown(results: dict) -> str:
    """The table the README's performance section is: one row per figure, failures included."""
    rows = ["| benchmark | figure | ratio | baseline | detail | aim |",
            "|---|---|---:|---|---|---|"]
    for entry in results["benchmarks"]:
        for f in entry["figures"]:
            rows.append(f"| {entry['name']} | {cell(f['name'])} | {ratio_text(f['ratio'])} | "
                        f"{cell(f['baseline'])} | {cell(f['detail'])} | {cell(f['aim'])} |")
        if entry["status"] != "ok":
            why = entry.get("error") or entry.get("reason")
            rows.append(f"| {entry['name']} | **{entry['status']}** | – |  | {cell(why)} |  |")
    return machine_line(results) + "\n\n" + "\n".join(rows) + "\n"


def readme_parts(readme: Path) -> tuple[str, str]:
    """README.md's text up to and including the begin line, and from the end line on."""
    if not readme.is_file():
        raise SystemExit(f"python -m benchmarks: --readme: {readme} does not exist")
    lines = readme.read_text().splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise SystemExit(f"python -m benchmarks: --readme: {readme} needs exactly one line "
                         f"{BEGIN} and, after it, one line {END} around the table "
                         f"(found {len(begins)} and {len(ends)})")
    return "".join(lines[: begins[0] + 1]), "".join(lines[ends[0]:])


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="Each benchmark also has its own command line: python -m benchmarks.NAME --help",
    )
    parser.add_argument("--quick", action="store_true",
                        help="each benchmark's quick() size (the whole set in about 10 minutes "
                             "on 2 CPU cores); default: each module's full()")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run just these benchmarks")
    parser.add_argument("--readme", nargs="?", const=HERE.parent / "README.md", type=Path,
                        metavar="PATH", help="write the table into README.md (or PATH) between "
                                             f"the lines {BEGIN} and {END}")
    parser.add_argument("--output", type=Path, default=HERE, metavar="DIR",
                        help="where results.json and results.md go (default: benchmarks/)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="per benchmark; a benchmark still running is killed and reported "
                             "(default: 900 with --quick, none without)")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: rebuild results.md (and with --readme the README's "
                             "table) from the results.json in --output")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="OMP_NUM_THREADS of every benchmark (default: as set, or torch's "
                             "default, one per core)")
    parser.add_argument("--package", type=Path, default=HERE, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the benchmark's own process
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    package = args.package.resolve()
    if args.child:
        child(package, args.child, args.quick, args.result)
        return 0

    if args.readme is not None:
        readme_parts(args.readme)  # a README without the markers fails now, not after the run
    if args.table_only:
        return write_table(load_results(args.output), args.output, args.readme)
    names = discover(package)
    if args.only:
        unknown = [name for name in args.only if name not in names]
        if unknown:
            raise SystemExit(f"python -m benchmarks: --only {' '.join(unknown)}: no such "
                             f"benchmark (with a quick()); choose from {', '.join(names)}")
        names = [name for name in names if name in args.only]
    timeout = args.timeout if args.timeout is not None else (900 if args.quick else None)
    command = " ".join(["python -m benchmarks", *(["--quick"] if args.quick else []),
                        *(["--only", *args.only] if args.only else []),
                        *([f"--threads {args.threads}"] if args.threads else [])])

    print(f"{command}: {len(names)} benchmarks, each in its own process", flush=True)
    start, load = time.perf_counter(), os.getloadavg()[0]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entries = []
    for number, name in enumerate(names, 1):
        print(f"[{number:>2}/{len(names)}] {name:<24}", end="", flush=True)
        entry = run_one(package, name, args.quick, timeout, args.threads)
        entries.append(entry)
        print(f"{entry['seconds']:7.1f} s ({entry['cpu_seconds']:.0f} s CPU)  "
              + (f"{len(entry['figures'])} figures" if entry["status"] == "ok" else
                 f"{entry['status'].upper()}: {entry.get('error') or entry.get('reason')}"),
              flush=True)
        if entry["status"] == "failed":
            tail = entry["output"].rstrip().splitlines()[-TAIL_SHOWN:]
            print("".join(f"        {line}\n" for line in tail), end="", flush=True)
    results = {
        "command": command, "date": date, "total_seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(sum(entry["cpu_seconds"] for entry in entries), 1),
        "load_average": [load, os.getloadavg()[0]], "machine": machine(entries),
        "figure_fields": [f.name for f in fields(Figure)], "benchmarks": entries,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    write_atomically(args.output / "results.json", json.dumps(results, indent=1) + "\n")
    write_table(results, args.output, args.readme)
    failed = [entry["name"] for entry in entries if entry["status"] == "failed"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


def load_results(output: Path) -> dict:
    path = output / "results.json"
    if not path.is_file():
        raise SystemExit(f"python -m benchmarks: --table-only: {path} does not exist; run "
                         f"python -m benchmarks --quick first")
    return json.loads(path.read_text())


def write_table(results: dict, output: Path, readme: Path | None) -> int:
    """results.md and, with ``readme``, its marked region, from ``results``."""
    table = markdown(results)
    write_atomically(output / "results.md", table)
    written = [output / "results.md"]
    if readme is not None:
        head, tail = readme_parts(readme)
        write_atomically(readme, head + table + tail)
        written.append(readme)
    print(f"\n{table}\nwrote {', '.join(map(str, written))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
