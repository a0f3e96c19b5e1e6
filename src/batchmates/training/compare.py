"""``compare``: train several methods x seeds on one dataset and tabulate mean ± std per evaluation protocol.

Each run lives in ``OUT/<method>/seed<k>``; runs already finished are skipped and interrupted ones resumed, so
an interrupted compare picks up where it stopped. Writes ``OUT/results.md``, ``OUT/results.json`` and
``OUT/accuracy.png`` (atomically) and prints the table. Library design; no paper involved.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import traceback
from collections.abc import Sequence
from typing import Any

from batchmates.training.config import PROTOCOLS, ConfigError, RunConfig
from batchmates.training.io import atomic_write_json, atomic_write_text, read_json

__all__ = ["compare", "resolve_methods", "summarise"]

# Column key -> (title, how to read it from a run's metrics.json)
COLUMNS: dict[str, tuple[str, Any]] = {
    "accuracy": ("top-1", lambda m: m.get("test_acc")),
    "knn20": ("kNN k=20", lambda m: m.get("eval", {}).get("knn", {}).get("k20")),
    "knn200": ("kNN k=200", lambda m: m.get("eval", {}).get("knn", {}).get("k200")),
    "linear": ("linear probe", lambda m: m.get("eval", {}).get("linear", {}).get("top1")),
    "corruptions": ("corrupted (mean)", lambda m: m.get("eval", {}).get("corruptions", {}).get("mean")),
}


def resolve_methods(methods: str | Sequence[str], data: str) -> list[str]:
    """``"all"`` -> every registered method supporting ``data``; ``"ce,supcon"`` or a list -> validated names."""
    from batchmates.methods import available_methods, get_method, methods_for_dataset

    if isinstance(methods, str):
        names = [m.strip() for m in methods.split(",") if m.strip()]
    else:
        names = list(methods)
    if not names:
        raise ConfigError("methods is empty: pass --methods all or a comma-separated list such as ce,supcon")
    if names == ["all"]:
        names = methods_for_dataset(data)
        if not names:
            raise ConfigError(f"no registered method supports data={data!r}; registered: {available_methods()}")
        return names
    out = []
    for n in names:
        cls = get_method(n)  # UnknownMethodError lists the choices
        if not cls.supports(data):
            raise ConfigError(f"method {n!r} does not support data={data!r}")
        if n not in out:
            out.append(n)
    return out


def _mean_std(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {column: {"mean", "std", "n"}}}`` over the finished runs (columns that have values only)."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r.get("status") == "done":
            by_method.setdefault(r["method"], []).append(r["metrics"])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for m, ms in by_method.items():
        cols = {}
        for key, (_, get) in COLUMNS.items():
            vals = [get(x) for x in ms]
            if any(v is not None for v in vals):
                cols[key] = _mean_std([float(v) for v in vals if v is not None])
        cols["train_time_s"] = _mean_std([float(x.get("train_time_s", math.nan)) for x in ms])
        out[m] = cols
    return out


def _fmt(s: dict[str, float] | None, pct: bool = True) -> str:
    if not s or s["n"] == 0:
        return "—"
    if pct:
        return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
    return f"{s['mean']:.1f} ± {s['std']:.1f}"


def compare(
    methods: str | Sequence[str],
    data: str,
    seeds: int | Sequence[int],
    out: str,
    common_cfg: RunConfig | None = None,
    *,
    protocols: Sequence[str] = PROTOCOLS,
    label_noise: float = 0.0,
    corruptions: bool = False,
    method_options: dict[str, dict[str, Any]] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train every method x seed into ``out/<method>/seed<k>`` and write the comparison; return results.json.

    ``seeds``: a count N (seeds 0..N-1) or explicit seeds. ``common_cfg`` carries the shared settings (epochs,
    batch size, backbone, ... left ``None`` take each method's own defaults for ``data``). ``method_options``:
    per-method ``--opt`` values, ``{"supcon": {"temperature": "0.1"}}``. A failing run is recorded (and the
    others continue); ``results.json["failed"]`` lists failures.
    """
    from batchmates.training.evaluate import evaluate
    from batchmates.training.run import METRICS_FILE, hardware_string, resume, train

    names = resolve_methods(methods, data)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list or any((not isinstance(s, int)) or s < 0 for s in seed_list):
        raise ConfigError(f"seeds must be a count >= 1 or a list of integers >= 0, got {seeds!r}")
    base = common_cfg or RunConfig()
    method_options = method_options or {}
    unknown = sorted(set(method_options) - set(names))
    if unknown:
        raise ConfigError(f"options given for method(s) {unknown} that are not compared ({names})")
    # Validate every configuration before training anything.
    plans = []
    from batchmates.methods import get_method

    for name in names:
        for seed in seed_list:
            cfg = base.replace(method=name, data=data, seed=seed, out=os.path.join(out, name, f"seed{seed}"),
                               label_noise=label_noise, eval_protocols=list(protocols),
                               options=dict(method_options.get(name, {})))
            plans.append(cfg.resolve(get_method(name)))
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for cfg in plans:
        run_dir = cfg.out
        prev = read_json(os.path.join(run_dir, METRICS_FILE), None)
        status = "done"
        try:
            if prev and prev.get("finished"):
                metrics = prev
                action = "skipped (already finished)"
            elif os.path.exists(os.path.join(run_dir, "last.ckpt")):
                metrics = resume(run_dir, verbose=verbose)
                action = "resumed"
            else:
                metrics = train(cfg, verbose=verbose, overwrite=True)
                action = "trained"
            if corruptions and "corruptions" not in metrics.get("eval", {}):
                evaluate(run_dir, ["accuracy"], corruptions=True)
                metrics = read_json(os.path.join(run_dir, METRICS_FILE), metrics)
        except Exception as e:  # noqa: BLE001 - one broken method must not lose the others' results
            status, metrics, action = "failed", {}, f"failed: {type(e).__name__}: {e}"
            if verbose:
                traceback.print_exc()
        if verbose:
            print(f"[compare] {cfg.method} seed {cfg.seed}: {action}", flush=True)
        runs.append({"method": cfg.method, "seed": cfg.seed, "dir": run_dir, "status": status, "action": action,
                     "metrics": metrics})
    summary = summarise(runs)
    budget = {c.method: {"backbone": c.backbone, "epochs": c.epochs, "batch_size": c.batch_size, "lr": c.lr,
                         "optimizer": c.optimizer, "attn_layer": c.attn_layer, "precision": c.precision}
              for c in plans}
    hw = next((r["metrics"].get("hardware") for r in runs if r["status"] == "done"), hardware_string())
    results = {
        "data": data,
        "methods": names,
        "seeds": seed_list,
        "protocols": list(protocols),
        "label_noise": label_noise,
        "hardware": hw,
        "budget": budget,
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "metrics"}
                 | {"test_acc": r["metrics"].get("test_acc"), "eval": r["metrics"].get("eval")} for r in runs],
        "failed": [f"{r['method']} seed {r['seed']}: {r['action']}" for r in runs if r["status"] != "done"],
        "compare_wall_s": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(os.path.join(out, "results.json"), results)
    atomic_write_text(os.path.join(out, "results.md"), results_markdown(results))
    if summary:
        from batchmates.training.plots import plot_accuracy_bars

        bars = {m: {COLUMNS[k][0]: v for k, v in cols.items() if k in COLUMNS} for m, cols in summary.items()}
        plot_accuracy_bars(bars, os.path.join(out, "accuracy.png"),
                           title=f"{data}: mean ± std over {len(seed_list)} seed(s)")
    if verbose:
        print_results(results, out)
    return results


