"""Functional intra-batch attention (MIBA / EIBA) on per-head tensors ``[B, heads, N, d]``.

The formulas are our reconstruction from the names the IBAFormer abstract gives (Sun et al. 2023,
arXiv:2309.06282: "mean-based" and "element-wise" intra-batch attention); see
:mod:`batchmates.nn.intra_batch_attention` for what is the paper's and what is ours. This module holds the
kernels; :class:`~batchmates.nn.IntraBatchAttention` is the layer.

Library choices: batch means, the EIBA softmax and its sum over samples run in float32 (float64 for float64
input) under autocast; EIBA is computed in blocks of (query sample, key sample) pairs, optionally recomputed in
backward, so memory is O(chunk · heads · N²) rather than O(B² · heads · N²); under ``torch.distributed`` MIBA's
means are all-reduced sums over the global count and EIBA gathers K and V with a gradient-carrying all-gather.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from batchmates import distributed
from batchmates.nn._sdpa import attention

__all__ = [
    "IBA_MODES",
    "check_mode",
    "acc_dtype",
    "batch_means",
    "attend_to_means",
    "mean_batch_attention",
    "element_batch_attention",
    "intra_batch_attention",
]

IBA_MODES: tuple[str, ...] = ("mean", "element")
_MODE_ALIASES = {"mean": "mean", "miba": "mean", "element": "element", "eiba": "element"}

# Elements of one chunk's largest intermediate (scores or copied q/k/v) when chunk_size is None: 2**25 values
# (128 MiB in float32).
_AUTO_CHUNK_ELEMENTS = 2**25


def check_mode(mode: str) -> str:
    """The canonical mode name (``"mean"`` or ``"element"``) of ``mode`` or an alias; ``ValueError`` otherwise."""
    if not isinstance(mode, str) or mode.lower() not in _MODE_ALIASES:
        raise ValueError(
            f"mode must be 'mean' (MIBA, attend to the batch-mean keys/values) or 'element' (EIBA, average of "
            f"attention to every sample); got {mode!r}"
        )
    return _MODE_ALIASES[mode.lower()]


def acc_dtype(t: torch.Tensor) -> torch.dtype:
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


def batch_means(
    k: torch.Tensor, v: torch.Tensor, *, gather: bool = True
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(K̄, V̄, count)``: the (global) batch means ``[1, h, N, d]`` of ``k, v`` in float32 or higher, and the
    number of samples they average (the global batch size under ``torch.distributed`` with ``gather=True``)."""
    acc = acc_dtype(k)
    if gather and distributed.is_distributed():
        count = distributed.global_count(k.shape[0], k.device)
        k_bar = distributed.all_reduce_sum(k.sum(0, keepdim=True, dtype=acc)) / count
        v_bar = distributed.all_reduce_sum(v.sum(0, keepdim=True, dtype=acc)) / count
        return k_bar, v_bar, int(count)
    return k.mean(0, keepdim=True, dtype=acc), v.mean(0, keepdim=True, dtype=acc), int(k.shape[0])


def attend_to_means(q: torch.Tensor, k_bar: torch.Tensor, v_bar: torch.Tensor) -> torch.Tensor:
    """``softmax(Q_b K̄ᵀ/√d) V̄`` for every sample b; ``k_bar, v_bar`` are ``[1 or B, h, M, d]``."""
    b = q.shape[0]
    k_bar = k_bar.to(q.dtype).expand(b, -1, -1, -1)
    v_bar = v_bar.to(q.dtype).expand(b, -1, -1, -1)
    return attention(q, k_bar, v_bar)


def mean_batch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, gather: bool = True) -> torch.Tensor:
    """MIBA: ``softmax(Q_b K̄ᵀ/√d) V̄`` with K̄, V̄ the (global) batch means of ``k, v``. Shapes ``[B, h, N, d]``."""
    k_bar, v_bar, _ = batch_means(k, v, gather=gather)
    return attend_to_means(q, k_bar, v_bar)


def _eiba_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Σ_j softmax(q_b k_jᵀ/√d) v_j`` for a block: q ``[bq, h, N, d]``, k/v ``[bk, h, M, d]`` -> ``[bq, h, N, d]``.

    All queries of the block against the keys of all its key samples in one GEMM per head, a softmax over each
    key sample's M keys separately (in float32 or higher), and a second GEMM that also sums over the key samples.
    No per-pair copies of q, k or v are made.
    """
    bq, h, n, d = q.shape
    bk, _, m, e = v.shape
    acc = acc_dtype(q)
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
    acc = acc_dtype(q)
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
    mode = check_mode(mode)
    _check_qkv(q, k, v)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q, k and v must hold the same samples (dim 0), got {q.shape[0]} and {k.shape[0]}")
    if mode == "mean":
        return mean_batch_attention(q, k, v, gather=gather)
    if gather and distributed.is_distributed():
        k, v = distributed.gather(k), distributed.gather(v)
    return element_batch_attention(q, k, v, chunk_size=chunk_size, checkpoint_chunks=checkpoint_chunks)
