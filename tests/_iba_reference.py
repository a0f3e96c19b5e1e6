"""Independent references for the intra-batch attention tests: explicit softmax(QKᵀ/√d)V, no SDPA, no library
kernels, and the training statistics recomputed from their definition (helpers, not a test module)."""

from __future__ import annotations

import torch

from batchmates.nn.intra_batch_attention import IntraBatchAttention

DT = torch.float64
DIM, HEADS = 12, 3


def make(mode: str = "mean", seed: int = 0, **kw) -> IntraBatchAttention:
    torch.manual_seed(seed)
    return IntraBatchAttention(DIM, HEADS, mode=mode, **kw).to(DT)


def tokens(b: int = 5, n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, DIM, generator=g, dtype=DT)


def heads(m: IntraBatchAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, _ = x.shape
    qkv = x @ m.qkv.weight.T + m.qkv.bias  # [B, N, 3D]
    q, k, v = qkv.split(DIM, dim=-1)
    return tuple(t.reshape(b, n, HEADS, DIM // HEADS).transpose(1, 2) for t in (q, k, v))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = torch.einsum("...nd,...md->...nm", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("...nm,...md->...nd", torch.softmax(scores, dim=-1), v)


def naive_iba(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "mean":
        kb, vb = k.mean(0, keepdim=True), v.mean(0, keepdim=True)
        return attend(q, kb.expand_as(k), vb.expand_as(v))
    b = q.shape[0]
    return torch.stack([sum(attend(q[i], k[j], v[j]) for j in range(b)) / b for i in range(b)])


def merge(m: IntraBatchAttention, o: torch.Tensor) -> torch.Tensor:
    b, _, n, _ = o.shape
    return o.transpose(1, 2).reshape(b, n, DIM) @ m.proj.weight.T + m.proj.bias


def ref_self_attention(m: IntraBatchAttention, x: torch.Tensor) -> torch.Tensor:
    return merge(m, attend(*heads(m, x)))


def ref_block(m: IntraBatchAttention, x: torch.Tensor, mode: str) -> torch.Tensor:
    q, k, v = heads(m, x)
    return merge(m, 0.5 * (attend(q, k, v) + naive_iba(q, k, v, mode)))


def ref_statistics(m: IntraBatchAttention, batches: list[torch.Tensor], momentum: float, bank_size: int) -> dict:
    """Running means of the batch means (cumulative average while 1/n > momentum, then EMA), the last batch
    size and the bank of the last ``bank_size`` training samples, from the definition."""
    rk = rv = bk = bv = None
    for n, x in enumerate(batches, 1):
        _, k, v = heads(m, x)
        w = max(momentum, 1.0 / n)
        rk = k.mean(0) if rk is None else (1 - w) * rk + w * k.mean(0)
        rv = v.mean(0) if rv is None else (1 - w) * rv + w * v.mean(0)
        bk = k if bk is None else torch.cat([bk, k])[-bank_size:]
        bv = v if bv is None else torch.cat([bv, v])[-bank_size:]
    return {"k": rk, "v": rv, "bank_k": bk[-bank_size:], "bank_v": bv[-bank_size:], "b": batches[-1].shape[0]}


def ref_independent_eval(m: IntraBatchAttention, x: torch.Tensor, form: str, stats: dict) -> torch.Tensor:
    """½(SA + IBA_eval) with IBA_eval the expected training term given the sample (own weight 1/B_train)."""
    q, k, v = heads(m, x)
    sa = attend(q, k, v)
    w = 1.0 / stats["b"]
    if form == "sa":
        return merge(m, sa)
    if form == "running":
        kt, vt = w * k + (1 - w) * stats["k"], w * v + (1 - w) * stats["v"]
        iba = attend(q, kt, vt)
    else:
        bk, bv = stats["bank_k"], stats["bank_v"]
        others = torch.stack([sum(attend(q[i], bk[j], bv[j]) for j in range(bk.shape[0])) / bk.shape[0]
                              for i in range(x.shape[0])])
        iba = w * sa + (1 - w) * others
    return merge(m, 0.5 * (sa + iba))
