"""Benchmark ``batch-attention``: step cost of BA²M and of intra-batch attention inside the blocks they live in.

Paper: BA²M (Cheng et al. 2021, arXiv:2103.15099) and IBAFormer (Sun et al. 2023, arXiv:2309.06282) report
accuracy, not step time or memory; no figure here comes from them.

Library choices (what is measured, and the targets, are ours): one training step (forward + backward into the
parameters and the input, as they would flow into the rest of a network), median of several, via
:func:`batchmates.bench.common.measure`, for

* ``resnet-block``: a ResNet basic block (3x3 conv-BN-ReLU-3x3 conv-BN, attention on the residual branch
  before the sum, identity shortcut) with ``none`` vs ``se`` (SqueezeExcite) vs ``ba2m`` vs ``ba2m`` with its
  finite-input check forced on (a host sync per call on GPU; off there by default). Target (issue 4): BA²M
  step-time overhead within 2x of SE's.
* ``vit-block``: the library's pre-norm ``models.vit.ViTBlock`` (LN -> mixer -> residual, LN -> MLP -> residual) with
  self-attention vs MIBA vs EIBA at B = 64 and 256 (64 tokens, width 192, 3 heads). Target: MIBA within 1.3x
  of self-attention.
* ``eiba-memory``: EIBA block training-step peak memory for two chunk sizes, with and without per-chunk
  recomputation (checkpointing). Target: memory bounded by the chunk size.
* ``token-attention``: the attention call alone (forward + backward into q, k, v), torch's fused
  ``F.scaled_dot_product_attention`` vs the library's :func:`batchmates.nn._sdpa.attention` (explicit float32 on
  the CPU for short sequences, the fused call otherwise), in float32 and under bf16 autocast, at the ViT's shape
  (49 tokens) and at BA²M's non-local shape on a 28x28 map (784 positions, where the library also calls the
  fused kernel). It is what decides the rule in ``nn/_sdpa.py``.

Each row's ``extra`` holds parameter counts and the overhead relative to the baseline of its case.
``quick=True`` uses tiny shapes (seconds on CPU). Run with ``batchmates bench modules``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from batchmates.bench.common import BenchRow, hardware_description, measure
from batchmates.models import count_parameters
from batchmates.models.layers import create_attn_layer
from batchmates.models.vit import ViTBlock
from batchmates.nn._sdpa import attention

__all__ = ["run", "BasicBlock"]


class BasicBlock(nn.Module):
    """``relu(attn(bn2(conv2(relu(bn1(conv1(x)))))) + x)``: a minimal ResNet basic block (identity shortcut)."""

    def __init__(self, channels: int, attn_layer: str = "none", **attn_kwargs: Any) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.attn = create_attn_layer(attn_layer, channels, **attn_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.attn(self.bn2(self.conv2(out))) + x)


class _Attend(nn.Module):
    """``attention(x, x/2, x)`` by ``fn``, optionally under bf16 autocast: the attention call alone."""

    def __init__(self, fn: Any, bf16: bool) -> None:
        super().__init__()
        self.fn, self.bf16 = fn, bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.bf16):
            xin = x.to(torch.bfloat16) if self.bf16 else x  # as a bf16 Linear hands them over under autocast
            return self.fn(xin, xin * 0.5, xin).float()


def _step(module: nn.Module, x: torch.Tensor):
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).square().mean().backward()

    return step


def _rows_for_case(
    benchmark: str, case: str, impls: dict[str, nn.Module], x: torch.Tensor, dev: torch.device, hw: str,
    baseline: str, iters: int, extra_of: dict[str, dict[str, Any]] | None = None,
) -> list[BenchRow]:
    rows: list[BenchRow] = []
    base_ms = base_params = None
    for name, module in impls.items():
        module.to(dev).train()
        t_ms, mem = measure(_step(module, x), dev, warmup=2, iters=iters)
        params = count_parameters(module)
        if name == baseline:
            base_ms, base_params = t_ms, params
        extra: dict[str, Any] = {"params": params, "batch": x.shape[0]}
        if base_ms is not None:
            extra["time_vs_" + baseline] = round(t_ms / base_ms, 3)
            extra["extra_params_vs_" + baseline] = params - base_params
        if extra_of and name in extra_of:
            extra.update(extra_of[name])
        rows.append(BenchRow(benchmark, case, name, t_ms, mem, hw, extra))
        module.to("cpu")
    return rows


def run(device: str, quick: bool) -> list[BenchRow]:
    """Run the four benchmarks on ``device``; ``quick`` uses tiny shapes."""
    dev = torch.device(device)
    hw = hardware_description(dev)
    rows: list[BenchRow] = []
    if quick:
        cnn_cases, vit_batches, tokens, dim, heads, iters = [(8, 16, 8)], [4, 8], 16, 32, 2, 2
        mem_batch, mem_chunks = 8, (4, 64)
    else:
        cnn_cases, vit_batches, tokens, dim, heads, iters = [(128, 64, 32), (128, 256, 8)], [64, 256], 64, 192, 3, 5
        mem_batch, mem_chunks = 256, (256, 4096)

    # --- ResNet basic block: none vs SE vs BA2M ---------------------------------------------------------------
    for b, c, s in cnn_cases:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, c, s, s, generator=g).to(dev).requires_grad_(True)
        torch.manual_seed(0)
        impls = {
            "none": BasicBlock(c, "none"),
            "se": BasicBlock(c, "se"),
            "ba2m": BasicBlock(c, "ba2m"),
            "ba2m+finite-check": BasicBlock(c, "ba2m", check_finite=True),
        }
        attn_params = {k: {"attn_params": count_parameters(m.attn)} for k, m in impls.items()}
        case_rows = _rows_for_case("resnet-block", f"B={b} C={c} {s}x{s}", impls, x, dev, hw, "none", iters,
                                   attn_params)
        se_ms = next(r.time_ms for r in case_rows if r.impl == "se")
        none_ms = next(r.time_ms for r in case_rows if r.impl == "none")
        for r in case_rows:
            if r.impl.startswith("ba2m") and se_ms > none_ms:
                r.extra["overhead_vs_se_overhead"] = round((r.time_ms - none_ms) / (se_ms - none_ms), 3)
        rows += case_rows

    # --- ViT block: self-attention vs MIBA vs EIBA ------------------------------------------------------------
    for b in vit_batches:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, tokens, dim, generator=g).to(dev).requires_grad_(True)
        torch.manual_seed(0)
        impls = {name: ViTBlock(dim, heads, name) for name in ("self", "miba", "eiba")}
        rows += _rows_for_case("vit-block", f"B={b} T={tokens} D={dim} H={heads}", impls, x, dev, hw, "self", iters)

    # --- EIBA peak memory vs chunk size -----------------------------------------------------------------------
    g = torch.Generator().manual_seed(0)
    x = torch.randn(mem_batch, tokens, dim, generator=g).to(dev).requires_grad_(True)
    impls = {}
    for chunk in mem_chunks:
        for ckpt in (True, False):
            torch.manual_seed(0)
            name = f"eiba chunk={chunk}" + ("" if ckpt else " no-ckpt")
            impls[name] = ViTBlock(dim, heads, "eiba", chunk_size=chunk, checkpoint_chunks=ckpt)
    torch.manual_seed(0)
    impls = {"self": ViTBlock(dim, heads, "self"), **impls}
    rows += _rows_for_case("eiba-memory", f"B={mem_batch} T={tokens} D={dim} H={heads}", impls, x, dev, hw, "self",
                           iters)

    # --- the attention call alone: torch's fused kernel vs the library's rule ---------------------------------
    shapes = [(4, 2, 16, 8)] if quick else [(128, 4, 49, 32), (128, 1, 784, 4)]
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=g).to(dev).requires_grad_(True)
        for bf16 in (False, True):
            impls = {"fused": _Attend(F.scaled_dot_product_attention, bf16), "batchmates": _Attend(attention, bf16)}
            case = f"B={shape[0]} H={shape[1]} T={shape[2]} d={shape[3]} {'bf16' if bf16 else 'fp32'}"
            rows += _rows_for_case("token-attention", case, impls, x, dev, hw, "fused", iters)
    return rows
