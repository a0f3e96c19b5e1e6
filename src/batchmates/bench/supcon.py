"""SupCon benchmark: forward+backward time and peak memory, ours (dense, chunked) vs peers.

Peers, measured side by side in one run:
* ``pml``: ``pytorch_metric_learning.losses.SupConLoss`` (scaled by τ/τ_base), which builds several ``[VN, VN]``
  float matrices;
* ``official``: :func:`~batchmates.testing.oracles.official_supcon`, a faithful transcription of the official
  SupContrast formula (HobbitLong/SupContrast ``losses.py``, post PR #142), for reference only.
Ours: ``supcon_loss`` dense (one ``[VN, VN]`` buffer) and chunked (blocks recomputed in backward).

Paper: Khosla et al. 2020 (arXiv:2004.11362) give the loss, not its cost. Library choices: the peers, the
sizes (N 1024/4096 x 2 views, D 128; 16384 for memory) and the chunk size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from batchmates.bench.common import BenchRow, try_measure
from batchmates.losses.supcon import supcon_loss
from batchmates.testing.oracles import official_supcon

__all__ = ["run", "official_supcon"]  # official_supcon: re-exported from its old place

TEMPERATURE = 0.1
BASE_TEMPERATURE = 0.07


def _fwd_bwd(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        loss_fn(x).backward()

    return step


def run(device: str, quick: bool) -> list[BenchRow]:
    """Benchmark rows for SupCon. ``quick``: tiny sizes that run in seconds on CPU (smoke test)."""
    rows: list[BenchRow] = []
    dim = 16 if quick else 128
    sizes = [32, 64] if quick else [1024, 4096]
    big = 256 if quick else 16384
    chunk = 64 if quick else 4096
    n_classes = 10 if quick else 100
    gen = torch.Generator().manual_seed(0)

    try:
        from pytorch_metric_learning.losses import SupConLoss as PMLSupCon

        pml = PMLSupCon(temperature=TEMPERATURE)
        pml_note = None
    except ImportError:
        pml, pml_note = None, "pytorch_metric_learning not installed: impl skipped"

    def ours(chunk_size: int | None):
        def f(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return supcon_loss(
                x, labels, temperature=TEMPERATURE, base_temperature=BASE_TEMPERATURE, chunk_size=chunk_size,
                chunk_threshold=None, normalize=True,
            )

        return f

    def official(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.normalize(x, dim=-1)
        return official_supcon(z, labels, temperature=TEMPERATURE, base_temperature=BASE_TEMPERATURE)

    def pml_loss(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, v, d = x.shape
        emb = x.transpose(0, 1).reshape(n * v, d)
        return pml(emb, labels.repeat(v)) * (TEMPERATURE / BASE_TEMPERATURE)

    impls: list[tuple[str, Callable | None]] = [
        ("ours-dense", ours(None)),
        (f"ours-chunked({chunk})", ours(chunk)),
        ("official", official),
        ("pml", pml),
    ]
    for n in sizes:
        x = torch.randn(n, 2, dim, generator=gen).to(device).requires_grad_(True)
        labels = torch.randint(0, n_classes, (n,), generator=gen).to(device)
        case = f"N={n}x2 views, D={dim}"
        for name, fn in impls:
            if name == "pml":
                if pml is None:
                    rows.append(BenchRow("supcon", case, name, float("nan"), None, device, {"skipped": pml_note}))
                    continue
                fn = pml_loss
            t, mem, err = try_measure(_fwd_bwd(lambda z, fn=fn, y=labels: fn(z, y), x), device)
            rows.append(BenchRow("supcon", case, name, t, mem, device, err))

    x = torch.randn(big, 2, dim, generator=gen).to(device).requires_grad_(True)
    labels = torch.randint(0, n_classes, (big,), generator=gen).to(device)
    case = f"N={big}x2 views, D={dim} (memory)"
    for name, fn in [("ours-dense", ours(None)), (f"ours-chunked({chunk})", ours(chunk))]:
        t, mem, err = try_measure(_fwd_bwd(lambda z, fn=fn, y=labels: fn(z, y), x), device)
        rows.append(BenchRow("supcon", case, name, t, mem, device, err))
    return rows
