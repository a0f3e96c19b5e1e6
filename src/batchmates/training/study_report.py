"""The report of a study: ``results.json`` (runs, per-variant intervals, per-claim comparisons and verdicts),
``results.md`` (generated tables) and plots (accuracy with intervals, accuracy against corruption severity and
against label noise).

Everything is computed from the runs' own ``metrics.json`` files, so regenerating the report of a finished study
gives byte-identical files (nothing here reads a clock).

Paper: none (library infrastructure).

Library choices: percentages with two decimals; a variant's interval is the 95% t-interval over its finished
seeds; comparisons use the seeds both variants finished (:mod:`batchmates.training.study_stats`).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from batchmates.io import atomic_write_json, atomic_write_text
from batchmates.training.compare import COLUMNS
from batchmates.training.rundir import read_metrics
from batchmates.training.study_stats import DEFAULT_MARGIN, combine, paired_comparison, t_interval, verdict

__all__ = ["write_report", "collect", "results_markdown", "metric_value", "metric_title", "METRICS"]

#: Metric names a comparison may use (besides ``corruption@S``), and their titles.
METRICS: dict[str, str] = {k: COLUMNS[k][0] for k in ("accuracy", "linear", "knn20", "knn200", "corruptions")}
_CORR = re.compile(r"corruption@([1-5])")


def metric_title(metric: str) -> str:
    m = _CORR.fullmatch(metric)
    return f"corrupted, severity {m.group(1)}" if m else METRICS.get(metric, metric)


def metric_value(metrics: dict[str, Any], metric: str) -> float | None:
    """The value of ``metric`` in a run's ``metrics.json`` (None when the run has no such figure)."""
    m = _CORR.fullmatch(metric)
    if m:
        corr = (metrics.get("eval") or {}).get("corruptions") or {}
        vals = [v[m.group(1)] for k, v in corr.items() if isinstance(v, dict) and m.group(1) in v]
        return sum(vals) / len(vals) if vals else None
    v = COLUMNS[metric][1](metrics)
    return None if v is None else float(v)

_ALL_METRICS = ("accuracy", "linear", "knn20", "knn200", "corruptions",
                *(f"corruption@{s}" for s in range(1, 6)))


def collect(study: Any, plans: list[Any], out: str, failed: dict[str, str] | None = None) -> dict[str, Any]:
    """The content of ``results.json``: per variant its runs and intervals, per claim its comparisons."""
    from batchmates.training.variants import variant_dir

    failed = failed or {}
    variants: dict[str, Any] = {}
    values: dict[str, dict[str, dict[int, float | None]]] = {}
    missing = []
    for p in plans:
        v = variants.setdefault(p.variant.name, {
            **p.variant.describe(), "dir": variant_dir(p.variant.name),
            "budget": {k: getattr(p.cfg, k) for k in ("backbone", "attn_layer", "epochs", "max_steps", "batch_size",
                                                      "lr", "optimizer", "label_noise", "precision")},
            "runs": {}, "stats": {}})
        m = read_metrics(p.cfg.out) or {}
        rel = os.path.relpath(p.cfg.out, out)
        if not m.get("finished"):
            missing.append(f"{p.variant.name} seed {p.seed}" + (f" ({failed[p.cfg.out]})" if p.cfg.out in failed
                                                                 else ""))
            continue
        run = {"dir": rel, "train_time_s": m.get("train_time_s"), "wall_time_s": m.get("wall_time_s"),
               "hardware": m.get("hardware")}
        for metric in _ALL_METRICS:
            val = metric_value(m, metric)
            if val is not None:
                run[metric] = val
                values.setdefault(p.variant.name, {}).setdefault(metric, {})[p.seed] = val
        v["runs"][str(p.seed)] = run
    for name, per_metric in values.items():
        variants[name]["stats"] = {k: t_interval(list(s.values())) for k, s in per_metric.items()}
        times = [r["train_time_s"] for r in variants[name]["runs"].values() if r.get("train_time_s") is not None]
        variants[name]["stats"]["train_time_s"] = t_interval(times)
    claims = []
    for c in study.claims:
        comps = []
        for cmp in c.comparisons:
            a = values.get(cmp.variant, {}).get(cmp.metric, {})
            b = values.get(cmp.baseline, {}).get(cmp.metric, {})
            stats = paired_comparison(a, b)
            margin = DEFAULT_MARGIN[cmp.relation] if cmp.margin is None else cmp.margin
            verdict_, reason = verdict(stats["diff"], cmp.relation, margin)
            comps.append({"variant": cmp.variant, "baseline": cmp.baseline, "metric": cmp.metric,
                          "metric_title": metric_title(cmp.metric), "relation": cmp.relation, "margin": margin,
                          "variant_stats": t_interval(list(a.values())), "baseline_stats": t_interval(list(b.values())),
                          **stats, "verdict": verdict_, "reason": reason})
        claims.append({"id": c.id, "claim": c.claim, "source": c.source, "note": c.note,
                       "verdict": combine([x["verdict"] for x in comps]), "comparisons": comps})
    hardware = sorted({r["hardware"] for v in variants.values() for r in v["runs"].values() if r.get("hardware")})
    return {"title": study.title, "file": os.path.basename(study.path),
            "seeds": sorted({p.seed for p in plans}), "settings": study.settings,
            "runs_planned": len(plans), "runs_finished": len(plans) - len(missing), "missing": missing,
            "hardware": hardware, "variants": variants, "claims": claims}


