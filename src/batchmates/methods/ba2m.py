"""``ba2m``: cross-entropy on a backbone whose blocks carry BA²M, the batch aware attention module
(Cheng et al. 2021, arXiv:2103.15099).

Paper: BA²M sits where SE/CBAM sit, on the residual branch of every residual block, before the sum; each
sample's features are rescaled by its softmax-over-the-batch share of an "attention complexity" score; the
network is trained with plain cross-entropy. See :mod:`batchmates.nn.ba2m` for the module itself.

Library choices:

* This is ``--method ce --attn-layer ba2m`` under its own name (so ``compare --methods ce,ba2m`` works), with
  the module's options exposed: ``weight_mode`` (``scaled``/``raw``/``residual``), ``reduction``, ``dilation``
  and ``placement`` (``block``: every residual block, the paper's; ``stage``: once per stage output). The plain
  ``cnn`` backbone has no residual blocks and applies the layer once per stage whatever ``placement`` says.
* ``weight_mode="residual"`` (``x·(1 + w_i)``) is the method's default, not the module's ``"scaled"``: measured on
  digits (cnn and resnet-small, SGD lr 0.05, 40 steps), ``"scaled"`` diverges (the scores ``A_i`` are not
  normalised, their spread across the batch grows with the activations, the batch softmax becomes one-hot and a
  single sample is multiplied by up to N = 64, compounded over stacked layers; loss 6 -> 600+, chance accuracy)
  and ``"raw"`` (x / N on average per layer) does not learn (chance), while ``"residual"`` trains like ``ce``.
* The same per-dataset defaults as ``ce`` (same backbone, budget and schedule), so ``ce`` vs ``ba2m`` isolates
  the attention module.
* Test predictions use the module's ``eval_mode`` (``"independent"`` by default: BA²M is the identity in eval, so
  no prediction depends on the other test images; ``--eval-mode batch`` keeps the batch weighting).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from batchmates.methods.ce import CrossEntropy
from batchmates.methods.registry import register_method
from batchmates.training.config import ConfigError, Option

__all__ = ["BA2MMethod"]


@register_method("ba2m")
class BA2MMethod(CrossEntropy):
    """CE with BA²M batch-aware attention in every residual block (arXiv:2103.15099)."""

    supervised = True
    batch_relational = True
    options: ClassVar[dict[str, Option]] = {
        **CrossEntropy.options,
        "weight_mode": Option(str, "residual", "how batch weights w_i scale a sample: residual (1 + w_i; the "
                              "method's default, stable), scaled (N*w_i, mean 1) or raw (w_i, the paper's equations)",
                              choices=("scaled", "raw", "residual")),
        "placement": Option(str, "block", "where BA2M sits: block (residual branch of every block, the paper's) "
                            "or stage (once per stage output)", choices=("block", "stage")),
        "reduction": Option(int, 16, "channel reduction r of the three attention branches (paper: 16)", minimum=1),
        "dilation": Option(int, 4, "dilation d of the local spatial branch's 3x3 conv (paper: 4)", minimum=1),
    }

    def build_backbone(self) -> nn.Module:
        from batchmates.models import create_backbone

        if self.cfg.attn_layer not in ("none", "ba2m"):
            raise ConfigError(
                f"method 'ba2m' puts BA2M into the backbone itself; attn_layer={self.cfg.attn_layer!r} would replace "
                f"it: drop --attn-layer (or use --method ce --attn-layer {self.cfg.attn_layer})"
            )
        if self.cfg.backbone == "vit-tiny":
            raise ConfigError("method 'ba2m' needs a convolutional backbone (cnn, resnet-small, resnet18); "
                              "got --backbone vit-tiny")
        return create_backbone(
            self.cfg.backbone,
            in_channels=self.info.in_channels,
            image_size=self.info.image_size,
            attn_layer="ba2m",
            attn_placement=self.opts["placement"],
            attn_kwargs={
                "reduction": self.opts["reduction"],
                "dilation": self.opts["dilation"],
                "weight_mode": self.opts["weight_mode"],
                "eval_mode": self.cfg.eval_mode,
            },
        )
