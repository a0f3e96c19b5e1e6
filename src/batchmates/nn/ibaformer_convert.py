"""Turn a timm Vision Transformer into an IBAFormer: intra-batch attention in chosen blocks, weights kept.

```python
import timm
from batchmates.nn import to_ibaformer
vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10)
to_ibaformer(vit, blocks="last2", mode="mean")      # MIBA in the last two blocks; same weights
```

Paper (IBAFormer, Sun et al. 2023, arXiv:2309.06282; only the abstract was readable): intra-batch attention,
mean-based (MIBA) or element-wise (EIBA), is integrated with the self-attention of chosen transformer blocks.

Library choices:

* Each chosen block's timm ``Attention`` is replaced by :class:`TimmIntraBatchAttention`, an
  :class:`~batchmates.nn.IntraBatchAttention` (our reconstruction of MIBA/EIBA; see its module) that takes the
  ``attn_mask``/``is_causal`` keywords timm's blocks pass and keeps timm's output dropout. The ``qkv`` and ``proj``
  weights are copied with ``load_state_dict(strict=True)``, so a converted model in independent eval, before any
  training, computes exactly what the timm model computes (IBA without training statistics is self-attention).
* Only the plain timm ``Attention`` is converted: q/k normalisation (``qk_norm``), output normalisation
  (``scale_norm``), gating, attention dropout, a head width other than ``dim / num_heads`` and attention masks
  have no counterpart in intra-batch attention and are refused with an error that names them.
* ``blocks``: ``"all"``, ``"lastK"``, ``"firstK"``, an int or a list of ints (negative ones count from the end).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from batchmates.nn.intra_batch_attention import IntraBatchAttention

__all__ = ["to_ibaformer", "TimmIntraBatchAttention", "select_blocks"]


class TimmIntraBatchAttention(IntraBatchAttention):
    """:class:`IntraBatchAttention` with timm ``Attention``'s call signature and output dropout.

    ``forward(x, attn_mask=None, is_causal=False)``: a mask or ``is_causal=True`` raises ``ValueError`` (intra-batch
    attention relates whole samples; a token mask has no defined meaning across samples).
    """

    def __init__(self, dim: int, num_heads: int, *, proj_bias: bool = True, proj_drop: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(dim, num_heads, **kwargs)
        if not proj_bias:
            self.proj = nn.Linear(dim, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,  # type: ignore[override]
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(
                "TimmIntraBatchAttention: attn_mask/is_causal are not supported (intra-batch attention has no "
                "token mask); call the model without a mask, or keep self-attention in the blocks that need one"
            )
        return self.proj_drop(super().forward(x))


def select_blocks(blocks: str | int | Sequence[int], depth: int) -> list[int]:
    """Sorted unique block indices in ``[0, depth)`` chosen by ``blocks`` (see the module docstring)."""
    hint = "use 'all', 'lastK', 'firstK' (e.g. 'last2'), an int or a list of ints"
    if isinstance(blocks, str):
        s = blocks.strip().lower()
        if s == "all":
            return list(range(depth))
        for prefix in ("last", "first"):
            k = s[len(prefix):]
            if s.startswith(prefix) and k.isdigit() and 1 <= int(k) <= depth:
                return list(range(depth - int(k), depth)) if prefix == "last" else list(range(int(k)))
        raise ValueError(f"blocks={blocks!r} with depth {depth}: {hint} (K between 1 and {depth})")
    items = [blocks] if isinstance(blocks, int) else list(blocks)
    if not items or any(isinstance(i, bool) or not isinstance(i, int) or not -depth <= i < depth for i in items):
        raise ValueError(f"blocks={blocks!r}: indices must be ints in [-{depth}, {depth}); {hint}")
    return sorted({i % depth for i in items})


def _check_convertible(attn: nn.Module, where: str) -> None:
    from timm.layers.attention import Attention

    if type(attn) is not Attention:
        raise ValueError(
            f"to_ibaformer: {where} is {type(attn).__name__}, not timm.layers.Attention; only the plain timm "
            "ViT attention can be converted (RoPE/EVA/windowed attentions are not)"
        )
    problems = []
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        problems.append("q/k normalisation (qk_norm=True)")
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        problems.append("output normalisation (scale_norm=True)")
    if getattr(attn, "gate", None) is not None:
        problems.append("gating (gated=True)")
    if attn.attn_drop.p > 0:
        problems.append(f"attention dropout (attn_drop={attn.attn_drop.p})")
    dim = attn.qkv.in_features
    if attn.num_heads * attn.head_dim != dim or attn.proj.out_features != dim:
        problems.append(f"heads x head_dim = {attn.num_heads} x {attn.head_dim} != dim {dim} (or dim_out != dim)")
    if problems:
        raise ValueError(
            f"to_ibaformer: {where} uses {', '.join(problems)}, which intra-batch attention does not have; build the "
            "timm model without it (e.g. qk_norm=False, attn_drop_rate=0) or leave this block out of blocks="
        )


def to_ibaformer(
    vit: nn.Module,
    *,
    blocks: str | int | Sequence[int] = "all",
    mode: str = "mean",
    **kwargs: Any,
) -> nn.Module:
    """Replace the attention of the chosen blocks of a timm ``VisionTransformer`` by intra-batch attention.

    Args:
        vit: a timm ViT (anything with ``blocks``, each block with a timm ``Attention`` as ``attn``); changed in
            place and returned.
        blocks: which blocks (``"all"``, ``"last2"``, ``"first1"``, ``3``, ``[0, -1]``).
        mode: ``"mean"`` (MIBA) or ``"element"`` (EIBA).
        kwargs: further options of :class:`~batchmates.nn.IntraBatchAttention` (``eval_mode``, ``eval_form``,
            ``momentum``, ``bank_size``, ``chunk_size``, ``gather``, ...).
    """
    seq = getattr(vit, "blocks", None)
    if not isinstance(seq, nn.Sequential | nn.ModuleList) or len(seq) == 0:
        raise ValueError(
            f"to_ibaformer: {type(vit).__name__} has no `blocks` sequence of transformer blocks; pass a timm "
            "VisionTransformer (e.g. timm.create_model('vit_tiny_patch16_224', pretrained=False))"
        )
    for key in ("qkv_bias", "proj_bias", "proj_drop"):
        if key in kwargs:
            raise ValueError(f"to_ibaformer: {key} is taken from the timm attention it replaces; do not pass it")
    chosen = select_blocks(blocks, len(seq))
    for i in chosen:
        _check_convertible(getattr(seq[i], "attn", None), f"blocks[{i}].attn")
    for i in chosen:
        attn = seq[i].attn
        new = TimmIntraBatchAttention(
            attn.qkv.in_features, attn.num_heads, mode=mode, qkv_bias=attn.qkv.bias is not None,
            proj_bias=attn.proj.bias is not None, proj_drop=attn.proj_drop.p, **kwargs,
        ).to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)
        new.qkv.load_state_dict(attn.qkv.state_dict(), strict=True)
        new.proj.load_state_dict(attn.proj.state_dict(), strict=True)
        new.train(attn.training)
        seq[i].attn = new
    return vit
