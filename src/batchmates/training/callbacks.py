"""The trainer's Lightning callbacks: the per-epoch history, the throughput meter and per-step seeding.

Paper: none (library infrastructure).

Library choices:

* :class:`History` keeps one row of metrics per epoch and rewrites ``metrics.csv`` atomically after each one;
  its rows and training seconds are part of every checkpoint, so a resumed run keeps its curve. A mid-epoch
  checkpoint also holds the running sums of the epoch's logged training metrics (per rank), and a run resumed
  from it adds them back after its first step: the interrupted epoch's row (``train_loss``, ``train_acc``, ...)
  equals the uninterrupted run's. It also reads the state that runs written before this module existed stored
  under their callback's old name.
* :class:`Throughput` logs images per second (global batch over the wall time between two step starts,
  exponential moving average with weight 0.1) to the progress bar, every ``log_every_n_steps`` steps.
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
        self._trainer: L.Trainer | None = None
        self._pending_sums: dict[str, Any] | None = None  # a mid-epoch checkpoint's running sums, to add back

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def _seconds(self) -> float:
        return self.train_seconds + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rows": list(self.rows), "train_seconds": self._seconds()}
        sums = _epoch_sums(self._trainer)  # every rank saves a checkpoint together, so gathering here is safe
        if sums is not None:
            state["epoch_sums"] = sums
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state.get("rows", []))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self._pending_sums = state.get("epoch_sums")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._pending_sums is not None:  # first step after a resume (before any checkpoint of this step)
            pending, self._pending_sums = self._pending_sums, None
            if int(pending.get("epoch", -1)) == int(trainer.current_epoch):
                _add_epoch_sums(trainer, pending)

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
            if k.startswith("monitor/"):  # the training monitor (knn_acc, rankme, ...; training/monitor.py)
                row[k[len("monitor/"):]] = v
        row["time_s"] = round(self._seconds(), 3)
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        if trainer.is_global_zero:
            write_metrics_csv(os.path.join(self.out, "metrics.csv"), self.rows)


def _training_results(trainer: L.Trainer | None) -> Any:
    """Lightning's collection of the current epoch's logged training metrics (``self.log(..., on_epoch=True)``)."""
    try:
        return trainer.fit_loop.epoch_loop._results if trainer is not None else None
    except AttributeError:  # a Lightning without this internal: rows of interrupted epochs cover the resumed part
        return None


def _epoch_sums(trainer: L.Trainer | None) -> dict[str, Any] | None:
    """The running sums of this epoch's logged training metrics on every rank: ``{"epoch", "keys", "value",
    "count"}``, ``value``/``count`` of shape ``[world_size, len(keys)]``; None outside a training epoch."""
    results = _training_results(trainer)
    if results is None or not trainer.training:
        return None
    keys = sorted(k for k, m in results.items() if getattr(m, "is_tensor", False) and m.meta.on_epoch
                  and (m.meta.is_mean_reduction or m.meta.is_sum_reduction))
    if not keys:
        return None
    # float64 on the metrics' device (NCCL gathers CUDA tensors only); a sum-reduced metric has no count
    value = torch.stack([results[k].value.detach().double().reshape(()) for k in keys])
    count = torch.stack([_count(results[k]) for k in keys]).to(value.device)
    if trainer.world_size > 1:
        value, count = (trainer.strategy.all_gather(t).reshape(trainer.world_size, len(keys)) for t in (value, count))
    else:
        value, count = value.unsqueeze(0), count.unsqueeze(0)
    return {"epoch": int(trainer.current_epoch), "keys": keys, "value": value.cpu(), "count": count.cpu()}


def _count(metric: Any) -> torch.Tensor:
    c = getattr(metric, "cumulated_batch_size", None)  # mean reductions only
    return (c if c is not None else torch.zeros((), device=metric.value.device)).detach().double().reshape(())


def _add_epoch_sums(trainer: L.Trainer, sums: dict[str, Any]) -> None:
    """Add a checkpoint's running sums (this rank's row) to the metrics of the first step after the resume.

    Exact: the uninterrupted run's sum after that step is ``saved + step_value`` and the resumed one's is
    ``0 + step_value`` before this addition (float32 values are stored exactly in float64).
    """
    results = _training_results(trainer)
    value, count = sums.get("value"), sums.get("count")
    if results is None or value is None or value.shape[0] != trainer.world_size:
        return
    rank = int(trainer.global_rank)
    for i, key in enumerate(sums.get("keys", [])):
        m = results.get(key)
        if m is None or not getattr(m, "is_tensor", False) or not (m.meta.is_mean_reduction or m.meta.is_sum_reduction):
            continue
        m.value = m.value + value[rank, i].to(m.value.dtype).to(m.value.device)
        if hasattr(m, "cumulated_batch_size"):
            c = m.cumulated_batch_size
            m.cumulated_batch_size = c + count[rank, i].to(c.dtype).to(c.device)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, list | tuple) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 0


class Throughput(L.Callback):
    """Logs ``img_per_s`` (global images per second, smoothed) on the progress bar every ``log_every_n_steps``."""

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
        # every log_every_n_steps steps only: a Lightning log call costs about as much as a small model's step on a CPU
        if self.rate is not None and trainer.global_step % max(1, int(trainer.log_every_n_steps or 1)) == 0:
            pl_module.log("img_per_s", self.rate, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)


class StepSeeding(L.Callback):
    """Seeds torch from ``(seed, global_step, rank)`` before every training step."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        seed_step(self.seed, int(trainer.global_step), int(trainer.global_rank))
