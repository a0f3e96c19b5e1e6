"""Benchmark: SwAV loss with Sinkhorn (forward + backward), ours vs ``lightly.loss.SwaVLoss``.

Paper: Caron et al. 2020 (arXiv:2006.09882) give K=3000, 2 high + 6 low resolution crops and 3 Sinkhorn
iterations at epsilon 0.05, but no loss timing. Library choices: the peer, the batch sizes and the target.
Issue 3 target: >= 1.0x lightly at B=256/1024, K=3000, 2 high + 6 low crops. Scores are those of L2-normalised
features against unit prototypes (the realistic range), float32; both implementations get identical inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batchmates.bench.common import BenchRow, measure
from batchmates.losses.swav import swav_loss

__all__ = ["run"]


def _inputs(b: int, k: int, n_crops: int, device: torch.device, dim: int = 128) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    protos = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    crops = []
    for _ in range(n_crops):
        z = F.normalize(torch.randn(b, dim, generator=g), dim=1)
        crops.append((z @ protos.t()).to(device).requires_grad_())
    return crops


def _lightly_loss():
    try:
        from lightly.loss import SwaVLoss  # bench/test-only reference
    except ImportError as exc:  # pragma: no cover - depends on the environment
        return None, f"lightly not installed ({exc}); pip install lightly"
    return SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05), None


def _case(b: int, k: int, n_high: int, n_low: int, dev: torch.device, iters: int, peer_loss, missing) -> list[BenchRow]:
    crops = _inputs(b, k, n_high + n_low, dev)
    high, low = crops[:n_high], crops[n_high:]
    case = f"B={b},K={k},crops={n_high}+{n_low}"

    def ours() -> None:
        torch.autograd.grad(swav_loss(high, low, validate=False), crops)

    t_ours, m_ours = measure(ours, dev, warmup=1, iters=iters)
    rows = []
    if peer_loss is not None:

        def peer() -> None:
            torch.autograd.grad(peer_loss(high, low).sum(), crops)

        t_peer, m_peer = measure(peer, dev, warmup=1, iters=iters)
        with torch.no_grad():
            diff = (swav_loss(high, low) - peer_loss(high, low).reshape(())).abs().item()
        rows.append(BenchRow("swav", case, "lightly.SwaVLoss", t_peer, m_peer, str(dev)))
        extra = {"speedup_vs_lightly": t_peer / t_ours, "abs_diff_vs_lightly": diff}
    else:
        extra = {"lightly": missing}
    rows.append(BenchRow("swav", case, "batchmates", t_ours, m_ours, str(dev), extra))
    return rows


def run(device: str, quick: bool) -> list[BenchRow]:
    """Time forward + backward of the SwAV loss for ours and lightly on ``device``; ``quick`` uses tiny sizes."""
    dev = torch.device(device)
    cases = [(64, 300)] if quick else [(256, 3000), (1024, 3000)]
    peer_loss, missing = _lightly_loss()
    rows: list[BenchRow] = []
    for b, k in cases:
        rows += _case(b, k, 2, 6, dev, 2 if quick else 5, peer_loss, missing)
    return rows
