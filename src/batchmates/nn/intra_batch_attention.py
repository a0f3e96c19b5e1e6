"""Intra-batch attention, MIBA and EIBA (IBAFormer, Sun et al. 2023, arXiv:2309.06282).

Transformer attention whose queries also attend to the *other* images of the mini-batch, to diversify the
context seen during training (the paper's aim: domain generalisation of SegFormer).

What is the paper's and what is ours
------------------------------------
Paper (METHODS.md section 3), per head, with ``Q_b, K_b, V_b ∈ R^{N×d}`` of sample b:

* self-attention ``SA_b = softmax(Q_b K_bᵀ/√d) V_b``;
* MIBA (mean-based) ``softmax(Q_b K̄ᵀ/√d) V̄`` with ``K̄, V̄`` the batch means over all samples including b;
* EIBA (element-wise) ``(1/B) Σ_j softmax(Q_b K_jᵀ/√d) V_j`` over all j including b.

Library choices:

* q/k/v come from one shared projection (the same one SA uses) and the block output is
  ``proj(½ (SA + IBA))``; so batch size 1, a batch of identical samples and ``eval_mode="independent"`` (where
  the output is ``proj(SA)``) all reduce exactly to plain multi-head self-attention.
* Global batch under ``torch.distributed``: MIBA's means are all-reduced sums over the global count; EIBA
  gathers K and V with a gradient-carrying all-gather, so every query attends to every sample of the global
  batch.
* EIBA is computed in blocks of (query sample, key sample) pairs: per head, one GEMM of the block's queries
  against the keys of all its key samples, a softmax over each key sample's keys separately, and one GEMM with
  the values that also sums over the key samples (no per-pair copies). Its working memory is
  O(chunk · heads · N²) instead of O(B² · heads · N²). In training each block is recomputed in backward
  (activation checkpointing, ``checkpoint_chunks=True``) so that the memory kept for backward stays bounded
  too, at the cost of one extra forward of the block. ``chunk_size=None`` picks a block from a fixed budget.
* Self-attention and MIBA use :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels where
  available; EIBA's per-key-sample softmax is not an SDPA pattern). Batch means, the EIBA softmax and its sum
  over samples run in float32 (float64 for float64 input) under autocast.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from batchmates import distributed
from batchmates.models.vit import register_token_mixer
from batchmates.nn._eval_mode import check_eval_mode, finite_check_enabled, uses_batch

__all__ = ["IntraBatchAttention", "intra_batch_attention", "IBA_MODES"]

IBA_MODES: tuple[str, ...] = ("mean", "element")
_MODE_ALIASES = {"mean": "mean", "miba": "mean", "element": "element", "eiba": "element"}

# Elements of one chunk's largest intermediate (scores or copied q/k/v) when chunk_size is None: 2**25 values
# (128 MiB in float32).
_AUTO_CHUNK_ELEMENTS = 2**25


def _check_mode(mode: str) -> str:
    if not isinstance(mode, str) or mode.lower() not in _MODE_ALIASES:
        raise ValueError(
            f"mode must be 'mean' (MIBA, attend to the batch-mean keys/values) or 'element' (EIBA, average of "
            f"attention to every sample); got {mode!r}"
        )
    return _MODE_ALIASES[mode.lower()]


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, heads, N, d], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be a per-head tensor [B, heads, N, d], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in heads (dim 1) and head width (dim 3)"
        )
    if q.shape[0] == 0 or k.shape[0] == 0:
        raise ValueError("q and k must hold at least one sample (dim 0)")


def mean_batch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, gather: bool = True) -> torch.Tensor:
    """MIBA: ``softmax(Q_b K̄ᵀ/√d) V̄`` with K̄, V̄ the (global) batch means of ``k, v``. Shapes ``[B, h, N, d]``."""
    acc = _acc_dtype(k)
    if gather and distributed.is_distributed():
        count = distributed.global_count(k.shape[0], k.device)
        k_bar = distributed.all_reduce_sum(k.sum(0, keepdim=True, dtype=acc)) / count
        v_bar = distributed.all_reduce_sum(v.sum(0, keepdim=True, dtype=acc)) / count
    else:
        k_bar, v_bar = k.mean(0, keepdim=True, dtype=acc), v.mean(0, keepdim=True, dtype=acc)
    b = q.shape[0]
    k_bar = k_bar.to(q.dtype).expand(b, -1, -1, -1)
    v_bar = v_bar.to(q.dtype).expand(b, -1, -1, -1)
    return F.scaled_dot_product_attention(q, k_bar, v_bar)


def _eiba_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Σ_j softmax(q_b k_jᵀ/√d) v_j`` for a block: q ``[bq, h, N, d]``, k/v ``[bk, h, M, d]`` -> ``[bq, h, N, d]``.

    All queries of the block against the keys of all its key samples in one GEMM per head, a softmax over each
    key sample's M keys separately (in float32 or higher), and a second GEMM that also sums over the key samples.
    No per-pair copies of q, k or v are made.
    """
    bq, h, n, d = q.shape
    bk, _, m, e = v.shape
    acc = _acc_dtype(q)
    qh = (q * d**-0.5).transpose(0, 1).reshape(h, bq * n, d)
    kh = k.transpose(0, 1).reshape(h, bk * m, d)
    vh = v.transpose(0, 1).reshape(h, bk * m, e)
    scores = torch.bmm(qh, kh.transpose(1, 2)).view(h, bq * n, bk, m)
    probs = torch.softmax(scores, dim=-1, dtype=acc).view(h, bq * n, bk * m)
    out = torch.bmm(probs.to(vh.dtype), vh)  # [h, bq*N, e], summed over the bk key samples
    return out.view(h, bq, n, e).transpose(0, 1)


