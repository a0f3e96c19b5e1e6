"""Scaled dot-product attention for the token attentions of the library, with one rule for the CPU.

Library choice (measured: ``batchmates bench modules``, rows ``token-attention``; docs/benchmarks.md): on the
CPU, torch 2.14.1's fused ``scaled_dot_product_attention`` (its flash kernel) is several times slower than the
plain matmul-softmax-matmul for short sequences, worst in bf16 backward: at the ViT's 49 tokens, 4 heads of 32,
batch 128, its bf16 backward alone was half of a ``vit-tiny-conv`` training step (torch profiler, one thread).
For long sequences (BA²M's non-local branch on a 28x28 map: 784 positions) the fused kernel is the faster one and
never materialises the ``L x S`` scores. So on the CPU, when ``L * S`` is at most :data:`CPU_EXPLICIT_MAX`
(128 x 128), attention is computed explicitly in float32 with autocast off, returned in the input's dtype: the
fused kernel accumulates in float32 too, so the result is as accurate as its (tests/test_sdpa.py), at some speed
cost against an explicit bf16 form, which would be less accurate. Everywhere else (long sequences, CUDA) it is
``F.scaled_dot_product_attention``.
Both are the same maths: ``softmax(q kᵀ · scale) v`` with ``scale = 1/sqrt(d)`` unless given. Used by the ViT's
self-attention, IntraBatchAttention (its self-attention and MIBA), BA²M's non-local branch and BatchFormer;
Class Batch Attention keeps its own choice between an einsum and the fused call (its module docstring).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention", "CPU_EXPLICIT_MAX"]

# Largest L * S (query x key positions) computed explicitly on the CPU: 128 x 128 scores per head.
CPU_EXPLICIT_MAX = 128 * 128


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """``softmax(q kᵀ · scale) v`` over the last two dims (``[..., L, d]``, ``[..., S, d]``, ``[..., S, e]``).

    The same call as :func:`torch.nn.functional.scaled_dot_product_attention` without a mask; ``dropout_p`` drops
    attention weights (pass 0 in eval, as with the fused call).
    """
    if q.device.type != "cpu" or q.shape[-2] * k.shape[-2] > CPU_EXPLICIT_MAX:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.autocast(q.device.type, enabled=False):  # float32 throughout: as accurate as the fused kernel
        scores = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * s
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        return torch.matmul(weights, v.to(acc)).to(q.dtype)
