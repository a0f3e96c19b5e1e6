"""``--accumulate N`` for contrastive methods: one optimiser step per batch, activations of 1/N of it at a time.

Paper: none of the method papers; the technique is GradCache's (Gao et al. 2021, arXiv:2101.06983), implemented in
:func:`batchmates.losses.cached_backward` (see there for what "exact" requires).

Library choices:

* The whole per-process batch is augmented once, then split into ``accumulate`` micro-batches: the loss is that of
  the whole batch (every anchor sees every negative), and the gradients are those of one large batch whenever the
  network draws no random numbers and has no BatchNorm in training mode (a BatchNorm normalises each micro-batch
  with its own statistics, as "ghost" BatchNorm; its running statistics are updated once per micro-batch).
* Lightning's manual optimisation: zero the gradients, :func:`~batchmates.losses.cached_backward`, one optimiser
  step, one scheduler step. Under DDP the reducer is prepared only before the last micro-batch's backward, so the
  gradients accumulated over all micro-batches are all-reduced once (the others' backward stays local).
* Refused with curation (it scores whole-batch features) and with ``16-mixed`` precision (no gradient scaler on
  this path; use ``bf16-mixed`` or ``32-true``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from batchmates.config import ConfigError, RunConfig
from batchmates.losses import cached_backward

__all__ = ["CachedAccumulationMixin"]


class CachedAccumulationMixin:
    """For a two-view contrastive :class:`~batchmates.methods.base.Method` with ``encode_views`` and ``loss_fn``.

    The method calls :meth:`setup_accumulation` at the end of ``__init__`` and starts ``training_step`` with
    ``if self.accumulating: return self.cached_step(batch)``.
    """

    cached_accumulation = True

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)  # type: ignore[misc]
        if cfg.accumulate <= 1:
            return
        if str(cfg.options.get("curate", "none")) != "none":
            raise ConfigError(f"accumulate={cfg.accumulate} cannot be combined with curation (--curate scores the "
                              "whole batch's features in one forward); drop one of them")
        if cfg.precision == "16-mixed":
            raise ConfigError(f"accumulate={cfg.accumulate} with precision=16-mixed: the cached path has no gradient "
                              "scaler; use --precision bf16-mixed or 32-true")

    def setup_accumulation(self) -> None:
        self.accumulating = int(self.cfg.accumulate) > 1  # type: ignore[attr-defined]
        if self.accumulating:
            self.automatic_optimization = False

    def _encoder(self, n_chunks: int) -> Callable[..., torch.Tensor]:
        strategy = self._trainer.strategy if getattr(self, "_trainer", None) is not None else None
        calls = [0]

        def encode(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
            z1, z2 = self.encode_views(v1, v2)[2:]  # type: ignore[attr-defined]
            out = torch.stack([z1, z2], dim=1)
            if torch.is_grad_enabled():
                calls[0] += 1
                if calls[0] == n_chunks and strategy is not None:
                    strategy.pre_backward(out)  # DDP: all-reduce during this (the last) backward only
            return out

        return encode

    def cached_loss_backward(self, batch: Any) -> torch.Tensor:
        """The whole batch's loss (detached); its exact gradients are accumulated into ``.grad``."""
        x, y = batch[0], batch[1]
        v1, v2 = self.train_views(x)  # type: ignore[attr-defined]
        labels = y if self.use_labels else None  # type: ignore[attr-defined]
        micro = math.ceil(x.shape[0] / int(self.cfg.accumulate))  # type: ignore[attr-defined]
        return cached_backward(self._encoder(math.ceil(x.shape[0] / micro)), (v1, v2), self.loss_fn,  # type: ignore
                               micro_batch_size=micro, loss_args=() if labels is None else (labels,),
                               norm_modules=[self])

    def cached_step(self, batch: Any) -> torch.Tensor:
        """One manual optimisation step on ``batch`` with cached accumulation."""
        opt = self.optimizers()  # type: ignore[attr-defined]
        opt.zero_grad()
        loss = self.cached_loss_backward(batch)
        opt.step()
        sched = self.lr_schedulers()  # type: ignore[attr-defined]
        if sched is not None:
            sched.step()
        self.log_train(loss, batch_size=int(batch[0].shape[0]))  # type: ignore[attr-defined]
        return loss
