"""Benchmark ``batch-transformer-head``: overhead of the Batch Transformer head over a plain linear head.

Paper: Her et al. 2024 (arXiv:2407.04218) state the head's cost on POSTER V2 as +1.3M parameters and +0.18 GFLOPs;
they give no step time.

Library choices (the cases are ours): one training step (forward + backward, gradients into the head's
parameters and into the stage features, as they would flow into a backbone) on random per-stage features shaped
like a CIFAR ResNet-18 (``[B,64,32,32]``, ``[B,128,16,16]``, ``[B,256,8,8]``, ``[B,512,4,4]``) at B = 64 and
256, for

* ``linear``: global average pool of the last stage + ``Linear(512, K)`` with cross-entropy;
* ``btn-no-mla``: :class:`BatchTransformerHead` with ``use_mla=False`` (pooled last stage, CBA, 3-term loss);
* ``btn-mla``: :class:`BatchTransformerHead` with Multi-Level Attention over all four stages;
* ``btn-mla-sdpa``: the same with ``cba_backend="sdpa"`` (fused attention kernels for CBA).

Each row's ``extra`` holds the head's parameter count and its time and parameter overhead relative to
``linear`` on the same case. ``quick=True`` uses tiny shapes (for smoke tests). Run with ``batchmates bench modules``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchmates.bench.common import BenchRow, hardware_description, measure
from batchmates.models import count_parameters
from batchmates.nn.batch_transformer import BatchTransformerHead

__all__ = ["run"]

BENCHMARK = "batch-transformer-head"


class _LinearHead(nn.Module):
    def __init__(self, c_last: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c_last, num_classes)

    def forward(self, stages: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(stages[-1].mean(dim=(2, 3)))


def _make_step(head: nn.Module, stages: list[torch.Tensor], labels: torch.Tensor):
    """One training step of ``head``: forward, its loss, backward into its parameters and the stage features."""

    def step() -> None:
        for s in stages:
            s.grad = None
        head.zero_grad(set_to_none=True)
        if isinstance(head, BatchTransformerHead):
            loss = head.loss(head(stages), labels)
        else:
            loss = F.cross_entropy(head(stages), labels)
        loss.backward()

    return step


def run(device: str, quick: bool) -> list[BenchRow]:
    """Time one training step of each head; return one :class:`BenchRow` per (batch size, head)."""
    dev = torch.device(device)
    if quick:
        dims, sizes, batches, num_classes, mla_dim, iters = [8, 16], [8, 4], [8], 5, 16, 2
    else:
        dims, sizes, batches, num_classes, mla_dim, iters = [64, 128, 256, 512], [32, 16, 8, 4], [64, 256], 100, 128, 5
    hw = hardware_description(dev)
    rows: list[BenchRow] = []
    for b in batches:
        g = torch.Generator().manual_seed(0)
        stages = [torch.randn(b, c, s, s, generator=g).to(dev).requires_grad_() for c, s in zip(dims, sizes)]
        labels = torch.randint(0, num_classes, (b,), generator=g).to(dev)
        torch.manual_seed(0)
        heads: dict[str, nn.Module] = {
            "linear": _LinearHead(dims[-1], num_classes),
            "btn-no-mla": BatchTransformerHead(
                dims, num_classes, feature_map_size=(sizes[-1], sizes[-1]), use_mla=False
            ),
            "btn-mla": BatchTransformerHead(
                dims, num_classes, feature_map_size=(sizes[-1], sizes[-1]), mla_dim=mla_dim
            ),
            "btn-mla-sdpa": BatchTransformerHead(
                dims, num_classes, feature_map_size=(sizes[-1], sizes[-1]), mla_dim=mla_dim, cba_backend="sdpa"
            ),
        }
        base_ms = base_params = None
        for name, head in heads.items():
            head = head.to(dev).train()

            step = _make_step(head, stages, labels)
            ms, peak = measure(step, dev, warmup=1 if quick else 2, iters=iters)
            params = count_parameters(head)
            if name == "linear":
                base_ms, base_params = ms, params
            rows.append(
                BenchRow(
                    benchmark=BENCHMARK,
                    case=f"B={b},K={num_classes},stages={'x'.join(map(str, dims))}",
                    impl=name,
                    time_ms=ms,
                    peak_mem_mb=peak,
                    device=hw,
                    extra={
                        "params": params,
                        "extra_params_vs_linear": params - base_params,
                        "time_ratio_vs_linear": ms / base_ms,
                        "step": "forward+backward (head params and stage features)",
                    },
                )
            )
    return rows
