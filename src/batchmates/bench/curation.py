"""`batchmates bench curation`: cost of Fréchet ResNet Distance scoring (The Bad Batches, arXiv:2403.19579).

Rows:

* pairwise FRD (discrete Fréchet distance) of ``P`` pairs of ``D``-point curves (``P=256, D=1000``: the
  ResNet's 1000-d output, one batch of pairs), as pairs/s in ``extra``:
  - ``batchmates``: the vectorised anti-diagonal DP on the whole batch;
  - ``python-recurrence``: the textbook recurrence in plain Python, timed on a few pairs at the full ``D`` and
    extrapolated linearly to ``P`` pairs (stated in ``extra``);
  - ``torch-cell-loop``: the same recurrence with one torch op per cell on the benchmark device, timed on one
    pair of a shorter curve and extrapolated by cell count (``D**2``) to one pair at ``D``, then to ``P`` pairs
    (stated in ``extra``; a direct run would take minutes).
* Gaussian FRD between two ``[N, D]`` feature sets (``N=256, D=512``): ours (float64, eigh) vs the common FID
  formulation with ``scipy.linalg.sqrtm`` (CPU).

``quick=True`` uses tiny sizes (a smoke run for CI).
"""

from __future__ import annotations

import math
import time

import torch

from batchmates.bench.common import BenchRow, measure
from batchmates.curation import discrete_frechet_distance, gaussian_frechet_distance

BENCHMARK = "curation"


def _python_frechet(p: list[float], q: list[float]) -> float:
    """Reference recurrence in plain Python (two rolling rows)."""
    inf = math.inf
    prev = [inf] * len(q)
    for i, pi in enumerate(p):
        cur = [inf] * len(q)
        for j, qj in enumerate(q):
            d = abs(pi - qj)
            if i == 0 and j == 0:
                cur[j] = d
                continue
            best = min(prev[j], prev[j - 1] if j else inf, cur[j - 1] if j else inf)
            cur[j] = d if d > best else best
        prev = cur
    return prev[-1]


