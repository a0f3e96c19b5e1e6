"""Backbones (CNN, CIFAR-style ResNets, a small ViT) and the attention-layer / token-mixer registries.

```python
from batchmates.models import create_backbone
net = create_backbone("resnet-small", in_channels=1, image_size=28, attn_layer="se")
feats = net(x)                    # [N, net.feature_dim]
maps = net.forward_stages(x)      # one [N, C_s, H_s, W_s] per stage (ViT: [N, T, D] per block)
```
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from batchmates.models.cnn import SmallCNN
from batchmates.models.layers import (
    Backbone,
    SqueezeExcite,
    available_attn_layers,
    create_attn_layer,
    register_attn_layer,
)
from batchmates.models.resnet import BasicBlock, ResNet, resnet18, resnet_small
from batchmates.models.vit import (
    SelfAttention,
    VisionTransformer,
    available_token_mixers,
    create_token_mixer,
    register_token_mixer,
    vit_tiny,
    vit_tiny_conv,
)

__all__ = [
    "Backbone",
    "create_backbone",
    "available_backbones",
    "count_parameters",
    "set_eval_mode",
    "SmallCNN",
    "ResNet",
    "BasicBlock",
    "VisionTransformer",
    "SelfAttention",
    "SqueezeExcite",
    "register_attn_layer",
    "create_attn_layer",
    "available_attn_layers",
    "register_token_mixer",
    "create_token_mixer",
    "available_token_mixers",
]

_BACKBONES: dict[str, Callable[..., Backbone]] = {
    "cnn": SmallCNN,
    "resnet18": resnet18,
    "resnet-small": resnet_small,
    "vit-tiny": vit_tiny,
    "vit-tiny-conv": vit_tiny_conv,
}


def available_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone`."""
    return sorted(_BACKBONES)


def create_backbone(
    name: str, *, in_channels: int, image_size: int, attn_layer: str | None = "none", **kw: Any
) -> Backbone:
    """Build backbone ``name`` for ``in_channels``-channel ``image_size``-px inputs.

    ``attn_layer`` names an attention layer for every residual block (see
    :func:`~batchmates.models.layers.available_attn_layers`); other keywords go to the backbone's
    constructor (``attn_placement``, ``attn_kwargs``, ``widths``, ``blocks``, ``mixers``, ``mixer_kwargs``, ...).
    Names with a ``":"`` (``"timm:resnet18"``, ``"torchvision:resnet18"``) go to
    :func:`~batchmates.models.foreign.create_foreign_backbone` (keywords ``pretrained_path``, ``model_kwargs``, ...).
    """
    if isinstance(name, str) and ":" in name:
        from batchmates.models.foreign import create_foreign_backbone

        return create_foreign_backbone(name, in_channels=in_channels, image_size=image_size,
                                       attn_layer=attn_layer, **kw)
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {available_backbones()}")
    for arg, v in (("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be a positive int; got {v!r}")
    return _BACKBONES[name](in_channels, image_size, attn_layer=attn_layer, **kw)


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def set_eval_mode(model: nn.Module, mode: str) -> int:
    """Set ``eval_mode = mode`` (``"independent"`` or ``"batch"``) on every submodule that has that attribute.

    Returns the number of modules changed (0 means the model has no batch-relational module).
    """
    if mode not in ("independent", "batch"):
        raise ValueError(f"eval_mode must be 'independent' or 'batch'; got {mode!r}")
    n = 0
    for m in model.modules():
        if hasattr(m, "eval_mode"):
            m.eval_mode = mode
            n += 1
    return n
