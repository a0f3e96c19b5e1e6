"""A small Vision Transformer (Dosovitskiy et al. 2021, arXiv:2010.11929) with per-block token mixers.

Paper: non-overlapping patch embedding, learned position embedding, pre-norm blocks
``x + mixer(LN(x))`` then ``x + MLP(LN(x))``, a final LayerNorm, CLS-token pooling.

Library choices:

* ``"vit-tiny"`` has dim 128, depth 6, 4 heads, MLP ratio 4; patch 2 up to 16 px (8×8 digits -> 16 tokens), 4
  up to 48 px (28 -> 49, 32 -> 64 tokens), 8 above; mean pooling over patch tokens by default (``pool="cls"``
  adds a CLS token).
* ``"vit-tiny-conv"`` is the same transformer with a convolutional stem (``stem="conv"``): two 3×3
  convolutions (32 and 64 channels, stride 1, BatchNorm, ReLU, channels-last on CPU) before the patch
  embedding, so each token starts from local features rather than a linear map of raw pixels. Early
  convolutions are a known help for ViTs trained on little data (Xiao et al. 2021, arXiv:2106.14881, use a
  stride-2 stack; ours keeps stride 1 because 8×8 images have few pixels to give). Measured on digits (1,347
  8×8 training images, the ``ibaformer`` method, one seed): the patch-only ViT reached 34% after 210 steps,
  the one with the stem 91% after 126. ``"vit-tiny"`` keeps the patch-only stem, so that run directories
  written before the stem existed load and mean the same.
* The attention sub-layer of each block is a *token mixer* chosen by name from a registry, so intra-batch
  attention (IBAFormer, Sun et al. 2023, arXiv:2309.06282: ``"miba"`` / ``"eiba"``, imported from
  :mod:`batchmates.nn` and registered here, as timm's factories import their members) can replace plain
  self-attention at chosen depths.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from batchmates.models.layers import Backbone
from batchmates.nn._sdpa import attention
from batchmates.nn.intra_batch_attention import IntraBatchAttention
from batchmates.registry import Registry, UnknownNameError

__all__ = [
    "TOKEN_MIXERS",
    "register_token_mixer",
    "create_token_mixer",
    "available_token_mixers",
    "SelfAttention",
    "ViTBlock",
    "VisionTransformer",
    "vit_tiny",
    "vit_tiny_conv",
    "default_patch_size",
    "STEMS",
]

#: Token mixers by name: ``factory(dim, num_heads, **kw) -> nn.Module`` mapping ``[B, N, D]`` to ``[B, N, D]``.
TOKEN_MIXERS: Registry[Callable[..., nn.Module]] = Registry("token mixer", flag="mixers")
TOKEN_MIXERS.register("miba", functools.partial(IntraBatchAttention, mode="mean"))
TOKEN_MIXERS.register("eiba", functools.partial(IntraBatchAttention, mode="element"))


def register_token_mixer(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a token mixer ``factory(dim, num_heads, **kw) -> nn.Module`` ([B,N,D] -> [B,N,D])
    available to :class:`VisionTransformer` under ``name``."""
    return TOKEN_MIXERS.register(name)


def available_token_mixers() -> list[str]:
    """Registered token-mixer names."""
    return sorted(TOKEN_MIXERS.names())


def create_token_mixer(name: str, dim: int, num_heads: int, **kwargs: Any) -> nn.Module:
    """Build the token mixer registered as ``name`` for width ``dim`` with ``num_heads`` heads."""
    if name not in TOKEN_MIXERS:
        raise UnknownNameError(f"token mixer {name!r} is not registered; choose one of {available_token_mixers()}")
    return TOKEN_MIXERS.get(name)(dim, num_heads, **kwargs)