def _torch_cell_loop(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Unvectorised torch: one small op per cell of the DP table (one pair)."""
    n, m = p.shape[0], q.shape[0]
    c = torch.full((n, m), math.inf, dtype=p.dtype, device=p.device)
    for i in range(n):
        for j in range(m):
            d = (p[i] - q[j]).abs()
            if i == 0 and j == 0:
                c[i, j] = d
                continue
            best = torch.minimum(
                torch.minimum(
                    c[i - 1, j] if i else c.new_tensor(math.inf), c[i, j - 1] if j else c.new_tensor(math.inf)
                ),
                c[i - 1, j - 1] if i and j else c.new_tensor(math.inf),
            )
            c[i, j] = torch.maximum(best, d)
    return c[n - 1, m - 1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _scipy_gaussian(x: torch.Tensor, y: torch.Tensor) -> float:
    import numpy as np
    import scipy.linalg

    xa, ya = x.double().cpu().numpy(), y.double().cpu().numpy()
    s1, s2 = np.cov(xa, rowvar=False), np.cov(ya, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    mu = ((xa.mean(0) - ya.mean(0)) ** 2).sum()
    return float(mu + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def simclr_step_share(device: str, quick: bool) -> list[BenchRow]:
    """Share of a SimCLR training step that curation adds: batch 256 (quick: 16) of 28 px images, resnet-small,
    two views, NT-Xent, SGD step; curated = the same step after scoring every pair with pairwise FRD on the online
    encoder (a no-grad forward of both views + the Fréchet DP over the 128-d features) and dropping the worst 25%.
    """
    from batchmates.curation import Curator, FRDScorer
    from batchmates.losses import NTXentLoss
    from batchmates.models import create_backbone

    dev = torch.device(device)
    b = 16 if quick else 256
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(b, 1, 28, 28, generator=gen).to(dev)
    x2 = torch.randn(b, 1, 28, 28, generator=gen).to(dev)
    torch.manual_seed(0)
    backbone = create_backbone("resnet-small", in_channels=1, image_size=28).to(dev)
    proj = torch.nn.Sequential(torch.nn.Linear(backbone.feature_dim, backbone.feature_dim), torch.nn.ReLU(),
                               torch.nn.Linear(backbone.feature_dim, 128)).to(dev)
    opt = torch.optim.SGD([*backbone.parameters(), *proj.parameters()], lr=0.01, momentum=0.9)
    loss_fn = NTXentLoss(temperature=0.1)
    curator = Curator(FRDScorer.from_online_encoder(backbone), "drop", quantile=0.75)

    def step(curate: bool) -> None:
        keep = None
        if curate:
            keep = curator.select(x1, x2).keep
        z = proj(backbone(torch.cat([x1, x2])))
        z1, z2 = z[:b], z[b:]
        if keep is not None:
            z1, z2 = z1[keep], z2[keep]
        loss = loss_fn(z1, z2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    iters = 3 if quick else 10
    t_plain, m_plain = measure(lambda: step(False), dev, warmup=2, iters=iters)
    t_cur, m_cur = measure(lambda: step(True), dev, warmup=2, iters=iters)
    case = f"SimCLR step B={b} resnet-small 28px"
    share = (t_cur - t_plain) / t_plain
    return [
        BenchRow("curation-step", case, "batchmates simclr step", t_plain, m_plain, str(dev)),
        BenchRow("curation-step", case, "simclr step + frd-pairwise drop", t_cur, m_cur, str(dev),
                 {"added_share": share, "target_max_share": 0.20}),
    ]


def run(device: str, quick: bool) -> list[BenchRow]:
    rows = _run_frd(device, quick)
    rows.extend(simclr_step_share(device, quick))
    return rows


def _run_frd(device: str, quick: bool) -> list[BenchRow]:
    dev = torch.device(device)
    pairs, d = (8, 64) if quick else (256, 1000)
    py_pairs = 2
    loop_d = 12 if quick else 60
    n_g, d_g = (32, 16) if quick else (256, 512)
    gen = torch.Generator().manual_seed(0)
    rows: list[BenchRow] = []

    # ---- pairwise FRD throughput
    p = torch.randn(pairs, d, generator=gen).to(dev)
    q = torch.randn(pairs, d, generator=gen).to(dev)
    case = f"pairwise FRD P={pairs} D={d} float32"
    ms, mem = measure(lambda: discrete_frechet_distance(p, q), dev, warmup=1, iters=3)
    rows.append(
        BenchRow(BENCHMARK, case, "batchmates", ms, mem, str(dev), {"pairs_per_s": pairs / (ms / 1e3), "pairs": pairs})
    )
    ours = discrete_frechet_distance(p[:py_pairs], q[:py_pairs]).double().cpu()

    pl, ql = p[:py_pairs].double().cpu().tolist(), q[:py_pairs].double().cpu().tolist()
    t0 = time.perf_counter()
    ref = [_python_frechet(pl[r], ql[r]) for r in range(py_pairs)]
    per_pair_s = (time.perf_counter() - t0) / py_pairs
    rows.append(
        BenchRow(
            BENCHMARK,
            case,
            "python-recurrence",
            per_pair_s * pairs * 1e3,
            None,
            "cpu",
            {
                "pairs_per_s": 1.0 / per_pair_s,
                "extrapolated": f"timed on {py_pairs} pairs at D={d}, scaled linearly to {pairs} pairs",
                "max_abs_diff_vs_ours": float((torch.tensor(ref, dtype=torch.float64) - ours).abs().max()),
            },
        )
    )

    pd_ = p[0, :loop_d].contiguous()
    qd_ = q[0, :loop_d].contiguous()
    _torch_cell_loop(pd_[:3], qd_[:3])  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    loop_val = _torch_cell_loop(pd_, qd_)
    _sync(dev)
    per_cell_s = (time.perf_counter() - t0) / loop_d**2
    per_pair_s = per_cell_s * d * d
    check = discrete_frechet_distance(pd_[None], qd_[None])[0]
    rows.append(
        BenchRow(
            BENCHMARK,
            case,
            "torch-cell-loop",
            per_pair_s * pairs * 1e3,
            None,
            str(dev),
            {
                "pairs_per_s": 1.0 / per_pair_s,
                "extrapolated": f"timed on 1 pair at D={loop_d} ({loop_d**2} cells), scaled by cells to D={d} "
                f"and linearly to {pairs} pairs",
                "abs_diff_vs_ours": float((loop_val - check).abs()),
            },
        )
    )

    # ---- Gaussian FRD
    x = torch.randn(n_g, d_g, generator=gen).to(dev)
    y = (torch.randn(n_g, d_g, generator=gen) * 1.3 + 0.2).to(dev)
    case = f"gaussian FRD N={n_g} D={d_g}"
    ms, mem = measure(lambda: gaussian_frechet_distance(x, y), dev, warmup=1, iters=3)
    value = float(gaussian_frechet_distance(x, y))
    rows.append(BenchRow(BENCHMARK, case, "batchmates", ms, mem, str(dev), {"value": value}))
    try:
        ms_ref, _ = measure(lambda: _scipy_gaussian(x, y), "cpu", warmup=1, iters=3)
        ref_val = _scipy_gaussian(x, y)
        rows.append(
            BenchRow(
                BENCHMARK,
                case,
                "scipy-sqrtm",
                ms_ref,
                None,
                "cpu",
                {"value": ref_val, "rel_diff_vs_ours": abs(ref_val - value) / max(abs(ref_val), 1e-12)},
            )
        )
    except ImportError:  # scipy is a dev dependency; the row is omitted without it
        pass
    return rows
