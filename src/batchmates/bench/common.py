"""Shared timing and memory measurement for the benchmarks, and the row format they all emit.

Paper: none. Library choices: the median of several timed calls after warm-up, with device synchronisation;
peak memory from the CUDA allocator only (None on the CPU, where torch exposes no allocator statistics).
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class BenchRow:
    """One measurement: ``impl`` (ours or a peer) on ``case`` of ``benchmark``, on ``device``."""

    benchmark: str
    case: str
    impl: str
    time_ms: float
    peak_mem_mb: float | None
    device: str
    extra: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hardware_description(device: torch.device | str) -> str:
    """A human-readable name of the hardware a benchmark ran on (goes into every report)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any], device: torch.device | str, *, warmup: int = 2, iters: int = 5
) -> tuple[float, float | None]:
    """Median wall time in ms of ``fn()`` and its peak memory in MiB.

    On CUDA the peak is ``torch.cuda.max_memory_allocated`` above the memory held before the call. On CPU the
    peak is None: PyTorch exposes no allocator statistics there (the profiler's per-op accounting double-counts
    nested ops), so memory claims in the docs come from CUDA runs.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = None
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return statistics.median(times), peak


def try_measure(fn: Callable[[], Any], device: str) -> tuple[float, float | None, dict | None]:
    """:func:`measure` (1 warm-up, 3 timed calls) that turns an out-of-memory error into a result row.

    Returns ``(time_ms, peak_mb, None)``, or ``(nan, None, {"error": ...})`` when the case does not fit: on a
    small machine an OOM is a finding to report, not a crash.
    """
    try:
        t, mem = measure(fn, device, warmup=1, iters=3)
        return t, mem, None
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
        return float("nan"), None, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def is_ours(impl: str) -> bool:
    """Rows whose ``impl`` is batchmates' own code (named ``ours...`` or ``batchmates...``)."""
    return impl.startswith(("ours", "batchmates"))


def rows_to_markdown(rows: list[BenchRow], hardware: str) -> str:
    """A Markdown table; ``peer ÷ ours`` is each row's time over batchmates' best time in the same case
    (above 1: ours is that many times faster)."""
    best: dict[tuple[str, str], float] = {}
    for r in rows:
        if is_ours(r.impl) and r.time_ms == r.time_ms:  # skip NaN (failed/skipped)
            key = (r.benchmark, r.case)
            best[key] = min(best.get(key, float("inf")), r.time_ms)
    lines = [
        f"Hardware: {hardware}",
        "",
        "| benchmark | case | impl | time (ms) | peak mem (MiB) | time ÷ ours |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        mem = "—" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}"
        t = "failed/skipped" if r.time_ms != r.time_ms else f"{r.time_ms:.2f}"
        ours = best.get((r.benchmark, r.case))
        ratio = "—" if ours is None or r.time_ms != r.time_ms or ours <= 0 else f"{r.time_ms / ours:.2f}×"
        note = ""
        if r.extra and ("skipped" in r.extra or "error" in r.extra):
            note = f" ({r.extra.get('skipped') or r.extra.get('error')})"
        lines.append(f"| {r.benchmark} | {r.case} | {r.impl}{note} | {t} | {mem} | {ratio} |")
    return "\n".join(lines) + "\n"
