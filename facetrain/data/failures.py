"""Images that fail to decode while loading, counted across DataLoader worker processes.

A training set replaces an image whose body does not decode by the next one
(``IdentityFolderDataset``, ``RecordDataset``). That happens in the process that loads the
sample, usually a DataLoader worker holding its own copy of the dataset, so a count kept in an
ordinary attribute never reaches the main process. ``LoadFailures`` keeps the count and the first
failing sample indices in shared memory instead: made with the dataset in the main process, it is
inherited by forked workers and handed by handle to spawned ones, so every worker writes into the
one record the main process reads.
"""

import multiprocessing
from multiprocessing import context

KEEP = 10  # failing samples remembered by index (per run and per epoch); the rest are counted

# A spawn-context lock can also be handed to spawn- and forkserver-started workers; a lock of the
# fork context (the default on Linux) cannot, and forked workers inherit either kind.
_CONTEXT = multiprocessing.get_context("spawn")


class LoadFailures:
    """How many samples failed to decode and which ones first, over the whole run and since the
    last ``take_epoch``; written by any process, under a lock so two workers never share a slot.

    The shared array holds ``[run count, run's first keep, epoch count, epoch's first keep]``.
    """

    def __init__(self, keep: int = KEEP):
        self.keep = keep
        self._slots = _CONTEXT.Array("q", 2 * (1 + keep))

    def add(self, sample: int) -> None:
        """Record that ``sample`` (a dataset index) failed to decode."""
        with self._slots.get_lock():
            for start in (0, 1 + self.keep):
                count = self._slots[start]
                if count < self.keep:
                    self._slots[start + 1 + count] = sample
                self._slots[start] = count + 1

    def _read(self, start: int) -> tuple[int, list[int]]:
        count = self._slots[start]
        return count, list(self._slots[start + 1 : start + 1 + min(count, self.keep)])

    def run(self) -> tuple[int, list[int]]:
        """(failures since the record was made, the first ``keep`` failing sample indices)."""
        with self._slots.get_lock():
            return self._read(0)

    def take_epoch(self) -> tuple[int, list[int]]:
        """(failures since the last call, their first ``keep`` samples); the next call counts
        from here."""
        with self._slots.get_lock():
            taken = self._read(1 + self.keep)
            self._slots[1 + self.keep] = 0
        return taken

    def __getstate__(self) -> dict:
        if context.get_spawning_popen() is not None:  # starting a worker: share the record
            return {"keep": self.keep, "slots": self._slots}
        # Any other pickle (a saved or deep copy) cannot share memory: it carries the values.
        return {"keep": self.keep, "values": self._slots[:]}

    def __setstate__(self, state: dict) -> None:
        self.keep = state["keep"]
        shared = "slots" in state
        self._slots = state["slots"] if shared else _CONTEXT.Array("q", state["values"])