def _columns_present(summary: dict[str, Any]) -> list[str]:
    return [k for k in COLUMNS if any(k in cols for cols in summary.values())]


def results_markdown(results: dict[str, Any]) -> str:
    summary = results["summary"]
    cols = _columns_present(summary)
    noise = ""
    if results["label_noise"]:
        noise = f", symmetric label noise {results['label_noise']:.0%} on the training split"
    lines = [
        f"# {results['data']}: {len(results['methods'])} method(s) x {len(results['seeds'])} seed(s){noise}",
        "",
        "Test top-1 accuracy in %, mean ± std over seeds (std with n-1; 0 for one seed). \"top-1\" is the method's "
        "own classifier, or the linear probe for methods without one.",
        "",
        "| method | " + " | ".join(COLUMNS[c][0] for c in cols) + " | train time (s) | seeds | budget |",
        "|---|" + "---:|" * len(cols) + "---:|---:|---|",
    ]
    for m, s in summary.items():
        b = results["budget"].get(m, {})
        budget = (f"{b.get('backbone')}, {b.get('epochs')} ep, bs {b.get('batch_size')}, "
                  f"{b.get('optimizer')} lr {b.get('lr')}")
        if b.get("attn_layer") not in (None, "none"):
            budget += f", attn {b['attn_layer']}"
        n = s.get("train_time_s", {}).get("n", 0)
        lines.append(f"| {m} | " + " | ".join(_fmt(s.get(c)) for c in cols)
                     + f" | {_fmt(s.get('train_time_s'), pct=False)} | {n} | {budget} |")
    lines += ["", f"Hardware: {results['hardware']}. Compare wall time: {results['compare_wall_s']:.1f} s."]
    if results["failed"]:
        lines += ["", "Failed runs:", *[f"- {f}" for f in results["failed"]]]
    return "\n".join(lines) + "\n"


def print_results(results: dict[str, Any], out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    summary = results["summary"]
    cols = _columns_present(summary)
    t = Table(title=f"{results['data']}: mean ± std over {len(results['seeds'])} seed(s) (top-1 %)")
    t.add_column("method")
    for c in cols:
        t.add_column(COLUMNS[c][0], justify="right")
    t.add_column("train s", justify="right")
    for m, s in summary.items():
        t.add_row(m, *[_fmt(s.get(c)) for c in cols], _fmt(s.get("train_time_s"), pct=False))
    con = Console()
    con.print(t)
    for f in results["failed"]:
        con.print(f"[red]failed:[/] {f}")
    con.print(f"hardware: {results['hardware']}; results in [bold]{out}[/]: results.md, results.json, "
              f"accuracy.png ({results['compare_wall_s']:.0f} s)")