def _pct(s: dict[str, float] | None) -> str:
    if not s or not s.get("n"):
        return "—"
    if s["n"] < 2 or not math.isfinite(s.get("half", math.nan)):
        return f"{100 * s['mean']:.2f} (n=1)"
    return f"{100 * s['mean']:.2f} ± {100 * s['half']:.2f}"


def _diff(d: dict[str, float]) -> str:
    if not d.get("n"):
        return "—"
    if d["n"] < 2:
        return f"{100 * d['mean']:+.2f} (n=1)"
    return f"{100 * d['mean']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"


def _p(t: dict[str, float]) -> str:
    return "—" if not math.isfinite(t.get("p", math.nan)) else f"{t['p']:.3g}"


def _budget(b: dict[str, Any]) -> str:
    text = f"{b['backbone']}, {b['epochs']} ep, bs {b['batch_size']}, {b['optimizer']} lr {b['lr']:g}"
    if (b.get("max_steps") or -1) > 0:
        text += f", max {b['max_steps']} steps"
    if b.get("attn_layer") not in (None, "none"):
        text += f", attn {b['attn_layer']}"
    if b.get("label_noise"):
        text += f", noise {b['label_noise']:.0%}"
    return text + f", {b['precision']}"


RULES = """Verdict rules (per comparison; d = variant − baseline on the same seed, CI = 95% t-interval of the mean d;
margins are in percentage points):

* `>` (the variant is better): **reproduced** if CI > 0; **not reproduced** if the CI's upper end is below the
  margin (default 0: the CI excludes 0 in the wrong direction); **inconclusive** otherwise.
* `>=` (at least as good; non-inferiority): **not reproduced** if the CI is entirely below 0 (significantly
  worse); **reproduced** if the CI's lower end is above −margin (default margin 0.5 pp); **inconclusive**
  otherwise.
* A claim of several comparisons is reproduced if every comparison is, not reproduced if any is, else
  inconclusive. Fewer than 2 paired seeds: inconclusive.

The paired t-test (`scipy.stats.ttest_rel`) and Wilcoxon signed-rank test (`scipy.stats.wilcoxon`) p-values are
two-sided and reported beside the interval; with 5 seeds the Wilcoxon p cannot go below 0.0625."""


def results_markdown(res: dict[str, Any]) -> str:
    lines = [f"# Study: {res['title']}", "",
             f"Generated by `batchmates study` from `{res['file']}` and the runs' `metrics.json`; "
             f"{res['runs_finished']} of {res['runs_planned']} runs finished (seeds {res['seeds']}). "
             "Accuracies in %, mean ± half-width of the 95% t-interval over seeds; differences in percentage points "
             "with their 95% CI.", "", "## Verdicts", "", "| claim | verdict | evidence |", "|---|---|---|"]
    for c in res["claims"]:
        ev = "; ".join(f"{x['variant']} {x['relation']} {x['baseline']} ({x['metric']}): {_diff(x['diff'])}"
                       for x in c["comparisons"][:4])
        if len(c["comparisons"]) > 4:
            ev += f"; … ({len(c['comparisons'])} comparisons)"
        lines.append(f"| {c['claim']} | **{c['verdict']}** | {ev} |")
    for c in res["claims"]:
        lines += ["", f"### {c['claim']}", ""]
        if c["source"]:
            lines += [f"Source: {c['source']}.", ""]
        lines += ["| variant | baseline | metric | variant | baseline | difference [95% CI] | t-test p | Wilcoxon p "
                  "| n | verdict |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for x in c["comparisons"]:
            lines.append(f"| {x['variant']} {x['relation']} | {x['baseline']} | {x['metric_title']} | "
                         f"{_pct(x['variant_stats'])} | {_pct(x['baseline_stats'])} | {_diff(x['diff'])} | "
                         f"{_p(x['t_test'])} | {_p(x['wilcoxon'])} | {len(x['seeds'])} | {x['verdict']}: "
                         f"{x['reason']} |")
        if c["note"]:
            lines += ["", c["note"].strip()]
    cols = [k for k in _ALL_METRICS if any(k in v["stats"] for v in res["variants"].values())
            and not k.startswith("corruption@")]
    lines += ["", "## Variants", "", "| variant | " + " | ".join(metric_title(k) for k in cols)
              + " | train s | seeds | budget |", "|---|" + "---:|" * (len(cols) + 2) + "---|"]
    for name, v in res["variants"].items():
        t = v["stats"].get("train_time_s")
        tt = "—" if not t or not t.get("n") else f"{t['mean']:.0f}"
        lines.append(f"| {name} | " + " | ".join(_pct(v["stats"].get(k)) for k in cols)
                     + f" | {tt} | {len(v['runs'])} | {_budget(v['budget'])} |")
    lines += ["", "Plots: `accuracy.png` (each variant's mean with its 95% interval)"
              + (", `corruption.png` (accuracy against corruption severity)" if res.get("has_corruption_plot") else "")
              + (", `label_noise.png` (accuracy against label noise)" if res.get("has_noise_plot") else "") + ".",
              "", f"Hardware: {', '.join(res['hardware']) or '—'}.", "", RULES]
    if res["missing"]:
        lines += ["", f"Runs not finished yet ({len(res['missing'])}):", *[f"- {m}" for m in res["missing"]]]
    return "\n".join(lines) + "\n"


def write_report(study: Any, plans: list[Any], out: str, failed: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``results.json``, ``results.md`` and the plots of the study into ``out``; return the results."""
    from batchmates.training.study_plots import plot_study

    res = collect(study, plans, out, failed)
    res.update(plot_study(res, study.plots, out))
    atomic_write_json(os.path.join(out, "results.json"), res)
    atomic_write_text(os.path.join(out, "results.md"), results_markdown(res))
    return res
