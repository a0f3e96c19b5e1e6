"""``btn``: the Batch Transformer head, Multi-Level Attention + Class Batch Attention (Her et al. 2024,
arXiv:2407.04218), on any batchmates backbone.

Paper: the main classifier reads features fused over several backbone levels (MLA); its logits ``v`` are the
values of Class Batch Attention, whose class-specific queries/keys relate the samples of the batch; outputs
``cba`` and ``bt = cba + v``; training minimises the cross-entropy of the main, ``bt`` and ``cba`` logits. The
paper evaluates on facial expression recognition, where labels are noisy/ambiguous; here the matching protocol
is symmetric label noise on the training split (``--label-noise``).

Library choices (see :class:`batchmates.nn.BatchTransformerHead` for the head's own): ``K`` = number of classes,
q/k from the last stage via 1x1 convs with a positional encoding; loss ``lambda_main·CE(main) + CE(bt) +
CE(cba)``; prediction from the main head (``--eval-mode independent``, default: no test prediction depends on
the other test images) or from ``bt`` (``--eval-mode batch``: CBA attends across the test batch). The
``feature_map_size`` of the last stage (needed by the learned positional encoding) is found with one dummy
forward of the backbone at construction; MLA pools every stage to the last stage's grid, at most 4x4 (pooling
a 2x2 map up to 4x4 would only repeat tokens and quadruple MLA's cost).
Per-dataset defaults: the ``ce`` budget (backbone, epochs, batch size) with AdamW, lr 1e-3, weight decay 0.05.
``embed`` (kNN / linear probe) gives the backbone's pooled features.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from batchmates.config import ConfigError, Option, RunConfig
from batchmates.methods.base import DataInfo, Method
from batchmates.methods.registry import register_method
from batchmates.nn import BatchTransformerHead

__all__ = ["BatchTransformerMethod"]


def _last_stage_size(backbone: nn.Module, info: DataInfo) -> tuple[int, int]:
    """``(H, W)`` of the backbone's last stage (token maps: a square grid if ``T`` is a square, else ``(T, 1)``)."""
    was = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            probe = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
            last = backbone.forward_stages(probe)[-1]
    finally:
        backbone.train(was)
    if last.dim() == 4:
        return int(last.shape[2]), int(last.shape[3])
    t = int(last.shape[1])
    side = math.isqrt(t)
    return (side, side) if side * side == t else (t, 1)


@register_method("btn")
class BatchTransformerMethod(Method):
    """Batch Transformer: MLA-fused main head + Class Batch Attention over the batch (arXiv:2407.04218)."""

    supervised = True
    batch_relational = True
    options: ClassVar[dict[str, Option]] = {
        "lambda_main": Option(float, 1.0, "weight of the main head's CE in lambda*CE(main) + CE(bt) + CE(cba)",
                              minimum=0.0),
        "mla": Option(bool, True, "fuse all backbone stages with Multi-Level Attention (false: pool the last stage)"),
        "mla_dim": Option(int, 128, "MLA token width", minimum=1),
        "mla_tokens": Option(int, 0, "MLA grid side: each stage is pooled to tokens x tokens (0: the last stage's "
                             "grid side, at most 4)", minimum=0),
        "mla_depth": Option(int, 1, "MLA transformer layers", minimum=1),
        "mla_heads": Option(int, 4, "MLA attention heads (must divide mla_dim)", minimum=1),
        "pos_encoding": Option(str, "learned", "positional encoding added before the q/k 1x1 convs",
                               choices=("learned", "sine", "none")),
        "cba_scale": Option(str, "sqrt_k", "CBA score scale: 1/sqrt(K classes) (paper) or 1/sqrt(E tokens)",
                            choices=("sqrt_k", "sqrt_e")),
        "dropout": Option(float, 0.0, "dropout before the main classifier and inside MLA", minimum=0.0,
                          maximum=0.99),
    }

    @classmethod
    def default_settings(cls, data: str) -> dict[str, Any]:
        # The MLA/CBA head is a transformer: AdamW (library choice). Measured on digits (cnn, 40 steps): SGD at
        # lr 0.05 or 0.01 diverges or stalls at chance; AdamW lr 1e-3 reaches 72 % test top-1.
        d = super().default_settings(data)
        d.update(optimizer="adamw", lr=1e-3, weight_decay=0.05)
        return d

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        o = self.opts
        if o["mla"] and o["mla_dim"] % o["mla_heads"]:
            raise ConfigError(f"option mla_heads={o['mla_heads']} must divide mla_dim={o['mla_dim']}")
        stage_dims = [int(c) for c in self.backbone.stage_dims]
        size = _last_stage_size(self.backbone, info)
        tokens = self.resolve_option("mla_tokens", o["mla_tokens"] or max(1, min(4, *size)))
        self.head = BatchTransformerHead(
            stage_dims,
            info.num_classes,
            feature_map_size=size,
            mla_dim=o["mla_dim"],
            use_mla=o["mla"],
            lambda_main=o["lambda_main"],
            eval_mode=cfg.eval_mode,
            pos_encoding=o["pos_encoding"],
            mla_tokens=tokens,
            mla_depth=o["mla_depth"],
            mla_heads=o["mla_heads"],
            cba_scale=o["cba_scale"],
            dropout=o["dropout"],
        )

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Main-head logits (``eval_mode="independent"``) or ``bt`` logits (``"batch"``) in eval."""
        return self.head.predict(self.head(self.backbone.forward_stages(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        out = self.head(self.backbone.forward_stages(self.train_views(x)))
        loss = self.head.loss(out, y)
        acc = (out.main.detach().argmax(dim=1) == y).float().mean()
        self.log_train(loss, batch_size=x.shape[0], acc=acc)
        return loss
