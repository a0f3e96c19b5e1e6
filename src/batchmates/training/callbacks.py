"""The trainer's Lightning callbacks: the per-epoch history, the throughput meter and per-step seeding.

Paper: none (library infrastructure).

Library choices:

* :class:`History` keeps one row of metrics per epoch and rewrites ``metrics.csv`` atomically after each one;
  its rows and training seconds are part of the checkpoint, so a resumed run keeps its curve. It also reads the
  state that runs written before this module existed stored under their callback's old name.
* :class:`Throughput` logs images per second (global batch over the wall time between two step starts,
  exponential moving average with weight 0.1) to the progress bar.
* :class:`StepSeeding` re-seeds torch before every training step from ``(seed, global_step, rank)``
  (:func:`batchmates.seeding.step_seed`): the randomness of a step does not depend on the steps before it, so a
  run resumed mid-epoch reproduces the uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import lightning as L
import torch

from batchmates.seeding import seed_step
from batchmates.training.rundir import write_metrics_csv

__all__ = ["History", "Throughput", "StepSeeding"]

# Where runs written before this module kept History's state (the callback was a class defined in a function).
LEGACY_HISTORY_KEYS = ("_history_callback_cls.<locals>.History",)


class History(L.Callback):
    """Collects one row of metrics per epoch and writes ``OUT/metrics.csv`` atomically (on rank 0)."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.rows: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        self._t0: float | None = None

    def state_dict(self) -> dict[str, Any]:
        secs = self.train_seconds + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)
        return {"rows": list(self.rows), "train_seconds": secs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state.get("rows", []))
        self.train_seconds = float(state.get("train_seconds", 0.0))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states:
            for key in LEGACY_HISTORY_KEYS:
                if key in states:
                    self.load_state_dict(states[key])
                    break

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._t0 is not None:
            self.train_seconds += time.perf_counter() - self._t0
            self._t0 = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        row: dict[str, Any] = {"epoch": int(trainer.current_epoch) + 1, "step": int(trainer.global_step)}
        row["train_loss"] = m.get("train/loss_epoch", m.get("train/loss", math.nan))
        row["train_acc"] = m.get("train/acc", math.nan)
        row["val_loss"] = m.get("val/loss", math.nan)
        row["val_acc"] = m.get("val/acc", math.nan)
        opt = trainer.optimizers[0] if trainer.optimizers else None
        row["lr"] = float(opt.param_groups[0]["lr"]) if opt is not None else math.nan
        # Extra per-epoch training metrics a method logs with log_train(..., key=value) (e.g. frac_dropped).
        for k, v in m.items():
            name = k[len("train/"):] if k.startswith("train/") else ""
            if name and name not in ("loss", "loss_step", "loss_epoch", "acc") and not name.endswith("_step"):
                row[name.removesuffix("_epoch")] = v
        row["time_s"] = round(self.state_dict()["train_seconds"], 3)
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        if trainer.is_global_zero:
            write_metrics_csv(os.path.join(self.out, "metrics.csv"), self.rows)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, list | tuple) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 0


class Throughput(L.Callback):
    """Logs ``img_per_s`` (global images per second, smoothed) on the progress bar at every training step."""

    def __init__(self, smoothing: float = 0.1) -> None:
        self.smoothing = smoothing
        self.rate: float | None = None
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # the pause between epochs (evaluation, checkpointing) is not training time

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            rate = _batch_size(batch) * max(1, int(trainer.world_size)) / max(now - self._last, 1e-9)
            self.rate = rate if self.rate is None else (1 - self.smoothing) * self.rate + self.smoothing * rate
        self._last = now

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.rate is not None:
            pl_module.log("img_per_s", self.rate, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)


class StepSeeding(L.Callback):
    """Seeds torch from ``(seed, global_step, rank)`` before every training step."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        seed_step(self.seed, int(trainer.global_step), int(trainer.global_rank))
