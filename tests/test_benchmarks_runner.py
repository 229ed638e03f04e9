"""``python -m benchmarks`` on a package of small stand-in benchmarks: what it writes
(results.json, results.md, the README's marked region), how it reports a failure, a skip and a
hang, and the one-line refusals, without running a real benchmark."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import REPO

BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"

MODULES = {
    "__init__": "",
    "good": '''
        from benchmarks.figures import Figure

        def quick():
            return [Figure("good", "step | fused", 0.5, "plain step", "5 ms vs 10 ms", "<= 1x"),
                    Figure("good", "cached start", 0.0123, "first scan")]

        def full():
            return [Figure("good", "step | fused, full size", 2.0, "plain step")]
    ''',
    "broken": '''
        def quick():
            raise RuntimeError("boom from broken")
    ''',
    "skipped": '''
        from benchmarks.figures import Skip

        def quick():
            raise Skip("needs CUDA")
    ''',
    "nan_ratio": '''
        from benchmarks.figures import Figure

        def quick():
            return [Figure("nan_ratio", "x", float("nan"), "y")]
    ''',
    "hang": '''
        import os, subprocess, sys, time

        def quick():  # a benchmark stuck with a worker process of its own
            worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            open(os.environ["WORKER_PID_FILE"], "w").write(str(worker.pid))
            time.sleep(120)
    ''',
    "helper": '''
        def shared():  # no quick(): not a benchmark
            return 1
    ''',
}
README = f"# Project\n\nintro\n\n## Performance\n\nprose before\n{BEGIN}\nold table\n{END}\nafter\n"


@pytest.fixture
def package(tmp_path) -> Path:
    root = tmp_path / "fakebench"
    root.mkdir()
    for name, source in MODULES.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    return root


def runner(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                              environment.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=120)


def dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in "ZX"  # a zombie has ended; its parent (init) has not reaped it yet


def test_run_writes_results_reports_failures_and_fills_the_readme(package, tmp_path):
    readme, out, pid_file = tmp_path / "README.md", tmp_path / "out", tmp_path / "worker.pid"
    readme.write_text(README)
    result = runner("--quick", "--package", str(package), "--output", str(out), "--readme",
                    str(readme), "--timeout", "4", cwd=tmp_path,
                    env={"WORKER_PID_FILE": str(pid_file)})
    assert result.returncode == 1, result.stdout + result.stderr

    results = json.loads((out / "results.json").read_text())
    entries = {entry["name"]: entry for entry in results["benchmarks"]}
    assert sorted(entries) == ["broken", "good", "hang", "nan_ratio", "skipped"]
    assert entries["good"]["status"] == "ok"
    assert entries["good"]["figures"] == [
        {"benchmark": "good", "name": "step | fused", "ratio": 0.5, "baseline": "plain step",
         "detail": "5 ms vs 10 ms", "aim": "<= 1x"},
        {"benchmark": "good", "name": "cached start", "ratio": 0.0123, "baseline": "first scan",
         "detail": "", "aim": ""},
    ]
    assert entries["broken"]["status"] == "failed"
    assert "RuntimeError: boom from broken" in entries["broken"]["error"]
    assert entries["nan_ratio"]["status"] == "failed"
    assert "not a finite number" in entries["nan_ratio"]["error"]
    assert entries["hang"]["status"] == "failed"
    assert entries["hang"]["error"] == "timed out after 4 s"
    assert entries["skipped"] == {**entries["skipped"], "status": "skipped",
                                  "reason": "needs CUDA"}
    assert results["machine"]["cpus"] == os.cpu_count()
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert results["machine"]["commit"] == git.stdout.strip()
    assert results["total_seconds"] >= sum(entry["seconds"] for entry in entries.values()) - 1

    worker = int(pid_file.read_text())  # the hung benchmark's own worker was ended with it
    deadline = time.monotonic() + 5
    while not dead(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dead(worker)

    table = (out / "results.md").read_text()
    lines = table.splitlines()
    assert lines[0].startswith("`python -m benchmarks --quick` on ")
    assert lines[2] == "| benchmark | figure | ratio | baseline | detail | aim |"
    rows = lines[4:]
    assert r"| good | step \| fused | 0.50x | plain step | 5 ms vs 10 ms | <= 1x |" in rows
    assert "| good | cached start | 0.0123x | first scan |  |  |" in rows
    assert any(r.startswith("| broken | **failed** |") and "boom from broken" in r for r in rows)
    assert any(r.startswith("| skipped | **skipped** |") and "needs CUDA" in r for r in rows)
    assert len(rows) == 6  # two figures and four rows of benchmarks without figures
    for row in rows:  # six cells each, the figure's own "|" escaped
        assert len(re.split(r"(?<!\\)\|", row)) == 8, row

    head, rest = README.split(BEGIN)
    assert readme.read_text() == head + BEGIN + "\n" + table + END + rest.split(END)[1]
    assert "FAILED: broken, hang, nan_ratio" in result.stdout


def test_full_sizes_only_and_refusals(package, tmp_path):
    out = tmp_path / "out"
    result = runner("--only", "good", "--package", str(package), "--output", str(out),
                    cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((out / "results.json").read_text())
    assert [entry["name"] for entry in results["benchmarks"]] == ["good"]
    assert [f["ratio"] for f in results["benchmarks"][0]["figures"]] == [2.0]  # full(), not quick()
    assert results["command"] == "python -m benchmarks --only good"
    readme = tmp_path / "README.md"
    readme.write_text(README)
    result = runner("--table-only", "--readme", str(readme), "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    table = (out / "results.md").read_text()
    assert "| good | step \\| fused, full size | 2.00x | plain step |  |  |" in table
    assert readme.read_text() == README.replace("old table\n", table)

    no_markers = tmp_path / "PLAIN.md"
    no_markers.write_text("# Project\n\nno table here\n")
    for args, message in (
        (["--only", "nosuch"], "--only nosuch: no such benchmark"),
        (["--readme", str(no_markers)], f"{no_markers} needs exactly one line {BEGIN}"),
        (["--table-only", "--readme", str(no_markers)], f"{no_markers} needs exactly one line"),
        (["--table-only"], "results.json does not exist; run python -m benchmarks --quick"),
    ):
        (out / "results.json").unlink(missing_ok=True)
        result = runner("--quick", "--package", str(package), "--output", str(out), *args,
                        cwd=tmp_path)
        assert result.returncode != 0
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not (out / "results.json").exists()  # refused before anything ran
    assert no_markers.read_text() == "# Project\n\nno table here\n"
