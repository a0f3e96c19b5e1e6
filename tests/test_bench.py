"""batchmates.bench.runner (group table, JSON files, Markdown sections) and the module benchmarks' smoke runs."""

from __future__ import annotations

import importlib
import json
import math
import sys
import types

import pytest
import torch

from batchmates.bench.common import BenchRow
from batchmates.bench.runner import BENCH_GROUPS, run_benchmarks, update_benchmarks_doc

torch.set_num_threads(1)


def test_every_group_member_is_a_benchmark_module():
    for group, names in BENCH_GROUPS.items():
        for name in names:
            module = importlib.import_module(f"batchmates.bench.{name}")
            assert callable(getattr(module, "run", None)), f"{group}/{name} has no run(device, quick)"


def test_doc_writer_replaces_only_its_own_section(tmp_path):
    doc = tmp_path / "bench.md"
    update_benchmarks_doc(str(doc), "losses (cpu)", "first losses body")
    update_benchmarks_doc(str(doc), "modules (cpu)", "modules body")
    update_benchmarks_doc(str(doc), "losses (cpu)", "second losses body")
    text = doc.read_text()
    assert text.startswith("# Benchmarks")
    assert "second losses body" in text and "first losses body" not in text and "modules body" in text
    assert text.count("<!-- bench:losses (cpu) -->") == 1 and text.count("## modules (cpu)") == 1
    # the rerun section keeps its place (before the modules section)
    assert text.index("second losses body") < text.index("modules body")


def _fake_module(monkeypatch, name: str, run) -> None:
    module = types.ModuleType(f"batchmates.bench.{name}")
    module.run = run
    monkeypatch.setitem(sys.modules, f"batchmates.bench.{name}", module)


def test_runner_reports_a_failing_benchmark_and_keeps_the_others(monkeypatch, tmp_path):
    def ok(device, quick):
        return [BenchRow("fake", "case", impl, t, None, device) for impl, t in (("ours", 2.0), ("peer", 6.0))]

    def bad(device, quick):
        raise RuntimeError("boom")

    _fake_module(monkeypatch, "fake_ok", ok)
    _fake_module(monkeypatch, "fake_bad", bad)
    monkeypatch.setitem(BENCH_GROUPS, "fakes", ("fake_bad", "fake_ok"))
    doc, out = tmp_path / "doc.md", tmp_path / "out"
    status = run_benchmarks("fakes", quick=True, out=str(out), doc=str(doc), log=lambda _: None)
    assert status == 1
    payload = json.loads((out / "fakes-cpu-quick.json").read_text())
    assert [r["impl"] for r in payload["rows"]] == ["ours", "peer"] and payload["quick"] is True
    assert len(payload["notes"]) == 1 and "fake_bad: failed: RuntimeError: boom" in payload["notes"][0]
    text = doc.read_text()
    assert "## fakes (cpu, quick)" in text and "| 3.00× |" in text and "boom" in text


def test_runner_rejects_unknown_group_and_missing_cuda(tmp_path):
    with pytest.raises(ValueError, match="choose one of"):
        run_benchmarks("nope", out=str(tmp_path), doc=str(tmp_path / "d.md"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            run_benchmarks("losses", device="cuda", out=str(tmp_path), doc=str(tmp_path / "d.md"))


def test_module_benchmarks_quick_run():
    from batchmates.bench import batch_attention, batch_transformer

    rows = batch_attention.run("cpu", quick=True) + batch_transformer.run("cpu", quick=True)
    assert {r.benchmark for r in rows} == {"resnet-block", "vit-block", "eiba-memory", "token-attention",
                                           "batch-transformer-head"}
    attn = [r for r in rows if r.benchmark == "token-attention"]
    want = {(p, i) for p in ("fp32", "bf16") for i in ("fused", "batchmates")}
    assert {(r.case.split()[-1], r.impl) for r in attn} == want
    assert all(math.isfinite(r.time_ms) and r.time_ms > 0 for r in rows)
    ba2m = [r for r in rows if r.benchmark == "resnet-block" and r.impl == "ba2m"]
    assert ba2m and ba2m[0].extra["attn_params"] > 0
