"""Attention layers (SE, BA²M, any layer class) inside the residual blocks of timm and torchvision ResNets.

Paper: SE (Hu et al. 2018) scales the residual branch before the sum; BA²M (Cheng et al. 2021,
arXiv:2103.15099) does not say where it sits in a block (METHODS.md section 1).

Library choices:

* ``placement="block"`` (default): every residual block gets one layer on its residual branch, after the branch's
  last BatchNorm and before the sum, where SE/CBAM sit and where batchmates' own ResNets put it. timm's
  ``BasicBlock``/``Bottleneck`` have that slot (``block.se``, which timm's own ``attn_layer`` fills); a
  torchvision block gets an ``attn`` child and a subclass whose ``forward`` is torchvision's with the layer
  applied after ``bn2`` (``BasicBlock``) or ``bn3`` (``Bottleneck``). Every existing key name is kept, so the
  original weights still load; the new layer's keys are ``<block>.se.*`` (timm) or ``<block>.attn.*``
  (torchvision).
* ``placement="stage"``: one layer appended to each of ``layer1``..``layer4`` (after the stage's last block).
* ``layer``: a registered name (``"se"``: batchmates' :class:`~batchmates.models.SqueezeExcite`, whose gates
  CC-Loss reads; ``"ba2m"``; see :func:`~batchmates.models.available_attn_layers`) or a class/factory called
  as ``layer(channels, **kwargs)``. The layer is created on the block's device and dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["insert_attn_layers", "residual_blocks", "PLACEMENTS"]

PLACEMENTS: tuple[str, ...] = ("block", "stage")


def _tv_block_classes() -> tuple[type, type]:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return BasicBlock, Bottleneck


def _timm_block_classes() -> tuple[type, ...]:
    try:
        from timm.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover - timm is a dependency
        return ()
    return BasicBlock, Bottleneck


class _TorchvisionBasicBlockAttn(_tv_block_classes()[0]):
    """torchvision's ``BasicBlock`` with ``self.attn`` after ``bn2`` (the residual branch, before the sum)."""

    attn: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.attn(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


class _TorchvisionBottleneckAttn(_tv_block_classes()[1]):
    """torchvision's ``Bottleneck`` with ``self.attn`` after ``bn3`` (the residual branch, before the sum)."""

    attn: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.attn(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


def _branch_channels(block: nn.Module) -> int:
    last_bn = getattr(block, "bn3", None)
    if last_bn is None:
        last_bn = block.bn2
    return int(last_bn.num_features)


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every timm or torchvision ResNet ``BasicBlock``/``Bottleneck`` in ``model``."""
    kinds = _tv_block_classes() + _timm_block_classes()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def _factory(layer: str | Callable[..., nn.Module], kwargs: dict[str, Any]) -> Callable[[int], nn.Module]:
    if isinstance(layer, str):
        from batchmates.models.layers import create_attn_layer

        if layer == "none":
            raise ValueError("insert_attn_layers: layer='none' inserts nothing; pass 'se', 'ba2m' or a layer class")
        return lambda c: create_attn_layer(layer, c, **kwargs)
    if not callable(layer):
        raise TypeError(
            f"insert_attn_layers: layer must be a registered name ('se', 'ba2m', ...) or a class called as "
            f"layer(channels, **kwargs); got {type(layer).__name__}"
        )
    return lambda c: layer(c, **kwargs)


def _place(module: nn.Module, ref: torch.Tensor) -> nn.Module:
    return module.to(device=ref.device, dtype=ref.dtype)


def insert_attn_layers(
    model: nn.Module,
    layer: str | Callable[..., nn.Module],
    *,
    placement: str = "block",
    replace: bool = False,
    **kwargs: Any,
) -> list[nn.Module]:
    """Put an attention layer into every residual block (or after every stage) of a timm/torchvision ResNet.

    Args:
        model: a timm ``ResNet`` (any variant built from its ``BasicBlock``/``Bottleneck``) or a torchvision
            ``ResNet``/``ResNeXt``/wide ResNet, changed in place.
        layer: a registered attention-layer name (``"se"``, ``"ba2m"``) or a class/factory ``layer(channels, **kw)``.
        placement: ``"block"`` (residual branch of every block, before the sum) or ``"stage"`` (appended to
            ``layer1``..``layer4``).
        replace: allow replacing an attention layer a timm block already has (SE-ResNets).
        kwargs: options of the layer (e.g. ``weight_mode="raw"`` for BA²M).

    Returns:
        The inserted layers, in module order (one per block, or one per stage).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"insert_attn_layers: placement must be 'block' or 'stage'; got {placement!r}")
    make = _factory(layer, kwargs)
    if placement == "stage":
        stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
        if not all(isinstance(s, nn.Sequential) and len(s) and hasattr(s[-1], "bn2") for s in stages):
            raise ValueError(
                f"insert_attn_layers(placement='stage') needs a ResNet with Sequential stages layer1..layer4; "
                f"{type(model).__name__} has none (use placement='block' or insert the layer yourself)"
            )
        added = []
        for s in stages:
            ref = next(s.parameters())
            added.append(_place(make(_branch_channels(s[-1])), ref))
            s.append(added[-1])
        return added
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError(
            f"insert_attn_layers: {type(model).__name__} has no timm or torchvision ResNet residual block "
            "(BasicBlock/Bottleneck); attention layers can only be inserted into ResNet-family models"
        )
    tv_basic, tv_bottleneck = _tv_block_classes()
    added = []
    for name, block in blocks:
        channels = _branch_channels(block)
        new = _place(make(channels), block.conv1.weight)
        if isinstance(block, (tv_basic, tv_bottleneck)):
            if isinstance(block, (_TorchvisionBasicBlockAttn, _TorchvisionBottleneckAttn)) and not replace:
                raise ValueError(
                    f"insert_attn_layers: block {name!r} already has an attention layer; pass replace=True"
                )
            bottleneck = isinstance(block, tv_bottleneck)
            block.__class__ = _TorchvisionBottleneckAttn if bottleneck else _TorchvisionBasicBlockAttn
            block.attn = new
        else:
            if block.se is not None and not replace:
                raise ValueError(
                    f"insert_attn_layers: timm block {name!r} already has attention layer {type(block.se).__name__} "
                    "(an SE-ResNet?); pass replace=True to replace it"
                )
            block.se = new
        added.append(new)
    return added
