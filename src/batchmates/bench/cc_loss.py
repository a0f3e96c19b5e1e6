"""Benchmark: CC-Loss (forward + backward), ours (per-class sums, O(B*C)) vs the naive pairwise form (B x B).

Paper: Song et al. 2020 (arXiv:2010.05469) define the pairwise distances; they give no timing.
Library choices: the oracle :func:`batchmates.testing.oracles.naive_cc_loss` as the baseline, the sizes and the
issue 3 target: >= 5x the naive form at B=1024, C=512.
"""

from __future__ import annotations

import torch

from batchmates.bench.common import BenchRow, measure
from batchmates.losses.cc_loss import cc_loss
from batchmates.testing.oracles import naive_cc_loss

__all__ = ["run", "naive_cc_loss"]


def _case(b: int, c: int, k: int, dev: torch.device, iters: int) -> list[BenchRow]:
    g = torch.Generator().manual_seed(0)
    attention = torch.sigmoid(torch.randn(b, c, generator=g)).to(dev).requires_grad_()
    labels = torch.randint(0, k, (b,), generator=g).to(dev)
    case = f"B={b},C={c},classes={k}"

    def ours() -> None:
        torch.autograd.grad(cc_loss(attention, labels, num_classes=k, check_finite=False), attention)

    def naive() -> None:
        torch.autograd.grad(naive_cc_loss(attention, labels), attention)

    t_naive, m_naive = measure(naive, dev, warmup=1, iters=iters)
    t_ours, m_ours = measure(ours, dev, warmup=1, iters=iters)
    with torch.no_grad():
        diff = (cc_loss(attention, labels) - naive_cc_loss(attention, labels)).abs().item()
    extra = {"speedup_vs_naive": t_naive / t_ours, "abs_diff_vs_naive": diff}
    return [
        BenchRow("cc_loss", case, "naive pairwise", t_naive, m_naive, str(dev)),
        BenchRow("cc_loss", case, "batchmates", t_ours, m_ours, str(dev), extra),
    ]


def run(device: str, quick: bool) -> list[BenchRow]:
    """Time forward + backward of CC-Loss, ours vs :func:`naive_cc_loss`; ``quick`` uses tiny sizes."""
    dev = torch.device(device)
    cases = [(128, 64, 10)] if quick else [(1024, 512, 100)]
    rows: list[BenchRow] = []
    for b, c, k in cases:
        rows += _case(b, c, k, dev, 3 if quick else 10)
    return rows
