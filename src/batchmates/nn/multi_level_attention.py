"""Multi-Level Attention (MLA) of the Batch Transformer.

Her et al., "Batch Transformer: Look for Attention in Batch", 2024, arXiv:2407.04218.

Paper facts
-----------
* MLA fuses features from several levels (stages) of the backbone by letting them attend to each other, so the
  classifier does not over-rely on (overfit) a single level; the fused feature feeds the main classifier whose
  logits are the values of Class Batch Attention.

Library choices (the paper's equations were not recoverable; this module is the library's reading)
---------------------------------------------------------------------------------------------------
* Each level is pooled to a common token grid: feature maps ``[B, C_s, H_s, W_s]`` by adaptive average pooling
  to ``tokens × tokens``; token maps ``[B, T, D_s]`` the same way when ``T`` is a perfect square (a raster grid),
  otherwise by 1-D adaptive average pooling over the token order to ``tokens²`` tokens.
* Each level's tokens are projected to the common width ``dim`` by a linear layer, and get a learned position
  embedding (shared across levels) plus a learned level embedding.
* A learned fused CLS token is prepended; a small pre-norm transformer encoder (``depth`` layers, ``num_heads``
  heads, GELU MLP of width ``mlp_ratio·dim``) runs over ``[CLS, level-1 tokens, ..., level-L tokens]``; the
  layer-normed CLS output ``[B, dim]`` is the fused feature.
* Strictly per-sample (LayerNorm, no BatchNorm, no batch mixing): a sample's output never depends on its
  batch mates, in training or in eval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiLevelAttention", "pool_to_tokens"]


def pool_to_tokens(x: Tensor, tokens: int) -> Tensor:
    """Pool one level to ``tokens²`` tokens: ``[B, C, H, W]`` or ``[B, T, D]`` → ``[B, tokens², C or D]``."""
    if x.dim() == 4:
        return F.adaptive_avg_pool2d(x, tokens).flatten(2).transpose(1, 2)
    if x.dim() == 3:
        n_tok = x.shape[1]
        side = math.isqrt(n_tok)
        if side * side == n_tok:
            grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
            return F.adaptive_avg_pool2d(grid, tokens).flatten(2).transpose(1, 2)
        return F.adaptive_avg_pool1d(x.transpose(1, 2), tokens * tokens).transpose(1, 2)
    raise ValueError(f"expected a feature map [B, C, H, W] or a token map [B, T, D], got shape {tuple(x.shape)}")


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class MultiLevelAttention(nn.Module):
    """Fuse per-stage backbone features into one ``[B, dim]`` feature with a small transformer.

    The library's reading of the Batch Transformer's Multi-Level Attention (arXiv:2407.04218); see the module
    docstring for what is the paper's and what is ours.

    Args:
        in_dims: channel (or token width) of each level, in the order the features are passed.
        dim: common width of the tokens and of the fused output.
        tokens: each level is pooled to a ``tokens × tokens`` grid (``tokens²`` tokens per level).
        depth: number of transformer encoder layers.
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: width of the encoder MLP relative to ``dim``.
        dropout: dropout inside the encoder (0 by default).

    ``forward(features)`` takes a list of ``len(in_dims)`` tensors ``[B, C_s, H_s, W_s]`` or ``[B, T_s, D_s]``
    and returns ``[B, dim]``.
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        dim: int = 128,
        tokens: int = 4,
        depth: int = 1,
        num_heads: int = 4,
        *,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(in_dims, (str, bytes)) or not isinstance(in_dims, Sequence) or len(in_dims) == 0:
            raise ValueError(f"in_dims must be a non-empty sequence of channel counts, one per level, got {in_dims!r}")
        self.in_dims = [_positive_int(f"in_dims[{i}]", c) for i, c in enumerate(in_dims)]
        self.dim = _positive_int("dim", dim)
        self.tokens = _positive_int("tokens", tokens)
        self.depth = _positive_int("depth", depth)
        self.num_heads = _positive_int("num_heads", num_heads)
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if not (mlp_ratio > 0):
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        n_levels, n_tok = len(self.in_dims), self.tokens * self.tokens
        self.proj = nn.ModuleList(nn.Linear(c, dim) for c in self.in_dims)
        self.pos_embed = nn.Parameter(torch.zeros(n_tok, dim))
        self.level_embed = nn.Parameter(torch.zeros(n_levels, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        layer = nn.TransformerEncoderLayer(
            dim,
            num_heads,
            dim_feedforward=max(1, round(mlp_ratio * dim)),
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        for p in (self.pos_embed, self.level_embed, self.cls_token):
            nn.init.trunc_normal_(p, std=0.02)

    def _check(self, features: Sequence[Tensor]) -> None:
        if isinstance(features, Tensor) or not isinstance(features, Sequence):
            raise TypeError("features must be a list of per-level tensors (e.g. backbone.forward_stages(x))")
        if len(features) != len(self.in_dims):
            raise ValueError(
                f"expected {len(self.in_dims)} feature levels (in_dims={self.in_dims}), got {len(features)}"
            )
        batch = None
        for i, (x, c) in enumerate(zip(features, self.in_dims)):
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise TypeError(f"features[{i}] must be a floating-point tensor")
            if x.dim() == 4:
                width = x.shape[1]
            elif x.dim() == 3:
                width = x.shape[2]
            else:
                raise ValueError(
                    f"features[{i}] must be a feature map [B, C, H, W] or a token map [B, T, D], got {tuple(x.shape)}"
                )
            if width != c:
                raise ValueError(f"features[{i}] has {width} channels but in_dims[{i}] is {c}: shape {tuple(x.shape)}")
            if batch is None:
                batch = x.shape[0]
            elif x.shape[0] != batch:
                raise ValueError(
                    f"all levels must share the batch size: features[0] has {batch}, features[{i}] has {x.shape[0]}"
                )
            if x.numel() == 0:
                raise ValueError(f"features[{i}] is empty (shape {tuple(x.shape)})")

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        self._check(features)
        levels = [
            proj(pool_to_tokens(x, self.tokens)) + self.pos_embed + self.level_embed[i]
            for i, (x, proj) in enumerate(zip(features, self.proj))
        ]
        cls = self.cls_token.expand(levels[0].shape[0], -1, -1).to(levels[0].dtype)
        seq = torch.cat([cls, *levels], dim=1)
        return self.norm(self.encoder(seq)[:, 0])

    def extra_repr(self) -> str:
        return (
            f"in_dims={self.in_dims}, dim={self.dim}, tokens={self.tokens}, depth={self.depth}, "
            f"heads={self.num_heads}"
        )
