"""``ce``: supervised cross-entropy with a linear classifier on the backbone (the baseline every method is
compared with). With ``--attn-layer se`` it is "CE + SE" (Hu et al. 2018, arXiv:1709.01507); with
``--attn-layer ba2m`` it is the BA²M setting of Cheng et al. 2021 (arXiv:2103.15099).

Label smoothing (Szegedy et al. 2016, arXiv:1512.00567) is an option, off by default (library choice).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from batchmates.config import Option, RunConfig
from batchmates.methods.base import DataInfo, Method
from batchmates.methods.registry import register_method

__all__ = ["CrossEntropy"]


@register_method("ce")
class CrossEntropy(Method):
    """Cross-entropy on one weakly augmented view, linear classifier on the pooled backbone features."""

    supervised = True
    batch_relational = False
    options: ClassVar[dict[str, Option]] = {
        "label_smoothing": Option(float, 0.0, "label smoothing of the cross-entropy target", minimum=0.0,
                                  maximum=0.999),
    }

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        self.classifier = nn.Linear(int(self.backbone.feature_dim), info.num_classes)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self.classify(self.train_views(x))
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.opts["label_smoothing"])
        acc = (logits.detach().argmax(dim=1) == y).float().mean()
        self.log_train(loss, batch_size=x.shape[0], acc=acc)
        return loss
