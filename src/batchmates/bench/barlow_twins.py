"""Barlow Twins benchmark: forward+backward time and peak memory, ours vs ``lightly.loss.BarlowTwinsLoss``.

Ours picks the ``N×N`` Gram form when ``2N < D`` in one process (``algorithm="auto"``); the ``D×D`` cross-correlation
form is also measured so the gain of each choice is visible.

Paper: Zbontar et al. 2021 (arXiv:2103.03230) use an 8192-wide projector and lambda 0.0051; no loss timing.
Library choices: the peer (lightly), the sizes (B 256/1024 x D 2048/8192) and the Gram-form dispatch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from batchmates.bench.common import BenchRow, try_measure
from batchmates.losses.barlow_twins import barlow_twins_loss

LAMBDA = 0.0051


def _step(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor):
    def step() -> None:
        a.grad = None
        b.grad = None
        loss_fn(a, b).backward()

    return step


def run(device: str, quick: bool) -> list[BenchRow]:
    """Benchmark rows for Barlow Twins. ``quick``: tiny sizes that run in seconds on CPU (smoke test)."""
    cases = [(32, 64), (64, 128)] if quick else [(256, 2048), (256, 8192), (1024, 2048), (1024, 8192)]
    gen = torch.Generator().manual_seed(0)
    try:
        from lightly.loss import BarlowTwinsLoss as LightlyBT

        lightly_fn: Callable | None = LightlyBT(lambda_param=LAMBDA)
        note = None
    except ImportError:
        lightly_fn, note = None, "lightly not installed: impl skipped"

    impls: list[tuple[str, Callable | None]] = [
        ("ours", lambda a, b: barlow_twins_loss(a, b, lambda_param=LAMBDA)),
        ("ours-cross", lambda a, b: barlow_twins_loss(a, b, lambda_param=LAMBDA, algorithm="cross")),
        ("lightly", lightly_fn),
    ]
    rows: list[BenchRow] = []
    for n, d in cases:
        a = torch.randn(n, d, generator=gen).to(device).requires_grad_(True)
        b = torch.randn(n, d, generator=gen).to(device).requires_grad_(True)
        case = f"B={n}, D={d}"
        for name, fn in impls:
            if fn is None:
                rows.append(BenchRow("barlow_twins", case, name, float("nan"), None, device, {"skipped": note}))
                continue
            t, mem, err = try_measure(_step(fn, a, b), device)
            rows.append(BenchRow("barlow_twins", case, name, t, mem, device, err))
    return rows
