"""batchmates bench train: the trainer's step against a bare loop in one process (quick smoke run)."""

from __future__ import annotations

import math

import pytest
import torch

torch.set_num_threads(1)


@pytest.mark.slow
def test_bench_train_quick_reports_overhead_and_speedups(capsys):
    from batchmates.bench.runner import BENCH_GROUPS
    from batchmates.bench.train import TARGET_OVERHEAD, run

    assert BENCH_GROUPS["train"] == ("train",)
    rows = run("cpu", True)
    by = {r.impl: r for r in rows}
    lit = by["batchmates train (Lightning + callbacks)"]
    bare = by["bare torch loop (same aug, precision, optimiser)"]
    assert lit.case == bare.case and lit.case.startswith("ce cnn digits b32")
    assert lit.time_ms > 0 and bare.time_ms > 0 and lit.extra["blocks"] >= 1
    assert lit.extra["overhead_vs_bare"] == pytest.approx(lit.time_ms / bare.time_ms - 1)
    assert lit.extra["img_per_s"] == pytest.approx(32 / lit.time_ms * 1e3)
    for impl in ("per-step reseeding (seed_step)", "Method.log_train per step",
                 "trainer callbacks' batch hooks per step"):
        r = by[impl]
        assert r.time_ms >= 0 and r.extra["share_of_lightning_step"] == pytest.approx(r.time_ms / lit.time_ms)
    k = by["step with kornia RandomCrop+RandomHorizontalFlip"]
    t = by["step with plain-torch crop+flip (PadCropFlip)"]
    assert k.extra["slowdown_vs_torch"] == pytest.approx(k.time_ms / t.time_ms - 1)
    assert 0 < t.extra["augment_ms"] < t.time_ms
    bf16 = [r for r in rows if r.case.endswith("precision")]
    assert bf16 and all(math.isnan(r.time_ms) or r.time_ms > 0 for r in bf16)
    assert "compile" not in {r.case.rsplit(": ", 1)[-1] for r in rows}  # not in quick runs
    printed = capsys.readouterr().out
    assert f"the {TARGET_OVERHEAD:.0%} target" in printed and f"{lit.extra['overhead_vs_bare']:+.1%}" in printed
    from batchmates.bench.runner import _summaries

    assert _summaries("train", rows).startswith("- framework overhead (ce cnn digits b32")
