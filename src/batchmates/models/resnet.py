"""CIFAR-style ResNets (He et al. 2016, arXiv:1512.03385) with a pluggable attention layer per block.

Paper: BasicBlock (two 3×3 convs + identity / 1×1-projection shortcut), ResNet-18 = [2, 2, 2, 2] blocks of
widths 64-128-256-512. CIFAR variant (common practice, e.g. Zagoruyko & Komodakis / solo-learn): 3×3 stem
at stride 1 and no max-pool.

Library choices:

* ``attn_layer`` (a name from :mod:`batchmates.models.layers`: ``"none"``, ``"se"``, ``"ba2m"``, ...) acts on
  the residual branch after the second BN and before the sum, where SE (Hu et al. 2018) and BA²M
  (Cheng et al. 2021, arXiv:2103.15099) place it; ``attn_placement="stage"`` instead applies one layer to
  every stage's output.
* A stage downsamples (stride 2) only while its output stays at least 2×2, so small inputs (8×8 digits) never
  reach a 1×1 map, where BatchNorm in training mode cannot run on a single sample.
* ``"resnet-small"``: widths 16-32-64-128, one block per stage, and a stride-2 first stage for inputs of
  24 px and more (28×28 -> 14, 7, 4, 2): about 3.5 M multiply-adds per 28×28 image, cheap enough to train
  Fashion-MNIST on two CPU cores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from batchmates.models.layers import ConvBackbone, create_attn_layer

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet_small", "auto_strides"]


class BasicBlock(nn.Module):
    """``relu(attn(bn2(conv2(relu(bn1(conv1(x)))))) + shortcut(x))``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int = 1,
        *,
        attn_layer: str | None = "none",
        attn_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.attn = create_attn_layer(attn_layer, cout, **(attn_kwargs or {}))
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.attn(self.bn2(self.conv2(out)))
        return self.relu(out + self.shortcut(x))


def auto_strides(image_size: int, n_stages: int, first_stride: int = 1) -> list[int]:
    """Stage strides: ``first_stride`` then 2, each reduced to 1 where the map would drop below 2×2."""
    strides, size = [], int(image_size)
    for i in range(n_stages):
        s = first_stride if i == 0 else 2
        if s == 2 and -(-size // 2) < 2:
            s = 1
        size = -(-size // s)
        strides.append(s)
    return strides


class ResNet(ConvBackbone):
    """A CIFAR-style ResNet of :class:`BasicBlock` s; ``feature_dim = widths[-1]``.

    Args:
        in_channels, image_size: input geometry.
        widths, blocks: channels and number of blocks per stage (the stem has ``widths[0]`` channels).
        strides: per-stage strides (default :func:`auto_strides` with ``first_stride``).
        attn_layer, attn_placement, attn_kwargs: the attention hook (see module docstring).
        zero_init_residual: start each block's last BN at γ=0 (Goyal et al. 2017); off by default.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (2, 2, 2, 2),
        strides: Sequence[int] | None = None,
        first_stride: int = 1,
        attn_layer: str | None = "none",
        attn_placement: str = "block",
        attn_kwargs: dict[str, Any] | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if attn_placement not in ("block", "stage"):
            raise ValueError(f"attn_placement must be 'block' or 'stage'; got {attn_placement!r}")
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths and blocks need the same non-zero length; got {len(widths)} and {len(blocks)}")
        if any(int(b) < 1 for b in blocks) or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths and blocks must be positive; got widths={widths!r}, blocks={blocks!r}")
        strides = list(strides) if strides is not None else auto_strides(image_size, len(widths), first_stride)
        if len(strides) != len(widths) or any(s not in (1, 2) for s in strides):
            raise ValueError(f"strides must be {len(widths)} values of 1 or 2; got {strides!r}")
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self.strides = strides
        self.attn_placement = attn_placement
        kw = attn_kwargs or {}
        self.stem = nn.Sequential(
            nn.Conv2d(self.in_channels, int(widths[0]), 3, padding=1, bias=False),
            nn.BatchNorm2d(int(widths[0])),
            nn.ReLU(inplace=True),
        )
        block_attn = attn_layer if attn_placement == "block" else "none"
        stages = []
        cin = int(widths[0])
        for w, n, s in zip(widths, blocks, strides):
            layers: list[nn.Module] = []
            for j in range(int(n)):
                layers.append(BasicBlock(cin, int(w), s if j == 0 else 1, attn_layer=block_attn, attn_kwargs=kw))
                cin = int(w)
            if attn_placement == "stage":
                layers.append(create_attn_layer(attn_layer, int(w), **kw))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.feature_dim = int(widths[-1])
        self.stage_dims = [int(w) for w in widths]
        self.stage_kinds = ["map"] * len(widths)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)
        # channels-last parameters: see ConvBackbone.
        self.to(memory_format=torch.channels_last)


def resnet18(in_channels: int, image_size: int, **kw: Any) -> ResNet:
    """CIFAR-style ResNet-18: 3×3 stem, no max-pool, [2, 2, 2, 2] BasicBlocks, widths 64-512."""
    return ResNet(in_channels, image_size, **kw)


def resnet_small(in_channels: int, image_size: int, **kw: Any) -> ResNet:
    """Narrow, short ResNet: widths 16-32-64-128, one block per stage, stride-2 first stage from 24 px."""
    kw.setdefault("widths", (16, 32, 64, 128))
    kw.setdefault("blocks", (1, 1, 1, 1))
    kw.setdefault("first_stride", 2 if image_size >= 24 else 1)
    return ResNet(in_channels, image_size, **kw)
