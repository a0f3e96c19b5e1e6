"""Shared timing and memory measurement for the benchmarks, and the row format they all emit."""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
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

    On CUDA the peak is ``torch.cuda.max_memory_allocated`` above the memory held before the call. On CPU it is
    measured by tracing the allocator when available, else None (CPU peak memory is not reliably attributable).
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
    else:
        peak = _cpu_peak_mb(fn)
    return statistics.median(times), peak


def _cpu_peak_mb(fn: Callable[[], Any]) -> float | None:
    """Peak extra memory of one call on CPU via the PyTorch profiler's memory accounting."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        # Running sum of allocation deltas in event order gives the peak of live tensor memory.
        events = sorted(
            (e for e in prof.events() if getattr(e, "cpu_memory_usage", 0)), key=lambda e: e.time_range.start
        )
        cur = peak = 0
        for e in events:
            cur += e.cpu_memory_usage
            peak = max(peak, cur)
        return peak / 2**20
    except Exception:  # noqa: BLE001 - memory accounting is best-effort on CPU
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json_atomic(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rows_to_markdown(rows: list[BenchRow], hardware: str) -> str:
    """A Markdown table with speed-ups of ours vs each peer per case."""
    lines = [f"Hardware: {hardware}", "", "| benchmark | case | impl | time (ms) | peak mem (MiB) |", "|---|---|---|---:|---:|"]
    for r in rows:
        mem = "—" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}"
        lines.append(f"| {r.benchmark} | {r.case} | {r.impl} | {r.time_ms:.2f} | {mem} |")
    return "\n".join(lines) + "\n"
