"""What keeps a run directory consistent while it trains: the checkpoints and the non-finite-loss guard.

Paper: none (library infrastructure).

Library choices:

* :class:`RunCheckpoint` writes ``DIR/last.ckpt`` (atomically, through the trainer's checkpoint IO) at every
  epoch end, after the epoch's metrics row exists, and every ``N`` optimiser steps except at an epoch's last batch:
  the epoch-end checkpoint follows a moment later. (Lightning resumes a checkpoint written at an epoch's last batch
  in the next epoch without running that epoch's validation and epoch-end hooks, so a kill between the two
  checkpoints lost the epoch's row for good.) It replaces two ``ModelCheckpoint`` s: with ``save_top_k=0``,
  Lightning 2.6's ``ModelCheckpoint`` writes ``last.ckpt`` at an epoch end only if it saved a top-k checkpoint at
  that step, i.e. never.
* :class:`NonFiniteGuard` checks the training loss of every step on the CPU (on accelerators, where a check is a
  host-device sync, only on the steps that write a checkpoint and every ``sync_every`` steps), and every weight
  and buffer (BatchNorm statistics overflow before the loss does) before every checkpoint. A non-finite value
  stops the run with :class:`NonFiniteLossError` *before* the checkpoint of that step is written, so
  ``last.ckpt`` keeps the last good state. Under DDP the ranks agree on the
  decision (any rank's non-finite loss stops all of them).
* The CPU thread count of a run is chosen by :mod:`batchmates.training.threads`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

from batchmates.config import RunError

__all__ = ["RunCheckpoint", "NonFiniteGuard", "NonFiniteLossError"]


class RunCheckpoint(Checkpoint):
    """Writes ``path`` at every epoch end and every ``every_n_steps`` optimiser steps (0: epoch ends only), except
    at an epoch's last batch. Lightning runs ``Checkpoint`` callbacks after all others."""

    def __init__(self, path: str, every_n_steps: int = 0) -> None:
        self.path = path
        self.every_n_steps = int(every_n_steps)
        self._last_step: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = int(trainer.global_step)
        if (self.every_n_steps <= 0 or step % self.every_n_steps or step == self._last_step
                or batch_idx + 1 >= trainer.num_training_batches):
            return
        self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path)  # every rank calls it; rank 0 writes
        self._last_step = int(trainer.global_step)


class NonFiniteLossError(RunError):
    """Training produced a NaN or infinite loss (or parameter); the run stopped before writing a checkpoint."""

    def __init__(self, message: str, *, step: int, epoch: int, what: str) -> None:
        super().__init__(message)
        self.step, self.epoch, self.what = step, epoch, what


class NonFiniteGuard(L.Callback):
    """Stops training at the first non-finite loss, before that step's checkpoint (see the module docstring)."""

    def __init__(self, checkpoint_every: int, *, lr: float | None = None, sync_every: int = 50) -> None:
        self.checkpoint_every = int(checkpoint_every)
        self.lr = lr
        self.sync_every = max(1, int(sync_every))
        self._bad: torch.Tensor | None = None

    def _checkpoint_step(self, trainer: L.Trainer, batch_idx: int) -> bool:
        step = int(trainer.global_step)
        last = batch_idx + 1 >= trainer.num_training_batches or (0 < trainer.max_steps <= step)
        return last or (self.checkpoint_every > 0 and step % self.checkpoint_every == 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):
            bad = ~torch.isfinite(loss.detach()).all()
            self._bad = bad if self._bad is None else (self._bad | bad)
        ckpt = self._checkpoint_step(trainer, batch_idx)
        on_cpu = pl_module.device.type == "cpu"
        if not (on_cpu or ckpt or int(trainer.global_step) % self.sync_every == 0):
            return
        what = ""
        if self._bad is not None and bool(trainer.strategy.reduce_boolean_decision(bool(self._bad), all=False)):
            what = "the training loss"
        elif ckpt and not _state_finite(trainer, pl_module):
            what = "a weight or buffer (e.g. a BatchNorm running statistic)"
        self._bad = None
        if what:
            self._stop(trainer, what)

    def _stop(self, trainer: L.Trainer, what: str) -> None:
        step, epoch = int(trainer.global_step), int(trainer.current_epoch) + 1
        lr = f" (lr={self.lr:g})" if self.lr is not None else ""
        raise NonFiniteLossError(
            f"training stopped at step {step} (epoch {epoch}): {what} is NaN or infinite. The likely cause is a "
            f"learning rate too high{lr} for this method and batch size: lower --lr (e.g. by 10x) and start again "
            "(or check the data for bad values). The last checkpoint, written before this step, is kept; "
            "metrics.json records the failure.",
            step=step, epoch=epoch, what=what,
        )


def _state_finite(trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
    """Every floating-point parameter and buffer is finite, on every rank."""
    flags = [torch.isfinite(t.detach()).all() for t in pl_module.state_dict().values()
             if torch.is_tensor(t) and t.is_floating_point()]
    ok = bool(torch.stack(flags).all()) if flags else True
    return not trainer.strategy.reduce_boolean_decision(not ok, all=False)
