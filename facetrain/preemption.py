"""Stopping on a signal without losing work: save a checkpoint at the next step boundary, then
requeue the job (SLURM's warning before a time limit or a preemption) or stop (``kill``,
Ctrl-C).

- SIGUSR1 / SIGUSR2: the requeue signals. SLURM sends one ahead of the time limit when asked
  (``sbatch --signal=USR2@90``, submitit's ``signal_delay_s``); submitit listens on USR2 because
  NCCL may catch USR1. Both mean: save, requeue, exit; the requeued job resumes from the saved
  checkpoint by itself (``facetrain.resume``).
- SIGTERM / SIGINT: save, write ``metrics.json`` saying the run was interrupted, exit cleanly.
  A second Ctrl-C stops at once.

Handlers only note the signal; the work happens between steps, where every rank is at the same
step and the weights are whole. Ranks agree on it with one small all-reduce per step (a signal
may reach one rank only, or the ranks at different steps), then save together (saving is
collective) and stop together.

Who requeues: when submitit started the job its USR2 handler is already installed, and it is
called after the save (it resubmits the job through submitit and exits). Otherwise, under SLURM,
rank 0 runs ``scontrol requeue``. Lightning's own SLURM requeue (USR1, saving from inside the
signal handler, mid-step) is switched off by ``facetrain.train`` so the two never both act.
"""

import logging
import signal
import subprocess
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from pytorch_lightning import Callback, LightningModule, Trainer

from facetrain.cluster import slurm_job_name
from facetrain.distributed import is_distributed

log = logging.getLogger(__name__)

REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")
STOP_SIGNALS = ("SIGTERM", "SIGINT")


class Interrupted(Exception):  # noqa: N818 - a stop the user asked for, not an error
    """Raised between steps after the checkpoint is written: ends ``trainer.fit`` at once (no
    validation or end-of-epoch work on a partial epoch)."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(f"{signal_name} at step {step}: saved {checkpoint}")

    @property
    def requeue(self) -> bool:
        return self.signal_name in REQUEUE_SIGNALS


class Preemption(Callback):
    """Handle the requeue and stop signals during training (see the module docstring):
    ``dirpath``/``filename`` is where the checkpoint goes (the run's ``last.ckpt``, the file a
    resume picks first)."""

    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.path = Path(dirpath) / filename
        self._received: int | None = None
        self._replaced: dict[int, object] = {}  # signal -> the handler ours replaced

    # -- signal handlers -----------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After Lightning installed its own (at the start of fit), so ours are the ones called.
        if threading.current_thread() is not threading.main_thread():
            log.warning("training outside the main thread: signals are not handled")
            return
        for number in _numbers(REQUEUE_SIGNALS + STOP_SIGNALS):
            self._replaced[number] = signal.signal(number, self._note)

    def _note(self, number: int, frame) -> None:
        if number == signal.SIGINT and self._received is not None:
            raise KeyboardInterrupt  # Ctrl-C after a signal: the user does not want to wait
        if self._received is None or _priority(number) > _priority(self._received):
            self._received = number  # a requeue request wins over the TERM that may follow
        log.info("received %s: saving a checkpoint after this step", signal.Signals(number).name)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Lightning's teardown has put back the handlers of before the fit where ours were not
        # replaced since; _replaced stays: requeue() calls submitit's after fit.
        for number, handler in self._replaced.items():
            if signal.getsignal(number) == self._note:
                signal.signal(number, handler)

    # -- between steps -------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.is_last_batch or (batch_idx + 1) % trainer.accumulate_grad_batches:
            # Not in the middle of an accumulated step; and not on an epoch's last batch, whose
            # validation and checkpoint Lightning would skip on resume: the next batch acts.
            return
        number = self._agreed(trainer)
        if not number:
            return
        trainer.save_checkpoint(self.path)  # every rank: the contents are gathered collectively
        name = signal.Signals(number).name
        log.warning("%s: saved %s at step %d", name, self.path, trainer.global_step)
        raise Interrupted(name, trainer.global_step, self.path)

    def _agreed(self, trainer: Trainer) -> int:
        """The signal to act on: a requeue signal if any rank got one, else a stop signal if
        any rank got one (one all-reduce of priority and number), else 0."""
        received = self._received or 0
        if is_distributed():
            code = torch.tensor([_priority(received) * 100 + received],
                                device=trainer.strategy.root_device)
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
            received = int(code.item()) % 100
        return received

    # -- after fit -----------------------------------------------------------------------
    def requeue_method(self, interrupted: Interrupted) -> str:
        """How ``requeue`` will requeue the job, in words (for metrics.json and the log)."""
        if _is_submitit_handler(self._replaced.get(getattr(signal, interrupted.signal_name))):
            return "submitit"
        job = slurm_job_name()
        if job is None:
            return "none: not a SLURM job; run the same command again to resume"
        return f"scontrol requeue {job}"

    def requeue(self, interrupted: Interrupted, is_global_zero: bool) -> None:
        """Requeue the job after an ``Interrupted`` by a requeue signal (``requeue_method``)."""
        number = getattr(signal, interrupted.signal_name)
        method = self.requeue_method(interrupted)
        if method == "submitit":  # resubmits through submitit, then exits the process
            self._replaced[number](number, None)
        elif method.startswith("scontrol") and is_global_zero:
            try:
                result = subprocess.run(method.split(), capture_output=True, text=True,
                                        timeout=60)
                failure = result.returncode and result.stderr.strip()
            except (OSError, subprocess.TimeoutExpired) as error:  # no scontrol in a container
                failure = str(error)
            if failure:
                log.error("%s failed: %s; resume by hand with resume=<run folder>", method,
                          failure)


def _numbers(names) -> list[int]:
    """The signals of these names this platform has (Windows has no SIGUSR1/2)."""
    return [number for name in names if (number := getattr(signal, name, None)) is not None]


def _priority(number: int) -> int:
    """2 for a requeue signal, 1 for a stop signal, 0 for none."""
    return 2 if number in _numbers(REQUEUE_SIGNALS) else 1 if number else 0


def _is_submitit_handler(handler) -> bool:
    owner = getattr(handler, "__self__", None)
    return callable(handler) and type(owner).__module__.startswith("submitit")
