"""SLURM launch without a cluster: the submitit launchers (configs/hydra/launcher/), run folders
that survive a requeue, threads per process from ``--cpus-per-task``, and the plain sbatch
templates (scripts/slurm/). ``srun`` and ``sbatch`` are stand-ins on ``PATH``; the local submitit
executor runs real submitit jobs, requeue included.

``python train.py`` itself runs twice (the threads probe and the slow local-launcher run): the
other checks run facetrain's config tree in a small Hydra app (``APP``) or in-process, because
importing the training stack costs seconds per process on 2 cores."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_cli, tiny_overrides
from hydra import compose, initialize_config_dir

from facetrain.cluster import set_threads_from_slurm
from facetrain.resources import config_dir

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d")
TEMPLATES = sorted((REPO / "scripts" / "slurm").glob("*.sbatch"))
USABLE_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

# facetrain's config tree (configs/train.yaml, configs/hydra/) under a task that records the
# folder Hydra gives it, one line per attempt, to argv[1]. With REQUEUE_ONCE set, the first
# attempt sends itself USR2 (what SLURM sends before the time limit and at a preemption), so
# that submitit's handler requeues the job.
APP = '''
import os, signal, sys, time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

import facetrain.cluster  # registers the resolvers the config tree uses, as train.py does
from facetrain.resources import config_dir

LOG = Path(sys.argv.pop(1))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg):
    attempt = len(LOG.read_text().splitlines()) + 1 if LOG.exists() else 1
    with LOG.open("a") as log:
        log.write(HydraConfig.get().runtime.output_dir + "\\n")
    if attempt == 1 and os.environ.get("REQUEUE_ONCE"):
        time.sleep(1.1)  # a folder named by the time again would differ by now
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(60)  # submitit's handler exits for the requeue before this ends
        raise SystemExit("USR2 did not requeue the job")


if __name__ == "__main__":
    main()
'''


def without_slurm(**extra: str) -> dict[str, str]:
    """This process's environment without SLURM_* (a test run inside a SLURM job stays
    meaningful) and without OMP_NUM_THREADS, plus ``extra``; this checkout on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, **extra}