def element_batch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size: int | None = None,
    checkpoint_chunks: bool = True,
) -> torch.Tensor:
    """EIBA: ``(1/B') Σ_j softmax(Q_b K_jᵀ/√d) V_j`` for every query sample b over all B' key samples j.

    ``q`` is ``[B, h, N, d]``; ``k, v`` are ``[B', h, M, d]`` (B' = B in one process; the gathered global batch
    under ``torch.distributed``). The work is split into blocks of at most ``chunk_size`` (query, key) sample
    pairs (``None``: as many as fit 2**25 score elements), so the scores held at once are
    O(chunk_size · h · N · M). With ``checkpoint_chunks`` and autograd on, each block is recomputed in backward,
    so the memory kept for backward does not grow with B·B' either.
    """
    b, h, n, d = q.shape
    b_keys, m = k.shape[0], k.shape[2]
    if chunk_size is None:
        chunk_size = max(1, _AUTO_CHUNK_ELEMENTS // (h * n * m))
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive int (query-key sample pairs per chunk) or None, got {chunk_size!r}"
        )
    bk = min(b_keys, chunk_size)
    bq = max(1, chunk_size // bk)
    blocks = -(-b // bq) * -(-b_keys // bk)
    use_ckpt = checkpoint_chunks and blocks > 1 and torch.is_grad_enabled()
    acc = _acc_dtype(q)
    outs = []
    for i in range(0, b, bq):
        total = None
        for j in range(0, b_keys, bk):
            args = (q[i : i + bq], k[j : j + bk], v[j : j + bk])
            part = checkpoint(_eiba_block, *args, use_reentrant=False) if use_ckpt else _eiba_block(*args)
            part = part.to(acc)
            total = part if total is None else total + part
        outs.append(total)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    return (out / b_keys).to(q.dtype)


def intra_batch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: str = "mean",
    chunk_size: int | None = None,
    *,
    gather: bool = True,
    checkpoint_chunks: bool = True,
) -> torch.Tensor:
    """Intra-batch attention on per-head tensors (arXiv:2309.06282): ``[B, h, N, d]`` each -> ``[B, h, N, d]``.

    ``mode="mean"`` is MIBA, ``mode="element"`` is EIBA (aliases ``"miba"``/``"eiba"``). Returns only the
    IBA term (not ``½(SA + IBA)``, which :class:`IntraBatchAttention` forms). Under ``torch.distributed`` with
    ``gather=True`` the batch is the global one (MIBA: all-reduced means; EIBA: K, V gathered with gradient).
    ``chunk_size`` (EIBA only): query-key sample pairs per chunk, ``None`` for automatic.
    """
    mode = _check_mode(mode)
    _check_qkv(q, k, v)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q, k and v must hold the same samples (dim 0), got {q.shape[0]} and {k.shape[0]}")
    if mode == "mean":
        return mean_batch_attention(q, k, v, gather=gather)
    if gather and distributed.is_distributed():
        k, v = distributed.gather(k), distributed.gather(v)
    return element_batch_attention(q, k, v, chunk_size=chunk_size, checkpoint_chunks=checkpoint_chunks)


class IntraBatchAttention(nn.Module):
    """Multi-head attention with intra-batch attention (IBAFormer, arXiv:2309.06282): ``[B, N, D] -> [B, N, D]``.

    A drop-in token mixer (the attention sub-layer of a transformer block). With ``qkv`` the shared projection,
    per head ``SA_b = softmax(Q_b K_bᵀ/√d) V_b`` and ``IBA`` is MIBA (``mode="mean"``) or EIBA
    (``mode="element"``); the output is ``proj(½(SA + IBA))`` when the batch is used (training, or eval with
    ``eval_mode="batch"``) and ``proj(SA)`` in independent eval. See the module docstring for the paper/library
    split.

    Args:
        dim: D, the token width (divisible by ``num_heads``).
        num_heads: number of heads.
        mode: ``"mean"`` (MIBA, default) or ``"element"`` (EIBA); aliases ``"miba"``, ``"eiba"``.
        eval_mode: ``"independent"`` (default) or ``"batch"``.
        chunk_size: EIBA query-key sample pairs per chunk (``None``: automatic from a memory budget).
        gather: relate the global batch under ``torch.distributed`` (default) or only the local one.
        qkv_bias: bias in the shared q/k/v projection.
        checkpoint_chunks: recompute EIBA chunks in backward so that stored memory is bounded by the chunk.
        check_finite: raise ``ValueError`` on NaN/Inf input. ``None`` (default): check on CPU only, where it is
            free; on accelerators it would force a host sync per call. ``True``/``False`` force it on/off.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        mode: str = "mean",
        eval_mode: str = "independent",
        *,
        chunk_size: int | None = None,
        gather: bool = True,
        qkv_bias: bool = True,
        checkpoint_chunks: bool = True,
        check_finite: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1 or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"dim and num_heads must be positive ints, got dim={dim!r}, num_heads={num_heads!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.mode = _check_mode(mode)
        self.eval_mode = check_eval_mode(eval_mode)
        self.chunk_size = chunk_size
        self.gather = gather
        self.checkpoint_chunks = checkpoint_chunks
        self.check_finite = check_finite
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, mode={self.mode!r}, eval_mode={self.eval_mode!r}, "
            f"chunk_size={self.chunk_size}, gather={self.gather}"
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"IntraBatchAttention: x must be a torch.Tensor [B, N, D], got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"IntraBatchAttention: x must be a token map [B, N, D], got shape {tuple(x.shape)}")
        if x.shape[2] != self.dim:
            raise ValueError(
                f"IntraBatchAttention: x has token width {x.shape[2]} but the layer was built for dim={self.dim}"
            )
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"IntraBatchAttention: x must hold at least one sample and token, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"IntraBatchAttention: x must be a floating-point tensor, got {x.dtype}")
        if finite_check_enabled(self.check_finite, x) and not bool(torch.isfinite(x).all()):
            raise ValueError("IntraBatchAttention: x contains NaN/Inf values (pass check_finite=False to skip)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, h, N, d] each
        out = F.scaled_dot_product_attention(q, k, v)
        if uses_batch(self, self.eval_mode):
            iba = intra_batch_attention(
                q, k, v, self.mode, self.chunk_size, gather=self.gather, checkpoint_chunks=self.checkpoint_chunks
            )
            out = torch.lerp(out, iba, 0.5)  # ½(SA + IBA) in one kernel; exactly SA when IBA == SA
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dim))


# Token mixers for batchmates' ViT: factory (dim, num_heads, **kw) -> [B, N, D] -> [B, N, D].
register_token_mixer("miba")(functools.partial(IntraBatchAttention, mode="mean"))
register_token_mixer("eiba")(functools.partial(IntraBatchAttention, mode="element"))
