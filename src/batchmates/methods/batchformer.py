"""``batchformer``: a transformer encoder layer across the batch during training, with a classifier shared
between the features before and after it (BatchFormer, Hou et al., CVPR 2022, arXiv:2203.01522).

Paper: ``f = backbone(x)``; in training the batch of features ``[B, D]`` goes through one transformer encoder
layer whose "sequence" is the batch, and one classifier is trained on both ``f`` and ``BatchFormer(f)`` (logits
on ``cat([f, BatchFormer(f)])``, labels repeated); because the classifier also fits the pre-layer features, the
layer is dropped at test time: ``logits = classifier(backbone(x))``, so a test prediction never depends on the
other test images. Official defaults: 4 heads, feed-forward width D, dropout 0.5.

Library choices:

* ``dropout`` defaults to 0.0 here (the small digits/CPU budget; the official 0.5 is ``--opt dropout=0.5``).
* ``--eval-mode batch`` (opt-in) classifies ``classifier(BatchFormer(f))`` with the layer attending across the
  test batch; the default ``independent`` drops the layer as the paper does.
* The reported training accuracy is that of the pre-layer features (what the test-time classifier sees).
* Features for kNN / linear probe (``embed``) are the backbone's pooled features, the test-time path.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from batchmates.config import ConfigError, Option, RunConfig
from batchmates.methods.base import DataInfo, Method
from batchmates.methods.registry import register_method
from batchmates.nn import BatchFormer

__all__ = ["BatchFormerMethod"]


@register_method("batchformer")
class BatchFormerMethod(Method):
    """CE through a BatchFormer layer over the batch, shared classifier, layer dropped at test (arXiv:2203.01522)."""

    supervised = True
    batch_relational = True
    options: ClassVar[dict[str, Option]] = {
        "num_heads": Option(int, 4, "attention heads of the BatchFormer layer (paper: 4); must divide the "
                            "backbone's feature width", minimum=1),
        "dim_feedforward": Option(int, 0, "feed-forward width of the layer (0: the feature width D, as in the "
                                  "official code)", minimum=0),
        "dropout": Option(float, 0.0, "dropout inside the layer (official code: 0.5)", minimum=0.0, maximum=0.99),
        "norm_first": Option(bool, False, "pre-norm layer instead of the paper's post-norm"),
        "label_smoothing": Option(float, 0.0, "label smoothing of the cross-entropy target", minimum=0.0,
                                  maximum=0.999),
    }

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        dim = int(self.backbone.feature_dim)
        heads = self.opts["num_heads"]
        if dim % heads:
            raise ConfigError(f"option num_heads={heads} must divide the feature width {dim} of backbone "
                              f"{cfg.backbone!r}; pick a divisor of {dim}, e.g. --opt num_heads=4")
        ff = self.resolve_option("dim_feedforward", self.opts["dim_feedforward"] or dim)
        self.batchformer = BatchFormer(dim, heads, cfg.eval_mode, dim_feedforward=ff, dropout=self.opts["dropout"],
                                       norm_first=self.opts["norm_first"])
        self.classifier = nn.Linear(dim, info.num_classes)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        if not self.training and self.batchformer.eval_mode == "batch":
            f = self.batchformer(f)  # opt-in: relate the test batch
        return self.classifier(f)  # default: the layer is dropped at test time (paper)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        f = self.backbone(self.train_views(x))
        both, y2 = self.batchformer.augment(f, y)  # cat([f, BatchFormer(f)]), cat([y, y])
        logits = self.classifier(both)
        loss = F.cross_entropy(logits.float(), y2, label_smoothing=self.opts["label_smoothing"])
        acc = (logits[: y.shape[0]].detach().argmax(dim=1) == y).float().mean()
        self.log_train(loss, batch_size=x.shape[0], acc=acc)
        return loss
