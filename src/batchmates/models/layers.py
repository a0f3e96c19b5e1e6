"""Attention layers registered by name, timm-style, so a backbone swaps ``"se"`` for ``"ba2m"`` by string.

Every residual block of a batchmates backbone calls ``create_attn_layer(layer, channels)`` and applies the
result to its residual branch before the sum (where SE/CBAM sit). ``"none"`` is the identity.

Library choices: the registry points down, as timm's factories do: this module imports its members
(:class:`~batchmates.nn.SqueezeExcite` as ``"se"``, :class:`~batchmates.nn.BA2M` as ``"ba2m"``) and registers
them itself; the layers know nothing of the backbones. Register another layer with
``@register_attn_layer("name")`` on a class whose constructor takes ``channels`` first, or pass the class itself
as ``attn_layer``; extra keyword options pass through ``create_attn_layer(layer, channels, **kwargs)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from batchmates.nn.ba2m import BA2M
from batchmates.nn.squeeze_excite import SqueezeExcite
from batchmates.registry import Registry, UnknownNameError

__all__ = [
    "ATTN_LAYERS",
    "register_attn_layer",
    "create_attn_layer",
    "available_attn_layers",
    "SqueezeExcite",
    "Backbone",
]

#: Attention layers by ``--attn-layer`` name (``"none"``, the identity, is implicit).
ATTN_LAYERS: Registry[Callable[..., nn.Module]] = Registry("attention layer", flag="attn_layer")
ATTN_LAYERS.register("se", SqueezeExcite)
ATTN_LAYERS.register("ba2m", BA2M)


def register_attn_layer(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class decorator: make an attention layer available to backbones under ``name``."""
    return ATTN_LAYERS.register(name)


def available_attn_layers() -> list[str]:
    """Registered attention-layer names (``"none"`` is always accepted too)."""
    return sorted(ATTN_LAYERS.names())


def create_attn_layer(layer: str | Callable[..., nn.Module] | None, channels: int, **kwargs) -> nn.Module:
    """Build attention layer ``layer`` for a ``channels``-wide feature map.

    ``layer`` is a registered name, ``"none"``/``None`` (identity), or a class / factory called as
    ``layer(channels, **kwargs)``.
    """
    if layer is None or layer == "none":
        return nn.Identity()
    if isinstance(layer, str):
        if layer not in ATTN_LAYERS:
            raise UnknownNameError(
                f"attn_layer={layer!r} is not registered; choose one of {available_attn_layers() + ['none']} "
                "(or pass a layer class)"
            )
        return ATTN_LAYERS.get(layer)(channels, **kwargs)
    if callable(layer):
        return layer(channels, **kwargs)
    raise TypeError(f"attn_layer must be a registered name, 'none' or a layer class; got {type(layer).__name__}")


class Backbone(nn.Module):
    """Base class of batchmates backbones (the contract of docs/ARCHITECTURE.md).

    Subclasses implement :meth:`forward_stages` and :meth:`pool`, and set ``feature_dim`` (width of the
    pooled features), ``stage_dims`` (width of each stage output) and ``stage_kinds`` (``"map"`` for
    ``[N, C, H, W]`` feature maps, ``"tokens"`` for ``[N, T, D]`` token maps).
    """

    feature_dim: int
    stage_dims: list[int]
    stage_kinds: list[str]

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def pool(self, last: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[N, feature_dim]``."""
        return self.pool(self.forward_stages(x)[-1])

    def _check_input(self, x: torch.Tensor, in_channels: int) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects float images [N, {in_channels}, H, W]; got {got}")
        if not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} expects float (normalised) images; got {x.dtype} "
                "(run the batch through batchmates.data.augment first)"
            )


class ConvBackbone(Backbone):
    """A backbone of convolutional stages (``self.stages``, after an optional ``self.stem``) run channels-last.

    Subclasses convert their parameters with ``self.to(memory_format=torch.channels_last)`` once built: oneDNN's
    channels-last convolutions train about 9x faster on CPU (measured on resnet-small at 28 px). Library choice.
    """

    in_channels: int

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps ``[N, C_s, H_s, W_s]`` after every stage."""
        self._check_input(x, self.in_channels)
        x = x.contiguous(memory_format=torch.channels_last)
        stem = getattr(self, "stem", None)
        if stem is not None:
            x = stem(x)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out

    def pool(self, last: torch.Tensor) -> torch.Tensor:
        return last.mean(dim=(2, 3))
