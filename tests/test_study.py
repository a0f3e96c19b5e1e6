"""batchmates study: statistics against scipy, verdict rules, study files, skip / resume / regenerate-only."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from scipy import stats

from batchmates.config import ConfigError
from batchmates.training.study_stats import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    combine,
    paired_comparison,
    t_interval,
    verdict,
)

torch.set_num_threads(1)

A = [0.912, 0.905, 0.917, 0.909, 0.914]
B = [0.903, 0.901, 0.906, 0.904, 0.902]


def test_t_interval_against_scipy_and_by_hand():
    s = t_interval(A)
    lo, hi = stats.t.interval(0.95, len(A) - 1, loc=sum(A) / len(A), scale=stats.sem(A))
    assert s["n"] == 5 and s["lo"] == pytest.approx(lo, abs=1e-12) and s["hi"] == pytest.approx(hi, abs=1e-12)
    # by hand: 1..5 has mean 3, s = sqrt(2.5), t(0.975, 4) = 2.7764451
    h = t_interval([1, 2, 3, 4, 5])
    assert h["mean"] == 3 and h["half"] == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5), rel=1e-7)
    one = t_interval([0.5])
    assert one["n"] == 1 and one["mean"] == 0.5 and math.isnan(one["lo"])
    assert t_interval([None, float("nan")])["n"] == 0


def test_paired_comparison_against_scipy():
    a = dict(enumerate(A))
    b = dict(enumerate(B))
    b[7] = 0.5  # a seed the variant does not have: not paired
    r = paired_comparison(a, b)
    assert r["seeds"] == [0, 1, 2, 3, 4]
    d = [x - y for x, y in zip(A, B)]
    lo, hi = stats.t.interval(0.95, 4, loc=sum(d) / 5, scale=stats.sem(d))
    assert r["diff"]["lo"] == pytest.approx(lo, abs=1e-12) and r["diff"]["hi"] == pytest.approx(hi, abs=1e-12)
    t = stats.ttest_rel(A, B)
    assert r["t_test"]["p"] == pytest.approx(t.pvalue, rel=1e-12)
    assert r["t_test"]["statistic"] == pytest.approx(t.statistic, rel=1e-12)
    assert r["wilcoxon"]["p"] == pytest.approx(stats.wilcoxon(A, B).pvalue, rel=1e-12)
    # the interval excludes 0 exactly when the two-sided paired t-test rejects at 5%
    assert (r["diff"]["lo"] > 0) == (r["t_test"]["p"] < 0.05)
    same = paired_comparison({0: 0.9, 1: 0.8}, {0: 0.9, 1: 0.8})
    assert same["diff"]["mean"] == 0 and math.isnan(same["t_test"]["p"])


@pytest.mark.parametrize("lo,hi,relation,margin,expected", [
    (0.001, 0.01, ">", None, REPRODUCED),
    (-0.01, 0.01, ">", None, INCONCLUSIVE),
    (-0.02, -0.001, ">", None, NOT_REPRODUCED),
    (-0.002, 0.003, ">", 0.005, NOT_REPRODUCED),     # the gain, if any, is below the margin
    (-0.002, 0.008, ">", 0.005, INCONCLUSIVE),
    (-0.004, 0.003, ">=", None, REPRODUCED),          # within the default 0.5 pp non-inferiority margin
    (0.001, 0.004, ">=", None, REPRODUCED),
    (-0.004, -0.001, ">=", None, NOT_REPRODUCED),     # significantly worse, however little
    (-0.008, 0.002, ">=", None, INCONCLUSIVE),
    (-0.008, 0.002, ">=", 0.01, REPRODUCED),
])
def test_verdict_rules(lo, hi, relation, margin, expected):
    got, reason = verdict({"n": 5, "mean": (lo + hi) / 2, "lo": lo, "hi": hi}, relation, margin)
    assert got == expected, reason


def test_verdict_edge_cases_and_combine():
    assert verdict({"n": 1, "mean": 0.1, "lo": math.nan, "hi": math.nan}, ">")[0] == INCONCLUSIVE
    with pytest.raises(ValueError, match="relation"):
        verdict({"n": 5, "lo": 0, "hi": 1}, "<")
    with pytest.raises(ValueError, match="margin"):
        verdict({"n": 5, "lo": 0, "hi": 1}, ">", -0.1)
    assert combine([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert combine([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE]) == NOT_REPRODUCED
    assert combine([]) == INCONCLUSIVE


def test_metric_value_reads_metrics_json():
    from batchmates.training.study import metric_value

    m = {"test_acc": 0.9, "eval": {"knn": {"k20": 0.8, "k200": 0.7}, "linear": {"top1": 0.85},
                                   "corruptions": {"noise": {"1": 0.6, "3": 0.4}, "blur": {"1": 0.8, "3": 0.2},
                                                   "mean": 0.5}}}
    assert metric_value(m, "accuracy") == 0.9 and metric_value(m, "knn20") == 0.8
    assert metric_value(m, "linear") == 0.85 and metric_value(m, "corruptions") == 0.5
    assert metric_value(m, "corruption@3") == pytest.approx(0.3) and metric_value(m, "corruption@5") is None


STUDY = """
title: tiny digits study
seeds: 2
settings: {data: digits, epochs: 1, max_steps: 5, batch_size: 32, eval_protocols: [accuracy],
           checkpoint_every_n_steps: 0}
