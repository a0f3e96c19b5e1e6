"""`batchmates bench curation`: cost of batch curation (The Bad Batches, arXiv:2403.19579).

Paper: no cost figures (the paper's claim is accuracy and faster convergence at small batch sizes).
Library choices (what is measured, and how):

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
* ``curation-step``: the share of a ``simclr`` training step that curation adds (:func:`simclr_step_share`;
  the target is at most 10% for the online extractor; the number is printed).

``quick=True`` uses tiny sizes (a smoke run for CI).
"""

from __future__ import annotations

import math
import statistics
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


STEP_CASES = (
    ("batchmates simclr step", None),
    ("simclr step + frd-batch (online)", {"curate": "frd-batch", "curate_threshold": 1e30}),
    ("simclr step + frd-pairwise drop (online)", {"curate": "frd-pairwise", "curate_quantile": 0.75}),
    ("simclr step + frd-batch (frozen extractor)", {"curate": "frd-batch", "curate_threshold": 1e30}),
)
TARGET_MAX_SHARE = 0.10


def _simclr_step_fn(opts: dict | None, frozen: bool, batch: int, device: torch.device):
    """One optimiser step of the ``simclr`` method (resnet-small, 28 px, 1 channel) with curation ``opts``."""
    import copy

    from batchmates.config import DataInfo, RunConfig
    from batchmates.curation import FRDScorer
    from batchmates.methods import get_method

    cls = get_method("simclr")
    info = DataInfo(name="fashion-mnist", num_classes=10, in_channels=1, image_size=28, mean=(0.286,),
                    std=(0.353,), train_size=60000, hflip=True)
    cfg = RunConfig(method="simclr", data="fashion-mnist", backbone="resnet-small", batch_size=batch,
                    options=dict(opts or {})).resolve(cls)
    torch.manual_seed(0)
    model = cls(cfg, info).to(device).train()
    if frozen:  # a frozen extractor needs its own forward of both views (here: a frozen copy of the backbone)
        model.curation_scorer = FRDScorer(copy.deepcopy(model.backbone), mode="gaussian")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (batch, 1, 28, 28), generator=gen, dtype=torch.uint8).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)

    def step() -> None:
        loss, _ = model.compute_loss((x, y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if model._curation_skip:  # what CurationMixin.on_before_optimizer_step does under Lightning
            opt.zero_grad(set_to_none=True)
        opt.step()

    step.model = model  # type: ignore[attr-defined]
    step.batch = (x, y)  # type: ignore[attr-defined]
    return step


def _scoring_alone(step, dev: torch.device) -> tuple[float, float]:
    """Time of the online scoring work alone on one step's features: (frd-batch score, frd-pairwise scores)."""
    from batchmates.curation import global_batch_frd, pair_distance

    model = step.model
    torch.manual_seed(0)
    with torch.no_grad():
        h1, h2, z1, z2 = model.encode_views(*model.train_views(step.batch[0]))
    spaces = [(h1, h2), (z1, z2)]
    t_batch, _ = measure(lambda: global_batch_frd(spaces), dev, warmup=1, iters=5)
    t_pairs, _ = measure(lambda: sum(pair_distance("pairwise", a, b) for a, b in spaces), dev, warmup=1, iters=5)
    return t_batch, t_pairs


def simclr_step_share(device: str, quick: bool) -> list[BenchRow]:
    """Share of a ``simclr`` training step that curation adds (batch 256, quick: 16; resnet-small, 28 px).

    Rows: the plain step; ``frd-batch`` and ``frd-pairwise`` drop scoring the training forward's own backbone +
    projector features (no extra forward; the frd-batch threshold is set so that no batch is skipped, so the row
    is the scoring cost alone); ``frd-batch`` with a frozen extractor (a frozen copy of the backbone), which needs
    its own forward of both views. The steps are timed interleaved (one of each per round, median over rounds)
    so that load from other processes hits every row alike (the order alternates between rounds).
    ``extra["added_share"]`` is the median over rounds of the paired difference ``curated − plain`` divided by
    the plain step's median; the line printed names the online frd-batch share against the 10% target.
    Two more rows time the scoring work alone on one step's features (less noisy than a difference of two
    step times; ``extra["share_of_plain_step"]``).
    """
    dev = torch.device(device)
    b = 16 if quick else 256
    rounds = 3 if quick else 15
    steps = [_simclr_step_fn(opts, "frozen" in impl, b, dev) for impl, opts in STEP_CASES]
    for fn in steps:  # warm-up
        fn()
    times: list[list[float]] = [[] for _ in steps]
    for r in range(rounds):
        order = range(len(steps)) if r % 2 == 0 else reversed(range(len(steps)))  # ABBA: cancels drifts
        for i in order:
            _sync(dev)
            t0 = time.perf_counter()
            steps[i]()
            _sync(dev)
            times[i].append((time.perf_counter() - t0) * 1e3)
    med = [statistics.median(t) for t in times]
    case = f"SimCLR step B={b} resnet-small 28px"
    rows = [BenchRow("curation-step", case, STEP_CASES[0][0], med[0], None, str(dev))]
    for (impl, _), t, ts in zip(STEP_CASES[1:], med[1:], times[1:]):
        added = statistics.median([a - p for a, p in zip(ts, times[0])])  # paired: same round, same load
        rows.append(BenchRow("curation-step", case, impl, t, None, str(dev),
                             {"added_ms": added, "added_share": added / med[0], "target_max_share": TARGET_MAX_SHARE,
                              "rounds": rounds}))
    t_batch, t_pairs = _scoring_alone(steps[1], dev)
    for impl, t in (("frd-batch score alone (global_batch_frd, backbone + projector)", t_batch),
                    ("frd-pairwise scores alone (discrete Fréchet, backbone + projector)", t_pairs)):
        rows.append(BenchRow("curation-step", case, impl, t, None, str(dev), {"share_of_plain_step": t / med[0]}))
    share = rows[1].extra["added_share"]
    verdict = "within" if share <= TARGET_MAX_SHARE else "OVER"
    print(f"[bench] curation step share ({case}, {dev}): frd-batch online {share:+.1%} ({verdict} the "
          f"{TARGET_MAX_SHARE:.0%} target), frd-pairwise online {rows[2].extra['added_share']:+.1%}, "
          f"frd-batch frozen extractor {rows[3].extra['added_share']:+.1%}; scoring alone: frd-batch "
          f"{t_batch / med[0]:.1%}, frd-pairwise {t_pairs / med[0]:.1%} of the plain step", flush=True)
    return rows


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
