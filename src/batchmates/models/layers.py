"""Attention layers registered by name, timm-style, so a backbone swaps ``"se"`` for ``"ba2m"`` by string.

Every residual block of a batchmates backbone calls ``create_attn_layer(name, channels)`` and applies the
result to its residual branch before the sum (where SE/CBAM sit). ``"none"`` is the identity.
Register a new layer with ``@register_attn_layer("name")`` on a class whose constructor takes ``channels``
first; extra keyword options pass through ``create_attn_layer(name, channels, **kwargs)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["register_attn_layer", "create_attn_layer", "available_attn_layers", "SqueezeExcite", "Backbone"]

_ATTN_LAYERS: dict[str, Callable[..., nn.Module]] = {}


def register_attn_layer(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class decorator: make an attention layer available to backbones under ``name``."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _ATTN_LAYERS and _ATTN_LAYERS[name] is not factory:
            raise ValueError(f"attention layer {name!r} is already registered")
        _ATTN_LAYERS[name] = factory
        return factory

    return deco


def available_attn_layers() -> list[str]:
    _load_optional_layers()
    return sorted(_ATTN_LAYERS)


def create_attn_layer(name: str | None, channels: int, **kwargs) -> nn.Module:
    """Build the attention layer registered as ``name`` for a ``channels``-wide feature map."""
    _load_optional_layers()
    if name is None or name == "none":
        return nn.Identity()
    if name not in _ATTN_LAYERS:
        raise ValueError(f"attn_layer={name!r} is not registered; choose one of {sorted(_ATTN_LAYERS) + ['none']}")
    return _ATTN_LAYERS[name](channels, **kwargs)


def _load_optional_layers() -> None:
    # Layers defined in batchmates.nn register themselves on import; import lazily to avoid a cycle.
    try:
        import batchmates.nn  # noqa: F401
    except ImportError:  # pragma: no cover - only while batchmates.nn is being written
        pass


@register_attn_layer("se")
class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu et al., CVPR 2018): per-sample channel gates ``a ∈ (0,1)^C``.

    In training mode the gates of the last forward are kept in ``self.last_attention`` ([N, C], with
    gradient) so that CC-Loss (Song et al. 2020) can relate them across the batch. SE itself is per-sample.
    """

    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 4) -> None:
        super().__init__()
        hidden = max(min_hidden, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        a = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        self.last_attention = a.flatten(1) if self.training else None
        return x * a


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
