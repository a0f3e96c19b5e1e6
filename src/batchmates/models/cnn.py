"""A small plain CNN backbone (library baseline, no paper): three conv stages, global average pooling.

Stage ``s`` = [2×2 max-pool (stages after the first, while the map stays >= 2 px)] → (3×3 conv → BN → ReLU) × 2
→ optional attention layer. There are no residual blocks, so ``attn_layer`` is applied once at the end of
every stage whatever ``attn_placement`` says (library choice).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from batchmates.models.layers import ConvBackbone, create_attn_layer

__all__ = ["SmallCNN", "conv_bn_relu"]


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3×3 conv (no bias) → BatchNorm → ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SmallCNN(ConvBackbone):
    """Plain CNN: ``widths`` channels per stage (default 32-64-128), ``feature_dim = widths[-1]``."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        *,
        widths: Sequence[int] = (32, 64, 128),
        attn_layer: str | None = "none",
        attn_placement: str = "stage",
        attn_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if attn_placement not in ("block", "stage"):
            raise ValueError(f"attn_placement must be 'block' or 'stage'; got {attn_placement!r}")
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty sequence of positive ints; got {widths!r}")
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        stages = []
        cin, size = self.in_channels, self.image_size
        for i, w in enumerate(widths):
            layers: list[nn.Module] = []
            if i > 0 and size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            layers += [conv_bn_relu(cin, int(w)), conv_bn_relu(int(w), int(w))]
            layers.append(create_attn_layer(attn_layer, int(w), **(attn_kwargs or {})))
            stages.append(nn.Sequential(*layers))
            cin = int(w)
        self.stages = nn.ModuleList(stages)
        self.feature_dim = int(widths[-1])
        self.stage_dims = [int(w) for w in widths]
        self.stage_kinds = ["map"] * len(widths)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # channels-last parameters: see ConvBackbone.
        self.to(memory_format=torch.channels_last)
