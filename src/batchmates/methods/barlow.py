"""``barlow``: Barlow Twins pretraining (Zbontar et al. 2021, arXiv:2103.03230), then a linear probe.

Paper / official code (facebookresearch/barlowtwins): two asymmetrically augmented views (``barlow_a``: blur
always; ``barlow_b``: rare blur, solarisation), a projector of three linear layers with BatchNorm + ReLU
between them and no bias (the official code has no bias on any projector layer), the loss
``Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²`` on the cross-correlation of the per-feature normalised projector outputs
over the global batch (:class:`batchmates.losses.BarlowTwinsLoss`, λ = 0.0051), then a linear classifier on the
frozen encoder features.

Library choices:
* Projector width ``proj_dim``: the paper's 8192 for images of 64 px and more, 2048 at 32 px (CIFAR, as
  solo-learn), 512 for smaller images (digits, Fashion-MNIST) (``proj_dim=0``, "auto"); any width by option.
* Optimiser: the paper uses LARS (lr 0.2 for weights, 0.0048 for biases and BN, batch 2048). No maintained LARS
  implementation is a runtime dependency here and we do not write one: ``barlow`` uses the trainer's SGD-momentum
  or AdamW (default on digits: AdamW) with warm-up and cosine decay; biases and norms have no weight decay.
* Linear classifier = the trainer's linear probe on the frozen ``embed`` features (no ``classify``).
* Batch curation (The Bad Batches, arXiv:2403.19579; options ``curate*``, see :mod:`batchmates.methods.curation`):
  ``frd-batch`` (skip / reaugment) and the per-pair ``drop`` and ``resample`` policies; dropped pairs are removed
  from the projector outputs before the loss. ``reweight`` is not defined (the loss is a function of batch
  statistics, with no per-pair terms) and is rejected with a ``ConfigError``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from batchmates.config import Option, RunConfig
from batchmates.curation import CurationResult, apply_curation
from batchmates.data.augment import TwoViews
from batchmates.losses import BarlowTwinsLoss
from batchmates.methods.base import DataInfo, Method
from batchmates.methods.curation import CURATION_OPTIONS, CurationMixin
from batchmates.methods.registry import register_method

__all__ = ["BarlowTwins", "barlow_projector", "auto_projector_width"]


def auto_projector_width(image_size: int) -> int:
    """Library default projector width: 512 below 32 px, 2048 at 32-63 px, the paper's 8192 from 64 px."""
    if image_size < 32:
        return 512
    if image_size < 64:
        return 2048
    return 8192


def barlow_projector(in_dim: int, width: int, layers: int = 3) -> nn.Sequential:
    """``layers`` bias-free Linear layers of ``width`` with BatchNorm1d + ReLU between them (official projector)."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        d = width
    mods.append(nn.Linear(d, width, bias=False))
    return nn.Sequential(*mods)


@register_method("barlow")
class BarlowTwins(CurationMixin, Method):
    """Barlow Twins pretraining (arXiv:2103.03230), then a linear probe on frozen features."""

    supervised = False
    batch_relational = True
    reweight_supported = False
    options: ClassVar[dict[str, Option]] = {
        "proj_dim": Option(int, 0, "projector width (0 = auto: 512 below 32 px, 2048 at 32 px, 8192 from 64 px)",
                           minimum=0),
        "proj_layers": Option(int, 3, "number of Linear layers in the projector (paper: 3)", minimum=1),
        "lambda_param": Option(float, 0.0051, "weight λ of the off-diagonal (redundancy) term", minimum=0.0),
        "scale_loss": Option(float, 1.0, "overall factor on the loss (official option)", minimum=1e-8),
        **CURATION_OPTIONS,
    }

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        width = self.resolve_option("proj_dim", int(self.opts["proj_dim"]) or auto_projector_width(info.image_size))
        self.projector = barlow_projector(int(self.backbone.feature_dim), width, int(self.opts["proj_layers"]))
        self.loss_fn = BarlowTwinsLoss(float(self.opts["lambda_param"]), scale_loss=float(self.opts["scale_loss"]))
        self.setup_curation()

    @classmethod
    def default_settings(cls, data: str) -> dict[str, Any]:
        d = super().default_settings(data)
        if data == "digits":
            # Sized for `make demo` (<= ~10 s per run on 2 CPU cores); AdamW copes with the loss scale (~width).
            d.update(epochs=3, batch_size=128, lr=2e-3, optimizer="adamw", weight_decay=1e-4, warmup_epochs=0.0)
        return d

    def build_train_augment(self) -> TwoViews:
        return TwoViews(self.make_augment("barlow_a"), self.make_augment("barlow_b"))

    def project(self, v: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(v))

    def barlow_loss(self, z1: torch.Tensor, z2: torch.Tensor, result: CurationResult | None) -> torch.Tensor:
        """Barlow Twins loss of the (kept) pairs; ``result`` is this step's curation (or None)."""
        if result is not None:
            z1, z2, _ = apply_curation(z1, z2, result)
        return self.loss_fn(z1, z2)

    def encode_views(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(h1, h2, z1, z2)``: two forward passes, as the official code (BatchNorm statistics are per view);
        curation scores these features (detached) instead of a second forward."""
        h1, h2 = self.backbone(v1), self.backbone(v2)
        return h1, h2, self.projector(h1), self.projector(h2)

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss of a ``(uint8 images, labels)`` batch (labels unused) and the curation statistics."""
        cv = self.curated_forward(batch[0])
        if cv.skip:  # a batch-level policy rejected the batch: a zero loss, no update (see methods.curation)
            return self.curation_skip_loss(), cv.log
        return self.barlow_loss(cv.z1, cv.z2, cv.result), cv.log

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, extra = self.compute_loss(batch)
        self.log_curated(loss, batch_size=int(batch[0].shape[0]), extra=extra)
        return loss