variants:
  base/ce: {method: ce}
  attn/ce+se: {method: ce, attn_layer: se}
  noise/ce@0.4: {method: ce, label_noise: 0.4}
claims:
  se:
    claim: SE beats no attention
    source: Hu et al. 2018
    compare: ["attn/ce+se > base/ce"]
  noise:
    claim: clean labels are at least as good as 40% noise
    metrics: [accuracy]
    compare: [{variant: base/ce, baseline: noise/ce@0.4, relation: ">="}]
plots:
  label_noise: {CE: [base/ce, noise/ce@0.4]}
"""


def _write(tmp_path, text=STUDY):
    p = tmp_path / "study.yaml"
    p.write_text(text)
    return str(p)


def test_load_study_and_its_errors(tmp_path):
    from batchmates.training.study import load_study

    s = load_study(_write(tmp_path))
    assert [v.name for v in s.variants] == ["base/ce", "attn/ce+se", "noise/ce@0.4"] and s.seeds == [0, 1]
    assert [(c.variant, c.relation, c.baseline, c.metric) for c in s.claims[0].comparisons] == [
        ("attn/ce+se", ">", "base/ce", "accuracy")]
    bad = [("attn/ce+se > base/ce", "attn/ce+se > nope", "'nope' is not a variant"),
           ("attn/ce+se > base/ce", "attn/ce+se < base/ce", "must read"),
           ("metrics: [accuracy]", "metrics: [top5]", "unknown metric 'top5'"),
           ("plots:", "plots:\n  bars: {}\n  other:", "unknown plot 'bars'")]
    for old, new, match in bad:
        with pytest.raises(ConfigError, match=match):
            load_study(_write(tmp_path, STUDY.replace(old, new)))
    with pytest.raises(ConfigError, match="claims"):
        load_study(_write(tmp_path, STUDY.split("claims:")[0]))


def _read(out):
    return {n: open(os.path.join(out, n), "rb").read() for n in ("results.md", "results.json")}


@pytest.mark.slow
def test_study_runs_skips_resumes_and_regenerates_the_same_report(tmp_path):
    from batchmates.training.study import run_study

    path, out = _write(tmp_path), str(tmp_path / "out")
    logs: list[str] = []
    res = run_study(path, out, overrides={"threads": 1, "progress": False}, verbose=False, log=logs.append)
    assert res["runs_finished"] == 6 and not res["missing"]
    assert sum("trained" in s for s in logs) == 6
    assert {c["id"]: c["verdict"] for c in res["claims"]}.keys() == {"se", "noise"}
    for c in res["claims"]:
        for x in c["comparisons"]:
            assert x["seeds"] == [0, 1] and x["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)
            va = [res["variants"][x["variant"]]["runs"][str(s)]["accuracy"] for s in (0, 1)]
            vb = [res["variants"][x["baseline"]]["runs"][str(s)]["accuracy"] for s in (0, 1)]
            assert x["diff"]["mean"] == pytest.approx(sum(a - b for a, b in zip(va, vb)) / 2)
    for f in ("results.md", "results.json", "accuracy.png", "label_noise.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    md = open(os.path.join(out, "results.md")).read()
    assert "| SE beats no attention | **" in md and "Runs not finished" not in md
    first = _read(out)

    # a finished directory: nothing runs, the same tables come out
    logs.clear()
    run_study(path, out, overrides={"threads": 1, "progress": False}, verbose=False, log=logs.append)
    assert not any("trained" in s or "resumed" in s for s in logs) and _read(out) == first

    # an interrupted run (checkpoint, no finished metrics) resumes; a missing one is retrained
    os.remove(os.path.join(out, "attn", "ce+se", "seed1", "metrics.json"))
    shutil.rmtree(os.path.join(out, "base", "ce", "seed0"))
    partial = run_study(path, out, verbose=False, report_only=True, log=logs.append)
    assert partial["runs_finished"] == 4 and len(partial["missing"]) == 2
    assert "Runs not finished yet (2)" in open(os.path.join(out, "results.md")).read()
    logs.clear()
    run_study(path, out, overrides={"threads": 1, "progress": False}, verbose=False, log=logs.append)
    assert sorted(s.split(": ", 1)[1] for s in logs if s.startswith("[study] ") and "seed" in s) == [
        "resumed", "trained"]
    again = json.loads(_read(out)["results.json"])
    assert again["runs_finished"] == 6
    assert again["variants"]["attn/ce+se"]["runs"]["0"] == json.loads(first["results.json"])["variants"][
        "attn/ce+se"]["runs"]["0"]


def test_cli_study_report_only_trains_nothing(tmp_path, capsys):
    from batchmates.cli import main

    out = tmp_path / "out"
    assert main(["study", _write(tmp_path), "--out", str(out), "--dry-run", "--threads", "1"]) == 0
    assert "dry run: 6 runs planned, 6 to train" in capsys.readouterr().out and not out.exists()
    assert main(["study", _write(tmp_path), "--out", str(out), "--report", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "0 of 6 runs finished" in printed and printed.count("inconclusive") == 2
    assert not any(out.glob("*/*/seed*/config.yaml"))  # no run was started
    assert "Runs not finished yet (6)" in (out / "results.md").read_text()
    assert main(["study", _write(tmp_path), "--out", str(out), "--jobs", "0"]) == 2


def test_only_selects_claims_and_variant_globs(tmp_path, capsys):
    from batchmates.cli import main
    from batchmates.training.study import load_study, select_variants

    s = load_study(_write(tmp_path))
    assert select_variants(s, ["se"]) == {"attn/ce+se", "base/ce"}
    assert select_variants(s, ["noise/*"]) == {"noise/ce@0.4"}
    assert select_variants(s, ["se", "noise"]) == {"attn/ce+se", "base/ce", "noise/ce@0.4"}
    with pytest.raises(ConfigError, match="'sup/\\*' names no claim and matches no variant"):
        select_variants(s, ["sup/*"])
    out = tmp_path / "out"
    assert main(["study", _write(tmp_path), "--out", str(out), "--dry-run", "--only", "noise/*", "--threads",
                 "1"]) == 0
    assert "dry run: 2 runs planned, 2 to train" in capsys.readouterr().out
    assert main(["study", _write(tmp_path), "--out", str(out), "--only", "typo", "--threads", "1"]) == 2
    assert "names no claim" in capsys.readouterr().err and not out.exists()


def test_extends_and_variant_settings(tmp_path):
    from batchmates.training.study import load_study

    _write(tmp_path)
    (tmp_path / "big.yaml").write_text(
        "extends: study.yaml\ntitle: bigger\nseeds: 3\nsettings: {epochs: 4, backbone: resnet-small}\n"
        "variant_settings:\n  'noise/*': {epochs: 7, batch_size: '64'}\n  'attn/*': {options: {reduction: 8}}\n")
    s = load_study(str(tmp_path / "big.yaml"))
    assert s.title == "bigger" and s.seeds == [0, 1, 2] and len(s.claims) == 2
    assert s.settings == {"data": "digits", "epochs": 4, "max_steps": 5, "batch_size": 32,
                          "eval_protocols": ["accuracy"], "checkpoint_every_n_steps": 0, "backbone": "resnet-small"}
    v = {x.name: x for x in s.variants}
    assert v["noise/ce@0.4"].settings == {"label_noise": 0.4, "epochs": 7, "batch_size": 64}
    assert v["attn/ce+se"].options == {"reduction": 8} and v["base/ce"].settings == {}
    (tmp_path / "bad.yaml").write_text("extends: study.yaml\nvariant_settings: {'nope/*': {epochs: 2}}\n")
    with pytest.raises(ConfigError, match="match no variant"):
        load_study(str(tmp_path / "bad.yaml"))
