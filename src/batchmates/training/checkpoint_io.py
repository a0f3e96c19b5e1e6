"""Atomic checkpoint writes for Lightning: temp file in the same directory, fsync, then ``os.replace``.

Paper: none (library infrastructure).

Library choices: a module-level class (not a closure) so that ``strategy="ddp_spawn"`` can pickle the trainer's
plugins; the write itself is :func:`batchmates.io.atomic_save_torch`.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from batchmates.io import atomic_save_torch


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints never replace a good ``last.ckpt`` with a torn one, whatever interrupts the write."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_save_torch(checkpoint, path)