@register_token_mixer("self")
class SelfAttention(nn.Module):
    """Multi-head self-attention over the tokens of each sample (qkv Linear, ``nn._sdpa.attention``, projection)."""

    def __init__(self, dim: int, num_heads: int = 4, *, qkv_bias: bool = True, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = float(attn_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class ViTBlock(nn.Module):
    """Pre-norm transformer block with a registered token mixer as its attention sub-layer."""

    def __init__(
        self, dim: int, num_heads: int, mixer: str = "self", mlp_ratio: float = 4.0, **mixer_kwargs: Any
    ) -> None:
        super().__init__()
        self.mixer_name = mixer
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = create_token_mixer(mixer, dim, num_heads, **mixer_kwargs)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def default_patch_size(image_size: int) -> int:
    """2 up to 16 px, 4 up to 48 px, 8 above (library choice)."""
    return 2 if image_size <= 16 else 4 if image_size <= 48 else 8


STEMS: tuple[str, ...] = ("patch", "conv")


def _check_stem(stem: str, stem_channels: Sequence[int]) -> str:
    if stem not in STEMS:
        raise ValueError(f"stem must be 'patch' (patch embedding only) or 'conv' (3x3 convolutions, then the patch "
                         f"embedding); got {stem!r}")
    chans = list(stem_channels) if not isinstance(stem_channels, int | str) else None
    if stem == "conv" and (not chans or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in chans)):
        raise ValueError(f"stem_channels must be a non-empty sequence of positive ints (one per 3x3 conv layer), "
                         f"e.g. (32, 64); got {stem_channels!r}")
    return stem


def _conv_stem(in_channels: int, channels: Sequence[int]) -> nn.Sequential:
    """3x3 stride-1 convolutions, each followed by BatchNorm and ReLU (library choice)."""
    layers: list[nn.Module] = []
    prev = int(in_channels)
    for c in channels:
        layers += [nn.Conv2d(prev, int(c), 3, padding=1, bias=False), nn.BatchNorm2d(int(c)), nn.ReLU(inplace=True)]
        prev = int(c)
    return nn.Sequential(*layers)


class VisionTransformer(Backbone):
    """ViT backbone; ``forward_stages`` returns the token map ``[N, T, dim]`` after every block.

    Args:
        mixers: one token-mixer name for every block or one per block (length ``depth``).
        mixer_kwargs: options for the mixers: a mapping from mixer name to its keyword arguments
            (``{"miba": {"eval_mode": "batch"}}``), or a sequence with one mapping per block.
        pool: ``"mean"`` over patch tokens (default; tokens are then exactly the patch grid) or ``"cls"``
            (a CLS token is prepended, so ``T = patches + 1``).
        stem: ``"patch"`` (default: the paper's patch embedding alone) or ``"conv"`` (3×3 convolutions with
            ``stem_channels`` channels, BatchNorm and ReLU, then the patch embedding).
        stem_channels: widths of the stem's 3×3 convolutions (``stem="conv"`` only).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        *,
        patch_size: int | None = None,
        dim: int = 128,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        mixers: str | Sequence[str] = "self",
        mixer_kwargs: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]] | None = None,
        pool: str = "mean",
        stem: str = "patch",
        stem_channels: Sequence[int] = (32, 64),
        attn_layer: str | None = "none",
    ) -> None:
        super().__init__()
        if attn_layer not in (None, "none"):
            raise ValueError(
                f"vit-tiny has no convolutional blocks for attn_layer={attn_layer!r}; use mixers=... to choose "
                "token mixers (e.g. mixers=['self', 'self', 'miba', ...]) or a CNN/ResNet backbone"
            )
        patch = patch_size or default_patch_size(image_size)
        if image_size % patch:
            raise ValueError(
                f"image_size {image_size} is not divisible by patch_size {patch}; pass patch_size= a divisor "
                "or resize the images (load_dataset(..., image_size=...))"
            )
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls'; got {pool!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1; got {depth}")
        names = [mixers] * depth if isinstance(mixers, str) else list(mixers)
        if len(names) != depth:
            raise ValueError(
                f"mixers has {len(names)} entries but depth is {depth}; give one name for all blocks or one per block"
            )
        per_block = self._mixer_kwargs(names, mixer_kwargs)
        self.in_channels, self.image_size, self.patch_size = int(in_channels), int(image_size), int(patch)
        self.pool_kind = pool
        self.num_patches = (image_size // patch) ** 2
        self.stem_kind = _check_stem(stem, stem_channels)
        self.stem = _conv_stem(in_channels, stem_channels) if stem == "conv" else None
        if self.stem is not None:  # oneDNN's channels-last convolutions are the fast ones on CPU
            self.stem.to(memory_format=torch.channels_last)
        stem_out = int(stem_channels[-1]) if stem == "conv" else int(in_channels)
        self.patch_embed = nn.Conv2d(stem_out, dim, patch, stride=patch)
        n_tokens = self.num_patches + (1 if pool == "cls" else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, dim))
        self.blocks = nn.ModuleList(
            ViTBlock(dim, num_heads, name, mlp_ratio, **kw) for name, kw in zip(names, per_block)
        )
        self.norm = nn.LayerNorm(dim)
        self.mixers = names
        self.feature_dim = int(dim)
        self.stage_dims = [int(dim)] * depth
        self.stage_kinds = ["tokens"] * depth
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def _mixer_kwargs(names: list[str], mixer_kwargs: Any) -> list[dict[str, Any]]:
        if mixer_kwargs is None:
            return [{} for _ in names]
        if isinstance(mixer_kwargs, Mapping):
            unknown = set(mixer_kwargs) - set(names)
            if unknown:
                raise ValueError(
                    f"mixer_kwargs names {sorted(unknown)} are not among the mixers used {sorted(set(names))}; "
                    "key mixer_kwargs by mixer name, e.g. {'miba': {'eval_mode': 'batch'}}"
                )
            return [dict(mixer_kwargs.get(n, {})) for n in names]
        per_block = list(mixer_kwargs)
        if len(per_block) != len(names):
            raise ValueError(f"mixer_kwargs has {len(per_block)} entries but depth is {len(names)}")
        return [dict(kw) for kw in per_block]

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Token maps ``[N, T, dim]`` after every block (before the final LayerNorm)."""
        self._check_input(x, self.in_channels)
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"this ViT was built for {self.image_size}x{self.image_size} images; got {tuple(x.shape[-2:])}"
            )
        if self.stem is not None:
            x = self.stem(x.contiguous(memory_format=torch.channels_last))
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + self.pos_embed
        out = []
        for block in self.blocks:
            t = block(t)
            out.append(t)
        return out

    def pool(self, last: torch.Tensor) -> torch.Tensor:
        t = self.norm(last)
        return t[:, 0] if self.pool_kind == "cls" else t.mean(dim=1)


def vit_tiny(in_channels: int, image_size: int, **kw: Any) -> VisionTransformer:
    """The ``"vit-tiny"`` backbone: dim 128, depth 6, 4 heads, patch by :func:`default_patch_size`."""
    return VisionTransformer(in_channels, image_size, **kw)


def vit_tiny_conv(in_channels: int, image_size: int, **kw: Any) -> VisionTransformer:
    """The ``"vit-tiny-conv"`` backbone: ``"vit-tiny"`` with a convolutional stem (``stem="conv"``)."""
    kw.setdefault("stem", "conv")
    return VisionTransformer(in_channels, image_size, **kw)
