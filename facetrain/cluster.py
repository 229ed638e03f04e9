"""What a training process takes from the SLURM job it runs in: the name of its run folder and
its number of threads. Importing this module registers the config resolvers below: the train
entry point (facetrain.cli.train) and the tests' helpers import it; other code that composes the
``train`` config with Hydra's compose API and reads ``hydra.run.dir`` imports it first. (Not
``facetrain/__init__``: the wheel build imports the package without omegaconf installed.)

- ``${facetrain.run_name:FORMAT}`` (configs/hydra/default.yaml names ``hydra.run.dir`` with it):
  ``slurm-<job id>`` inside a SLURM job (``slurm-<array job id>_<task id>`` for an array task,
  as ``squeue`` shows it), else the current time in ``FORMAT``. A requeued job re-runs the same
  command with the same job id, so it lands in the same folder and finds its checkpoints; and
  every ``srun`` task, on every node, names the same folder (timestamps taken on each node may
  differ by a second). One run per job: a second training in the same allocation names the same
  folder (and resumes from it) unless it is given its own ``hydra.run.dir``.
- ``${facetrain.gpus_per_node:${trainer.devices}}`` (configs/hydra/launcher/slurm.yaml): the
  number of tasks and GPUs per node to request; ``trainer.devices=auto`` cannot size an
  allocation, so it is refused with a message saying what to set.
- ``set_threads_from_slurm()``: threads per process from ``--cpus-per-task``.
"""

import logging
import os
import time

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def slurm_job_name() -> str | None:
    """``<job id>`` of the SLURM job this process runs in (``<array job id>_<task id>`` for an
    array task: the form ``squeue`` and submitit's ``%j`` folders use), or None outside SLURM."""
    if os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None  # an salloc / srun --pty shell: its runs are not the job (Lightning's rule)
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get(
        "SLURM_ARRAY_TASK_ID"
    )
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID") or None


def run_name(time_format: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """``slurm-<job>`` inside a SLURM job (the same after a requeue), else the time now."""
    job = slurm_job_name()
    return f"slurm-{job}" if job is not None else time.strftime(time_format)


def gpus_per_node(devices) -> int:
    """``trainer.devices`` as the count of GPUs (and tasks) per node of an allocation. Anything
    else (``auto``, a list of GPU indices) ends the command with a one-line error: Hydra resolves
    this while it builds the launcher, before any facetrain code could catch an exception, and
    prints a full traceback for exceptions but not for ``SystemExit``."""
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise SystemExit(
            f"facetrain: config error: hydra/launcher=slurm (configs/hydra/launcher/slurm.yaml) "
            f"requests one task and one GPU per trainer.devices on each node, but trainer.devices "
            f"is {devices!r}: give the number of GPUs per node, e.g. trainer.devices=8"
        )
    return devices


def set_threads_from_slurm() -> int | None:
    """Under SLURM with ``--cpus-per-task`` and no ``OMP_NUM_THREADS``: run
    ``SLURM_CPUS_PER_TASK`` threads (at most the CPUs this process may use) and export
    ``OMP_NUM_THREADS`` so that DataLoader workers and Lightning see it; return that number
    (None when nothing was set).

    Call it before the Trainer is built. Lightning's DDP launcher otherwise sets (CPUs this
    process may use) // (processes per node) threads; under ``srun`` each task may already use
    only its own ``--cpus-per-task`` CPUs, so that division leaves all but 1/8 of them idle on
    an 8-GPU node. With ``OMP_NUM_THREADS`` set, Lightning leaves threads alone.
    """
    cpus_per_task = os.environ.get("SLURM_CPUS_PER_TASK")
    if not cpus_per_task or "OMP_NUM_THREADS" in os.environ:
        return None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = min(int(cpus_per_task), usable or 1)
    if threads < int(cpus_per_task):
        log.warning(
            "SLURM_CPUS_PER_TASK=%s but this process may run on %d CPUs: running %d threads. "
            "Pass --cpus-per-task to srun too (from Slurm 22.05 srun does not take it from "
            "sbatch; scripts/slurm/*.sbatch do)", cpus_per_task, usable, threads,
        )
    import torch  # here: registering the resolvers (any config composition) stays cheap

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def run_dir(resume: str | None, new_run_dir: str) -> str:
    """``hydra.run.dir``: the folder of the run being continued (``resume=<run folder>``: its
    checkpoints, TensorBoard curves and metrics.json carry on there), else ``new_run_dir``."""
    return os.path.expanduser(str(resume)) if resume else new_run_dir


# Cached as Hydra's own ${now:} is: one name per config, however often it is resolved.
OmegaConf.register_new_resolver("facetrain.run_name", run_name, use_cache=True, replace=True)
OmegaConf.register_new_resolver("facetrain.run_dir", run_dir, replace=True)
OmegaConf.register_new_resolver("facetrain.gpus_per_node", gpus_per_node, replace=True)
