"""``ba2m``: cross-entropy on a backbone whose blocks carry BA²M, the batch aware attention module
(Cheng et al. 2021, arXiv:2103.15099).

Paper: each sample's features are rescaled by its softmax-over-the-batch share of an "attention complexity" score;
the paper claims classification gains on CIFAR-100 and ImageNet-1K over SE/CBAM-style attention. See
:mod:`batchmates.nn.ba2m` for the module, its equations and which parts are ours. Training it with plain
cross-entropy is ours.

Library choices:

* This is ``--method ce --attn-layer ba2m`` under its own name (so ``compare --methods ce,ba2m`` works), with
  the module's options exposed: ``weight_mode`` (``scaled``/``raw``/``residual``), ``score``
  (``bounded``/``literal``), ``reduction``, ``dilation`` and ``placement`` (``block``: the residual branch of every
  residual block, before the sum, where SE/CBAM sit; ``stage``: once per stage output). The placement is ours: the
  paper's figures were not readable. The plain ``cnn`` backbone has no residual blocks and applies the layer once
  per stage whatever ``placement`` says.
* Defaults are the module's: ``score="bounded"`` (the fused map through a sigmoid before the mean) and
  ``weight_mode="scaled"`` (N·w_i, mean factor 1). With the paper's unbounded score the batch softmax is nearly
  one-hot from the first step and the first gradient norm is more than 10x that of the same backbone without
  attention, while the default's stays within 3x (both asserted on cnn and resnet-small in tests/test_ba2m.py).
  ``weight_mode="raw"`` (the equations' w_i, mean 1/N) trains, and since independent eval multiplies by the
  expected training factor (1/N_train) its test accuracy no longer collapses to chance.
* The same per-dataset defaults as ``ce`` (same backbone, budget and schedule), so ``ce`` vs ``ba2m`` isolates
  the attention module.
* Test predictions use the module's ``eval_mode`` (``"independent"`` by default: no prediction depends on the
  other test images; ``--eval-mode batch`` keeps the batch weighting). Independent eval weights each test sample
  by its own score against the running partition function kept in training (``eval_form=running``, default) or
  multiplies by each layer's expected training factor (``eval_form=expected``).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from batchmates.config import ConfigError, Option
from batchmates.methods.ce import CrossEntropy
from batchmates.methods.registry import register_method

__all__ = ["BA2MMethod"]


@register_method("ba2m")
class BA2MMethod(CrossEntropy):
    """CE with BA²M batch-aware attention in every residual block (arXiv:2103.15099)."""

    supervised = True
    batch_relational = True
    options: ClassVar[dict[str, Option]] = {
        **CrossEntropy.options,
        "weight_mode": Option(str, "scaled", "how batch weights w_i scale a sample: scaled (N*w_i, mean 1; default), "
                              "raw (w_i, the paper's equations) or residual (1 + w_i)",
                              choices=("scaled", "raw", "residual")),
        "score": Option(str, "bounded", "per-sample score before the batch softmax: bounded (mean of sigmoid(max), "
                        "stable; default) or literal (the paper's unbounded mean(max): one-hot weights at init)",
                        choices=("bounded", "literal")),
        "placement": Option(str, "block", "where BA2M sits (ours; the paper does not say): block (residual branch "
                            "of every block) or stage (once per stage output)", choices=("block", "stage")),
        "reduction": Option(int, 16, "channel reduction r of the three attention branches (ours: 16)", minimum=1),
        "dilation": Option(int, 4, "dilation d of the local spatial branch's 3x3 conv (ours: 4)", minimum=1),
        "eval_form": Option(str, "running", "independent eval: running (each sample's score against the training "
                            "batches' running partition function, as BatchNorm keeps statistics; default) or "
                            "expected (the mean training factor, the same for every sample)",
                            choices=("running", "expected")),
    }

    def build_backbone(self) -> nn.Module:
        if self.cfg.attn_layer not in ("none", "ba2m"):
            raise ConfigError(
                f"method 'ba2m' puts BA2M into the backbone itself; attn_layer={self.cfg.attn_layer!r} would replace "
                f"it: drop --attn-layer (or use --method ce --attn-layer {self.cfg.attn_layer})"
            )
        if self.cfg.backbone in ("vit-tiny", "vit-tiny-conv"):
            raise ConfigError("method 'ba2m' needs a convolutional backbone (cnn, resnet-small, resnet18, or a timm/"
                              f"torchvision ResNet such as timm:resnet18); got --backbone {self.cfg.backbone}")
        return self.create_run_backbone(  # a model without residual blocks: ConfigError naming --backbone
            self.cfg.backbone,
            attn_layer="ba2m",
            attn_placement=self.opts["placement"],
            attn_kwargs={
                "reduction": self.opts["reduction"],
                "dilation": self.opts["dilation"],
                "weight_mode": self.opts["weight_mode"],
                "score": self.opts["score"],
                "eval_form": self.opts["eval_form"],
                "eval_mode": self.cfg.eval_mode,
            },
        )
