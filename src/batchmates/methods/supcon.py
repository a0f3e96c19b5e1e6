"""``supcon`` and ``simclr``: two-view contrastive pretraining, then a linear probe on frozen features.

``supcon``: Supervised Contrastive Learning (Khosla et al. 2020, arXiv:2004.11362), the ``L_out`` loss with the
labels defining the positives. ``simclr``: SimCLR (Chen et al. 2020, arXiv:2002.05709), the same loss without
labels (NT-Xent: the positive of a view is the other view of its image).

Paper / official code (HobbitLong/SupContrast): two SimCLR-augmented views per image encoded in one forward pass,
a projection head ``Linear(F, F) → ReLU → Linear(F, 128)`` whose output is L2-normalised, the loss on the
``[N, 2, 128]`` features, then a linear classifier trained on the frozen encoder features (the head is
discarded). The recipe's ``temperature`` is 0.1 (our default); ``base_temperature`` is 0.07 for SupCon as in the
official loss, and equal to the temperature for SimCLR (plain NT-Xent).

Library choices: the linear classifier is the trainer's linear probe (the method has no ``classify``, so
``batchmates train`` fits a probe on the frozen ``embed`` features for its accuracy); the optimiser is the
trainer's SGD-momentum/AdamW/LARS (``--optimizer lars``, the paper's choice at batch 1024+) with warm-up and
cosine decay; ``--accumulate N`` gives the large batch's loss and gradients from N micro-batches
(:mod:`batchmates.methods.accumulate`);
the loss gathers the global batch under DDP (:class:`batchmates.losses.SupConLoss`); and batch curation by FRD
(The Bad Batches, arXiv:2403.19579; options ``curate*``, see :mod:`batchmates.methods.curation`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from batchmates.config import Option, RunConfig
from batchmates.curation import CurationResult, apply_curation, weighted_mean
from batchmates.data.augment import TwoViews
from batchmates.losses import SupConLoss
from batchmates.methods.accumulate import CachedAccumulationMixin
from batchmates.methods.base import DataInfo, Method
from batchmates.methods.curation import CURATION_OPTIONS, CurationMixin
from batchmates.methods.registry import register_method

__all__ = ["SupCon", "SimCLR", "ContrastiveMethod"]


def _contrastive_options(base_temperature: float, base_help: str) -> dict[str, Option]:
    return {
        "temperature": Option(float, 0.1, "softmax temperature τ of the contrastive loss (recipe: 0.1)",
                              minimum=1e-4),
        "base_temperature": Option(float, base_temperature, base_help, minimum=0.0),
        "proj_dim": Option(int, 128, "output width of the projection head (L2-normalised)", minimum=1),
        "hidden_dim": Option(int, 0, "hidden width of the projection head (0 = the backbone's feature width)",
                             minimum=0),
        "chunk_size": Option(int, 0, "SupCon loss block size for the memory-linear path (0 = automatic)",
                             minimum=0),
        **CURATION_OPTIONS,
    }


class ContrastiveMethod(CachedAccumulationMixin, CurationMixin, Method):
    """Shared implementation of ``supcon`` (labels) and ``simclr`` (no labels)."""

    batch_relational = True
    use_labels: ClassVar[bool] = True
    view_strength: ClassVar[str] = "simclr"

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        feat = int(self.backbone.feature_dim)
        hidden = self.resolve_option("hidden_dim", int(self.opts["hidden_dim"]) or feat)
        self.head = nn.Sequential(nn.Linear(feat, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, int(self.opts["proj_dim"])))
        tau = float(self.opts["temperature"])
        base = float(self.opts["base_temperature"]) or tau
        chunk = int(self.opts["chunk_size"]) or None
        self.loss_fn = SupConLoss(tau, base, chunk_size=chunk)
        self.loss_per_anchor = SupConLoss(tau, base, chunk_size=chunk, reduction="none")
        self.setup_curation()
        self.setup_accumulation()  # --accumulate N > 1: exact cached accumulation (methods.accumulate)

    @classmethod
    def default_settings(cls, data: str) -> dict[str, Any]:
        d = super().default_settings(data)
        if data == "digits":
            # Sized for `make demo` (<= ~10 s per run on 2 CPU cores): batch 128 gives more negatives per step.
            d.update(epochs=4, batch_size=128, lr=0.1, optimizer="sgd", weight_decay=1e-4, warmup_epochs=0.0)
        return d

    def build_train_augment(self) -> TwoViews:
        return TwoViews(self.make_augment(self.view_strength), self.make_augment(self.view_strength))

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """L2-normalised projection-head output ``[N, proj_dim]`` of normalised images (the paper's ``z``)."""
        return F.normalize(self.head(self.backbone(v)), dim=1)

    def contrastive_loss(
        self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor | None, result: CurationResult | None
    ) -> torch.Tensor:
        """The loss of the (kept) pairs ``(z1[i], z2[i])``; ``result`` is this step's curation (or None)."""
        if result is None:
            return self.loss_fn(torch.stack([z1, z2], dim=1), labels)
        keep = result.keep.to(z1.device)
        z1, z2, weights = apply_curation(z1, z2, result)
        if labels is not None:
            labels = labels[keep]
        feats = torch.stack([z1, z2], dim=1)
        if result.weights is not None:  # reweight: weighted mean of the per-anchor losses [2, N]
            return weighted_mean(self.loss_per_anchor(feats, labels), weights)
        return self.loss_fn(feats, labels)

    def encode_views(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Backbone features and normalised projections ``(h1, h2, z1, z2)`` of both views in one pass (BatchNorm
        sees both views, as the official code); curation scores these (detached) instead of a second forward."""
        n = v1.shape[0]
        h = self.backbone(torch.cat([v1, v2], dim=0))
        z = F.normalize(self.head(h), dim=1)
        return h[:n], h[n:], z[:n], z[n:]

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss of a ``(uint8 images, labels)`` batch and the step's curation statistics."""
        x, y = batch[0], batch[1]
        cv = self.curated_forward(x)
        if cv.skip:  # a batch-level policy rejected the batch: a zero loss, no update (see methods.curation)
            return self.curation_skip_loss(), cv.log
        return self.contrastive_loss(cv.z1, cv.z2, y if self.use_labels else None, cv.result), cv.log

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.accumulating:
            return self.cached_step(batch)
        loss, extra = self.compute_loss(batch)
        self.log_curated(loss, batch_size=int(batch[0].shape[0]), extra=extra)
        return loss


@register_method("supcon")
class SupCon(ContrastiveMethod):
    """Supervised contrastive pretraining (arXiv:2004.11362), then a linear probe on frozen features."""

    supervised = True
    use_labels = True
    options: ClassVar[dict[str, Option]] = _contrastive_options(
        0.07, "τ_base: the loss is scaled by τ/τ_base (official default 0.07; 0 = equal to temperature)")


@register_method("simclr")
class SimCLR(ContrastiveMethod):
    """SimCLR / NT-Xent pretraining without labels (arXiv:2002.05709), then a linear probe on frozen features."""

    supervised = False
    use_labels = False
    options: ClassVar[dict[str, Option]] = _contrastive_options(
        0.0, "τ_base: the loss is scaled by τ/τ_base (0 = equal to temperature, plain NT-Xent)")
