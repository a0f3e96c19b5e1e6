"""``swav``: SwAV self-supervised pretraining, swapped prediction of online cluster codes
(Caron et al. 2020, arXiv:2006.09882).

Per training step (paper, Sec. 3 and the official ``main_swav.py``):

1. multi-crop views of the uint8 batch (:class:`batchmates.data.augment.MultiCrop`): 2 high-resolution crops
   and ``n_low_crops`` low-resolution crops, sizes and scales by dataset (:func:`~batchmates.data.augment.
   multicrop_sizes` / :func:`~batchmates.data.augment.multicrop_scales`);
2. backbone -> projection MLP (Linear -> BN -> ReLU -> Linear, as the official head) -> L2-normalise ->
   :class:`~batchmates.losses.swav.SwAVPrototypes` scores; crops of one resolution go through the network
   together (one concatenated batch per resolution, as the official model does);
3. :class:`~batchmates.losses.swav.SwAVLoss`: Sinkhorn codes of the high-resolution crops, predicted from every
   other crop;
4. prototype rows re-normalised to unit length before every step (and right after the optimiser step, so
   checkpoints hold unit rows); prototype gradients dropped for the first ``freeze_prototypes`` iterations
   (``on_after_backward``);
5. optional queue (:class:`~batchmates.losses.swav.SwAVQueue`) of past high-resolution embeddings, filled from
   epoch ``queue_start_epoch`` on and used by Sinkhorn once full.

Paper defaults kept: temperature 0.1, epsilon 0.05, 3 Sinkhorn iterations, 128-d projections, 2 high-resolution
crops as assignment crops. Library choices (documented in the options; "auto" values depend on the dataset):

* ``n_prototypes=0`` (auto): 30 on digits, 300 on Fashion-MNIST, 3000 (the paper's ImageNet value) elsewhere;
* ``epsilon=0`` (auto): 0.02 on digits, the paper's 0.05 elsewhere. Measured on digits (8x8 px, batch 64): with
  0.05 the prototype scores are so close together that the codes are nearly uniform and training collapses to
  the uniform solution (loss stuck at ``log K``); 0.02 learns;
* ``n_low_crops=-1`` (auto): 0 low-resolution crops for images of at most 12 px (a low crop of an 8-px digit is a
  3x3-pixel patch), else 2 (paper: 6 on ImageNet), so that small runs stay fast;
* a 512-wide projection hidden layer (paper: 2048), the queue disabled by default (``queue_length=0``), and
  prototypes frozen for the first epoch by default (the paper's 313 iterations are one ImageNet epoch at
  batch 4096).

On digits the defaults are 4 epochs at lr 0.2 (SGD; ``default_settings``). The optimiser is the trainer's
SGD-momentum or AdamW with warm-up and cosine decay; LARS (used by the paper for large batches) is not used. The
method has no classifier: the trainer reports the accuracy of a linear probe on the frozen backbone features
(``embed``), plus kNN.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from batchmates.config import ConfigError, Option, RunConfig
from batchmates.losses.swav import SwAVLoss, SwAVPrototypes, SwAVQueue
from batchmates.methods.base import DataInfo, Method
from batchmates.methods.registry import register_method

__all__ = ["SwAV", "auto_n_prototypes", "auto_epsilon", "auto_n_low_crops"]

#: Library defaults for ``n_prototypes=0`` (auto); the paper's 3000 is for ImageNet.
AUTO_PROTOTYPES: dict[str, int] = {"digits": 30, "fashion-mnist": 300}
#: Library defaults for ``epsilon=0`` (auto); the paper's 0.05 everywhere else.
AUTO_EPSILON: dict[str, float] = {"digits": 0.02}


def auto_n_prototypes(data: str) -> int:
    """Number of prototypes for ``n_prototypes=0``: 30 on digits, 300 on Fashion-MNIST, else 3000 (paper)."""
    return AUTO_PROTOTYPES.get(data.split(":", 1)[0], 3000)


def auto_epsilon(data: str) -> float:
    """Sinkhorn epsilon for ``epsilon=0``: 0.02 on digits, else 0.05 (paper)."""
    return AUTO_EPSILON.get(data.split(":", 1)[0], 0.05)


def auto_n_low_crops(image_size: int) -> int:
    """Low-resolution crops for ``n_low_crops=-1``: 0 for images of at most 12 px (a low crop of an 8-px digit
    keeps a 3x3-pixel patch), else 2 (paper: 6 on ImageNet)."""
    return 0 if image_size <= 12 else 2


@register_method("swav")
class SwAV(Method):
    """SwAV (arXiv:2006.09882): multi-crop swapped prediction of Sinkhorn cluster codes over learned prototypes."""

    supervised = False
    batch_relational = True
    summary = "SwAV: multi-crop swapped prediction of Sinkhorn cluster codes (arXiv:2006.09882)"
    options: ClassVar[dict[str, Option]] = {
        "n_prototypes": Option(int, 0, "number of prototypes K; 0 = auto (30 digits, 300 fashion-mnist, else "
                               "3000 = paper's ImageNet value)", minimum=0),
        "proj_dim": Option(int, 128, "projection (and prototype) dimension D (paper 128)", minimum=1),
        "proj_hidden": Option(int, 512, "hidden width of the projection MLP (paper 2048; ours 512)", minimum=1),
        "temperature": Option(float, 0.1, "softmax temperature of the predictions (paper 0.1)", minimum=1e-6),
        "epsilon": Option(float, 0.0, "Sinkhorn entropy regularisation; 0 = auto (0.02 digits, else 0.05 = "
                          "paper)", minimum=0.0),
        "sinkhorn_iterations": Option(int, 3, "Sinkhorn-Knopp iterations (paper 3)", minimum=1),
        "n_low_crops": Option(int, -1, "low-resolution crops besides the 2 high-resolution ones; -1 = auto (0 for "
                              "images <= 12 px, else 2; paper 6)", minimum=-1),
        "queue_length": Option(int, 0, "queue of past embeddings (0 = no queue; paper 3840 for small batches); a "
                               "multiple of the global batch size", minimum=0),
        "queue_start_epoch": Option(int, 2, "epoch (0-based) from which the queue is filled; used once full "
                                    "(paper 15 on ImageNet)", minimum=0),
        "freeze_prototypes": Option(int, -1, "iterations with frozen prototypes (-1 = the first epoch; paper 313 "
                                    "= one ImageNet epoch at batch 4096)", minimum=-1),
    }

    @classmethod
    def default_settings(cls, data: str) -> dict[str, Any]:
        d = super().default_settings(data)
        if data == "digits":  # 2 crops per image: ~ the cost of 8 epochs of ce
            d.update(epochs=4, lr=0.2)
        return d

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        o = self.opts
        # automatic values (0 / -1) are written resolved into config.yaml and the checkpoint
        self.n_prototypes = self.resolve_option("n_prototypes", int(o["n_prototypes"]) or auto_n_prototypes(info.name))
        self.epsilon = self.resolve_option("epsilon", float(o["epsilon"]) or auto_epsilon(info.name))
        self.resolve_option("n_low_crops", self.n_low_crops)  # resolved in build_train_augment
        queue_length = int(o["queue_length"])
        if queue_length and queue_length % int(cfg.batch_size):
            fix = max(1, round(queue_length / cfg.batch_size)) * cfg.batch_size
            raise ConfigError(
                f"option queue_length={queue_length} must be a multiple of the global batch size "
                f"{cfg.batch_size}; use e.g. --opt queue_length={fix} (or 0 to disable the queue)"
            )
        dim = int(o["proj_dim"])
        feat = int(self.backbone.feature_dim)
        hidden = int(o["proj_hidden"])
        # Official SwAV head: Linear -> BN -> ReLU -> Linear (no normalisation inside; done by the prototypes).
        self.projector = nn.Sequential(
            nn.Linear(feat, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim)
        )
        self.prototypes = SwAVPrototypes(dim, self.n_prototypes, freeze_iterations=max(0, o["freeze_prototypes"]))
        self.queue = SwAVQueue(queue_length, dim, n_crops=2) if queue_length else None
        self.loss_fn = SwAVLoss(o["temperature"], self.epsilon, o["sinkhorn_iterations"])

    # ------------------------------------------------------------------ views
    def build_train_augment(self) -> nn.Module:
        from batchmates.data.augment import MultiCrop, multicrop_sizes

        high, low = multicrop_sizes(self.info.image_size)
        n_low = int(self.opts["n_low_crops"])
        self.n_low_crops = n_low if n_low >= 0 else auto_n_low_crops(self.info.image_size)
        return MultiCrop(high, low, n_high=2, n_low=self.n_low_crops, channels=self.info.in_channels,
                         mean=self.info.mean, std=self.info.std, image_size=self.info.image_size,
                         strength="simclr", hflip=self.info.hflip)

    # ------------------------------------------------------------------ forward
    def project(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """Projections ``[B, proj_dim]`` of every crop (not normalised); crops of one size share a forward."""
        out: list[torch.Tensor] = []
        i = 0
        while i < len(crops):
            j = i
            while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
                j += 1
            z = self.projector(self.backbone(torch.cat(crops[i:j])))
            out.extend(z.chunk(j - i))
            i = j
        return out

    def queue_active(self) -> bool:
        """Whether the queue is being filled this epoch (it feeds Sinkhorn only once full)."""
        return self.queue is not None and int(self.current_epoch) >= int(self.opts["queue_start_epoch"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0]
        crops = self.train_views(x)
        z = self.project(crops)
        scores = self.prototypes(z)  # rows re-normalised here if the weight changed since the last step
        use_queue = self.queue_active()
        queue_scores = self.queue.scores(self.prototypes) if use_queue else None  # None until full
        loss = self.loss_fn(scores[:2], scores[2:], queue_scores=queue_scores)
        if use_queue:
            self.queue.enqueue(z[:2])  # after the loss, as in the official code
        self.log_train(loss, batch_size=x.shape[0], queue_used=float(queue_scores is not None),
                       prototypes_frozen=float(self.prototypes.is_frozen(int(self.global_step))))
        return loss

    # ------------------------------------------------------------------ hooks
    def freeze_iterations(self) -> int:
        """Effective number of frozen-prototype iterations (``-1`` resolves to one epoch of optimiser steps)."""
        n = int(self.opts["freeze_prototypes"])
        if n >= 0:
            return n
        if self.steps_per_epoch is not None:
            return int(self.steps_per_epoch)
        if self._trainer is not None:
            return int(self.trainer.num_training_batches)
        return 0

    def on_fit_start(self) -> None:
        self.prototypes.freeze_iterations = self.freeze_iterations()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.prototypes.normalize_()  # paper: rows re-normalised at the start of every iteration

    def on_after_backward(self) -> None:
        self.prototypes.freeze_prototypes_if(int(self.global_step))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Unit rows right after the update, before any checkpoint of this step is written: a run resumed from
        # that checkpoint then re-normalises exactly what the uninterrupted run re-normalises at the next step
        # start (normalising at batch end, after the checkpoint callbacks, made resumed runs differ in the last bits).
        self.prototypes.normalize_()
