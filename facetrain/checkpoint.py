"""Checkpoints written atomically: a killed job never leaves a truncated ``last.ckpt``."""

import os
from pathlib import Path

from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from pytorch_lightning.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<name>.tmp`` beside the target, then rename over it (atomic on POSIX).

    Remote paths (``s3://`` and other fsspec URLs) go to Lightning's own writer unchanged.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        temporary = path.with_name(path.name + ".tmp")
        try:
            super().save_checkpoint(checkpoint, temporary, storage_options)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