def run_app(
    tmp_path: Path, *overrides: str, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``APP`` in ``tmp_path`` with ``overrides``; its result and the folders it recorded."""
    app, log = tmp_path / "app.py", tmp_path / "folders.txt"
    app.write_text(APP)
    result = subprocess.run([sys.executable, str(app), str(log), *overrides], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    return result, (log.read_text().splitlines() if log.exists() else [])


def stand_ins(folder: Path, **scripts: str) -> Path:
    """A folder of executable bash scripts ``{name: body}``, to put first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text("#!/bin/bash\n" + textwrap.dedent(body))
        (folder / name).chmod(0o755)
    return folder


def sbatch_options(script: str) -> dict[str, str]:
    """The ``#SBATCH --key=value`` lines of a batch script (``--flag``: value "")."""
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?\s*$", script, re.MULTILINE))


def train_config(*overrides: str):
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


# -- run folders ----------------------------------------------------------------------------


def test_run_folder_is_the_slurm_job_in_every_process_of_it(tmp_path):
    # A requeued job is a new process with the same job id: it must name the same folder.
    env = without_slurm(SLURM_JOB_ID="4242")
    _, first = run_app(tmp_path, env=env)
    time.sleep(1.1)  # a timestamp taken again would differ by now
    _, both = run_app(tmp_path, env=env)
    assert both == first * 2 == [str(tmp_path / "outputs" / "train" / "slurm-4242")] * 2


def test_run_folder_outside_slurm_is_the_time(tmp_path):
    before = time.time()
    result, folders = run_app(tmp_path, env=without_slurm())
    assert result.returncode == 0, result.stderr[-3000:]
    name = Path(folders[0]).name
    assert TIMESTAMP.fullmatch(name), name
    assert before - 1 <= time.mktime(time.strptime(name, "%Y-%m-%d_%H-%M-%S")) <= time.time()


def test_array_task_run_folder_is_named_as_squeue_shows_it(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    # An array task has its own SLURM_JOB_ID too; squeue (and submitit's %j) show 4242_3.
    monkeypatch.setenv("SLURM_JOB_ID", "4246")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert train_config().hydra.run.dir == "outputs/train/slurm-4242_3"


def test_requeued_submitit_job_keeps_its_sweep_folder(tmp_path):
    """The sweep folder (``${now:}``) is resolved once, when the sweep is submitted; the job's
    requeue (submitit's DelayedSubmission of the pickled launcher and config) re-runs the job
    in the same <sweep dir>/<job number>, where the run's checkpoints are."""
    result, folders = run_app(tmp_path, "-m", "hydra/launcher=local",
                              env=without_slurm(REQUEUE_ONCE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(folders) == 2, folders  # the first attempt and the requeued one
    sweeps = list((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 1 and TIMESTAMP.fullmatch(sweeps[0].name), sweeps
    assert folders == [str(sweeps[0] / "0")] * 2
    logs = "".join(p.read_text() for p in sweeps[0].glob(".submitit/*/*_log.*"))
    assert "Requeued job" in logs  # submitit's own account of the requeue


# -- the launchers --------------------------------------------------------------------------


def test_slurm_launcher_asks_for_the_trainers_allocation(tmp_path):
    # sbatch keeps the script submitit writes and refuses it: submission stops there.
    script = tmp_path / "submitted.sbatch"
    path = stand_ins(tmp_path / "bin", srun="exit 0\n", sbatch=f"""
        cp "$1" {script}
        echo "sbatch: error: no cluster here" >&2
        exit 1
    """)
    result, _ = run_app(
        tmp_path, "-m", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
        "trainer.num_nodes=3", "hydra.launcher.partition=gpu", "hydra.launcher.cpus_per_task=6",
        env=without_slurm(PATH=f"{path}{os.pathsep}{os.environ['PATH']}"),
    )
    assert "no cluster here" in result.stderr and script.exists(), result.stderr[-3000:]
    text = script.read_text()
    options = sbatch_options(text)
    assert options["nodes"] == "3"
    assert options["ntasks-per-node"] == options["gpus-per-node"] == "4"  # one task per GPU
    assert options["cpus-per-task"] == "6"
    assert options["partition"] == "gpu"
    assert options["signal"] == "USR2@120"  # to every task (no B:), 2 minutes before the end
    assert options["requeue"] == "" and options["open-mode"] == "append"
    assert int(options["time"]) == 24 * 60
    # srun's tasks get --cpus-per-task (Slurm >= 22.05 does not pass it on from sbatch).
    setup, command = text.split("# setup\n")[1].split("# command\n")
    shell = subprocess.run(["bash", "-c", setup + 'echo "$SRUN_CPUS_PER_TASK"'],
                           env=without_slurm(SLURM_CPUS_PER_TASK="6"), capture_output=True,
                           text=True)
    assert shell.stdout.strip() == "6" and re.search(r"^srun ", command, re.MULTILINE)


def test_slurm_launcher_refuses_devices_auto_in_one_line():
    cfg = train_config("hydra/launcher=slurm", "trainer=ddp")  # trainer.devices: auto
    # SystemExit: Hydra prints exceptions raised while it builds the launcher with a traceback,
    # a SystemExit's message alone.
    with pytest.raises(SystemExit) as stop:
        _ = cfg.hydra.launcher.tasks_per_node
    assert str(stop.value) == (
        "facetrain: config error: hydra/launcher=slurm (configs/hydra/launcher/slurm.yaml) "
        "requests one task and one GPU per trainer.devices on each node, but trainer.devices "
        "is 'auto': give the number of GPUs per node, e.g. trainer.devices=8"
    )
    cfg = train_config("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8")
    assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 8


@pytest.mark.slow  # one real epoch through a submitit job, requeued once (~40 s on 2 cores)
def test_local_launcher_job_is_requeued_on_usr2_and_resumes_in_its_folder(
    tiny_faces, tmp_path, monkeypatch
):
    """A submitit job sent USR2 (SLURM's warning before the time limit) at step 12: facetrain
    saves last.ckpt, hands the signal to submitit's handler, which requeues the job; the
    requeued job runs in the same sweep job folder, resumes at step 13 by itself and finishes
    the epoch."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent), prepend=os.pathsep)
    sweep = tmp_path / "sweep"
    steps = tmp_path / "steps.jsonl"
    overrides = [o for o in tiny_overrides(tiny_faces, tmp_path / "unused")
                 if not o.startswith("hydra.run.dir=")]
    result = run_cli(
        "train.py", "-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep}", *overrides,
        "trainer.max_epochs=1", "measure_baselines=false", "~callbacks.projector",
        "+callbacks.kill._target_=step_probe.SignalAtStep", "+callbacks.kill.step=12",
        "+callbacks.kill.signal=SIGUSR2",
        "+callbacks.probe._target_=step_probe.RecordBatches", f"+callbacks.probe.file={steps}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_0_log.*"))
    assert "Caught signal SIGUSR2" in logs and "Requeued job" in logs, logs[-3000:]
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["epochs"] == 1 and metrics["verification"]
    assert metrics["resumed_from"] == str(sweep / "0" / "checkpoints" / "last.ckpt")
    trained = [json.loads(line)["step"] for line in steps.read_text().splitlines()]
    assert trained == [*range(1, 13), *range(13, 26)]  # nothing re-done, nothing skipped


# -- the sbatch templates -------------------------------------------------------------------


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_sbatch_template_runs_train_py_as_its_allocation(template, tmp_path):
    text = template.read_text()
    assert subprocess.run(["bash", "-n", str(template)]).returncode == 0
    options = sbatch_options(text)
    assert re.fullmatch(r"USR2@\d+", options["signal"])  # no B:, so srun's tasks get it
    assert options["requeue"] == "" and options["open-mode"] == "append"
    assert options["ntasks-per-node"] == options["gpus-per-node"]  # one task per GPU
    # Run it as SLURM would for its own allocation, with an srun that records its arguments.
    allocation = dict(
        SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node[1-9]",
        SLURM_CPUS_PER_TASK=options["cpus-per-task"], SLURM_GPUS_ON_NODE=options["gpus-per-node"],
        SLURM_JOB_NUM_NODES=options["nodes"], SLURM_NTASKS_PER_NODE=options["ntasks-per-node"],
    )
    path = stand_ins(tmp_path / "bin", srun=f"""printf '%s\\n' "$@" > {tmp_path / 'srun'}\n""")
    result = subprocess.run(
        ["bash", str(template), "loss=cosface"], cwd=REPO, capture_output=True, text=True,
        env=without_slurm(PATH=f"{path}{os.pathsep}{os.environ['PATH']}", **allocation),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("facetrain: job 77, start 1")  # the log says which start
    srun = (tmp_path / "srun").read_text().splitlines()
    options_end = srun.index("python")
    assert f"--cpus-per-task={options['cpus-per-task']}" in srun[:options_end]
    assert srun[options_end:options_end + 2] == ["python", "train.py"]
    # What train.py composes from those arguments (it fails on a bad override as compose does).
    cfg = train_config(*srun[options_end + 2:])
    assert cfg.trainer.devices == int(options["gpus-per-node"])
    assert cfg.trainer.num_nodes == int(options["nodes"])
    assert cfg.trainer.strategy._target_.endswith("DDPStrategy")
    assert cfg.loss._target_.endswith("CosFace")  # the user's overrides reach train.py


# -- threads --------------------------------------------------------------------------------

# facetrain's train entry point with train() replaced by what Lightning's DDP launcher does
# first on an 8-GPU node (set (usable CPUs) // 8 threads unless OMP_NUM_THREADS is set); prints
# the threads that training would then run, and the run folder.
THREADS_PROBE = '''
import json, os
import torch
from hydra.core.hydra_config import HydraConfig
from lightning_fabric.utilities.distributed import _set_num_threads_if_needed
import facetrain.cli.train as cli

def train(cfg):
    _set_num_threads_if_needed(num_processes=8)
    print(json.dumps({"threads": torch.get_num_threads(), "omp": os.environ["OMP_NUM_THREADS"],
                      "folder": HydraConfig.get().runtime.output_dir}))
    return {}

cli.train = train
cli.main()
'''


@pytest.mark.skipif(USABLE_CPUS < 2, reason="needs 2 CPUs to tell N threads from N // 8")
def test_train_py_runs_cpus_per_task_threads_in_the_jobs_folder(tmp_path):
    # Under srun a task may use its --cpus-per-task CPUs: all of them, not 1/8 of them.
    probe = tmp_path / "probe.py"
    probe.write_text(THREADS_PROBE)
    env = without_slurm(SLURM_CPUS_PER_TASK=str(USABLE_CPUS), SLURM_JOB_ID="4242")
    result = subprocess.run([sys.executable, str(probe)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "threads": USABLE_CPUS, "omp": str(USABLE_CPUS),
        "folder": str(tmp_path / "outputs" / "train" / "slurm-4242"),
    }


@pytest.fixture
def thread_state(monkeypatch):
    """SLURM_* and OMP_NUM_THREADS as the test sets them, restored afterwards with torch's
    thread count."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # restored (or removed again) afterwards
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(threads)


def test_threads_obey_omp_num_threads_first(thread_state):
    thread_state.setenv("SLURM_CPUS_PER_TASK", "8")
    thread_state.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert set_threads_from_slurm() is None
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"


def test_threads_unchanged_outside_slurm(thread_state):
    assert set_threads_from_slurm() is None and "OMP_NUM_THREADS" not in os.environ


def test_threads_at_most_the_cpus_the_process_may_use(thread_state, caplog):
    thread_state.setenv("SLURM_CPUS_PER_TASK", str(USABLE_CPUS + 6))
    assert set_threads_from_slurm() == USABLE_CPUS == torch.get_num_threads()
    assert os.environ["OMP_NUM_THREADS"] == str(USABLE_CPUS)
    assert "Pass --cpus-per-task to srun" in caplog.text
