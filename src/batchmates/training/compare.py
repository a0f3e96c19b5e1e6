"""``compare``: train named variants x seeds and tabulate mean ± std per evaluation protocol.

A variant is a method plus run settings plus method options (:mod:`batchmates.training.variants`: ``ce``,
``ce@noise0.4``, ``simclr@b32+curate=frd-pairwise``, or a YAML file of them); a plain method name is a variant.
Each run lives in ``OUT/<variant>/seed<k>``. Every run's configuration is resolved and checked before the first
run starts; runs already finished are skipped and interrupted ones resumed, so an interrupted compare picks up
where it stopped (a directory holding a run of another configuration is an error, named before anything runs).
Writes ``OUT/results.md``, ``OUT/results.json`` and ``OUT/accuracy.png`` (atomically) and prints the table.

Paper: none (library infrastructure).

Library choices: runs go seed by seed (seed 0 of every variant first), so a compare stopped early still covers
every variant; the standard deviation is the sample one (n-1; 0 for one seed).
"""

from __future__ import annotations

import math
import os
import statistics
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from batchmates.config import PROTOCOLS, ConfigError, RunConfig
from batchmates.io import atomic_write_json, atomic_write_text
from batchmates.training.rundir import CONFIG_FILE, has_checkpoint, read_metrics
from batchmates.training.variants import Variant, parse_variant, variant_dir

__all__ = ["compare", "resolve_methods", "resolve_variants", "summarise", "plan_runs", "check_builds", "run_plan",
           "RunPlan"]


def _last_curve(m: dict[str, Any], key: str) -> Any:
    curve = m.get("curve") or []
    return curve[-1].get(key) if curve else None


# Column key -> (title, how to read it from a run's metrics.json)
COLUMNS: dict[str, tuple[str, Any]] = {
    "accuracy": ("top-1", lambda m: m.get("test_acc")),
    "knn20": ("kNN k=20", lambda m: m.get("eval", {}).get("knn", {}).get("k20")),
    "knn200": ("kNN k=200", lambda m: m.get("eval", {}).get("knn", {}).get("k200")),
    "linear": ("linear probe", lambda m: m.get("eval", {}).get("linear", {}).get("top1")),
    "corruptions": ("corrupted (mean)", lambda m: m.get("eval", {}).get("corruptions", {}).get("mean")),
    "dropped": ("dropped (curation)", lambda m: _last_curve(m, "frac_dropped")),
}
# Settings that make two runs different experiments (a rerun must match them); the rest is how a run executes.
IDENTITY = tuple(f.name for f in fields(RunConfig) if f.name not in (
    "out", "progress", "threads", "num_workers", "checkpoint_every_n_steps", "eval_protocols", "data_dir", "download",
    "accelerator", "devices", "strategy", "deterministic", "options"))


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
    """``{variant: {column: {"mean", "std", "n"}}}`` over the finished runs (columns that have values only).

    A run is grouped by its ``"variant"`` (its ``"method"`` for runs that name none)."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r.get("status") == "done":
            by_method.setdefault(r.get("variant", r["method"]), []).append(r["metrics"])
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


def resolve_variants(variants: str | Sequence[str | Variant], data: str) -> list[Variant]:
    """Variants from ``"all"``, ``"ce,supcon"`` (method names), or a list of specs / :class:`Variant` s.

    ``"all"`` is every registered method supporting ``data``. Names must be unique, and so must run directories.
    """
    if isinstance(variants, str):
        out = [parse_variant(n) for n in resolve_methods(variants, data)]
    else:
        out = [v if isinstance(v, Variant) else parse_variant(v) for v in variants]
    if not out:
        raise ConfigError("no variants: pass --methods all, --variants SPEC ..., or --variants-file FILE")
    seen: dict[str, Variant] = {}
    dirs: dict[str, str] = {}
    for v in out:
        if v.name in seen and seen[v.name] != v:
            raise ConfigError(f"two different variants are named {v.name!r}; name them apart (NAME:SPEC)")
        d = variant_dir(v.name)
        if dirs.setdefault(d, v.name) != v.name:
            raise ConfigError(f"variants {dirs[d]!r} and {v.name!r} would share the directory {d!r}; rename one")
        seen[v.name] = v
    return list(seen.values())


@dataclass(frozen=True)
class RunPlan:
    """One run of a compare: its variant, seed, resolved config (``cfg.out`` is its directory) and evaluation."""

    variant: Variant
    seed: int
    cfg: RunConfig
    corruptions: bool


def plan_runs(variants: Sequence[Variant], common: RunConfig, seeds: Sequence[int], out: str, *,
              corruptions: bool = False, method_options: dict[str, dict[str, Any]] | None = None) -> list[RunPlan]:
    """Resolve and check every run's configuration, seed by seed, before anything runs.

    ``method_options`` (``{"supcon": {"temperature": "0.1"}}``) apply to every variant of that method (a
    variant's own options win). Raises :class:`ConfigError` for any invalid setting or option, and when a run
    directory already holds a run of a different configuration.
    """
    from batchmates.methods import get_method

    method_options = method_options or {}
    unknown = sorted(set(method_options) - {v.method for v in variants})
    if unknown:
        raise ConfigError(f"options given for method(s) {unknown} that are not compared "
                          f"({sorted({v.method for v in variants})})")
    plans = []
    for seed in seeds:
        for v in variants:
            v_full = Variant(v.name, v.method, v.settings, {**method_options.get(v.method, {}), **v.options},
                             v.corruptions)
            cfg = v_full.config(common, seed=seed, out=os.path.join(out, variant_dir(v.name), f"seed{seed}"))
            cls = get_method(v.method)  # UnknownMethodError lists the choices
            if not cls.supports(cfg.data):
                raise ConfigError(f"variant {v.name!r}: method {v.method!r} does not support data={cfg.data!r}")
            try:
                cfg = cfg.resolve(cls)
            except ConfigError as e:
                raise ConfigError(f"variant {v.name!r}: {e}") from None
            _check_existing(cfg, v_full)
            plans.append(RunPlan(v_full, seed, cfg, corruptions if v.corruptions is None else v.corruptions))
    return plans


def check_builds(plans: Sequence[RunPlan]) -> None:
    """Build every variant's method once on its dataset (nothing is trained), so that the checks a method makes
    when it is built (an option that must divide the feature width, a batch larger than the training set, a
    missing dataset) fail before the first run rather than after the others have trained."""
    from batchmates.data import load_dataset
    from batchmates.methods import get_method
    from batchmates.training.data import RunDataModule

    loaded: dict[tuple[str, str | None, int | None], Any] = {}
    built: set[str] = set()
    for p in plans:
        if p.variant.name in built:
            continue
        built.add(p.variant.name)
        key = (p.cfg.data, p.cfg.data_dir, p.cfg.image_size)
        if key not in loaded:
            loaded[key] = load_dataset(p.cfg.data, data_dir=p.cfg.data_dir, download=p.cfg.download,
                                       image_size=p.cfg.image_size)
        try:
            get_method(p.cfg.method)(p.cfg, RunDataModule(p.cfg, loaded[key]).info)
        except ConfigError as e:
            raise ConfigError(f"variant {p.variant.name!r}: {e}") from None


def _check_existing(cfg: RunConfig, variant: Variant) -> None:
    """A directory that already holds a run must hold this configuration (its generic settings and the options
    the variant sets), so that a rerun resumes the same experiment."""
    path = os.path.join(cfg.out, CONFIG_FILE)
    if not os.path.exists(path):
        return
    saved = RunConfig.from_yaml(path)
    diff = [f"{k}: {getattr(saved, k)!r} there, {getattr(cfg, k)!r} now" for k in IDENTITY
            if getattr(saved, k) != getattr(cfg, k)]
    diff += [f"option {k}: {saved.options.get(k)!r} there, {cfg.options[k]!r} now" for k in variant.options
             if saved.options.get(k) != cfg.options[k]]
    if diff:
        raise ConfigError(f"{cfg.out!r} holds a run of another configuration ({'; '.join(diff)}); choose another "
                          "--out or variant name, or delete that directory")


def run_plan(plan: RunPlan, severities: Sequence[int] | None = None,
             verbose: bool = False) -> tuple[str, dict[str, Any], str]:
    """Train, resume or skip one planned run (then its corruption evaluation); ``(status, metrics, action)``.

    ``status`` is ``"done"`` or ``"failed"``; a failure is caught and described in ``action`` (one broken run of
    a comparison or study must not lose the others).
    """
    from batchmates.training.evaluate import evaluate
    from batchmates.training.run import resume, train

    run_dir = plan.cfg.out
    try:
        prev = read_metrics(run_dir)
        if prev and prev.get("finished"):
            metrics, action = prev, "skipped (already finished)"
        elif has_checkpoint(run_dir):
            metrics, action = resume(run_dir, verbose=verbose), "resumed"
        else:
            metrics, action = train(plan.cfg, verbose=verbose, overwrite=True), "trained"
        if plan.corruptions and "corruptions" not in metrics.get("eval", {}):
            evaluate(run_dir, ["accuracy"], corruptions=True, severities=severities)
            metrics = read_metrics(run_dir) or metrics
        return "done", metrics, action
    except Exception as e:  # noqa: BLE001 - one broken run must not lose the others' results
        if verbose:
            traceback.print_exc()
        return "failed", {}, f"failed: {type(e).__name__}: {e}"


def compare(
    methods: str | Sequence[str | Variant],
    data: str,
    seeds: int | Sequence[int],
    out: str,
    common_cfg: RunConfig | None = None,
    *,
    protocols: Sequence[str] = PROTOCOLS,
    label_noise: float = 0.0,
    corruptions: bool = False,
    severities: Sequence[int] | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train every variant x seed into ``out/<variant>/seed<k>`` and write the comparison; return results.json.

    ``methods``: ``"all"``, ``"ce,supcon"``, or a list of variant specs (``"ce@noise0.4"``) or :class:`Variant` s.
    ``seeds``: a count N (seeds 0..N-1) or explicit seeds. ``common_cfg`` carries the shared settings (epochs,
    batch size, backbone, ... left ``None`` take each method's own defaults); ``data``, ``protocols`` and
    ``label_noise`` override it, and each variant's own settings override all of these. ``method_options``:
    per-method ``--opt`` values, ``{"supcon": {"temperature": "0.1"}}``. ``severities``: corruption severities
    (default 1-5). A failing run is recorded (and the others continue); ``results.json["failed"]`` lists
    failures.
    """
    from batchmates.training.run import hardware_string

    variants = resolve_variants(methods, data)
    seed_list = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else list(seeds)
    if not seed_list or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seed_list):
        raise ConfigError(f"seeds must be a count >= 1 or a list of integers >= 0, got {seeds!r}")
    common = (common_cfg or RunConfig()).replace(data=data, label_noise=label_noise, eval_protocols=list(protocols))
    plans = plan_runs(variants, common, seed_list, out, corruptions=corruptions, method_options=method_options)
    check_builds(plans)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for plan in plans:
        status, metrics, action = run_plan(plan, severities, verbose)
        if verbose:
            print(f"[compare] {plan.variant.name} seed {plan.seed}: {action}", flush=True)
        runs.append({"variant": plan.variant.name, "method": plan.cfg.method, "seed": plan.seed,
                     "dir": plan.cfg.out, "status": status, "action": action, "metrics": metrics})
    summary = summarise(runs)
    budget = {p.variant.name: {"backbone": p.cfg.backbone, "epochs": p.cfg.epochs, "max_steps": p.cfg.max_steps,
                               "batch_size": p.cfg.batch_size, "lr": p.cfg.lr, "optimizer": p.cfg.optimizer,
                               "attn_layer": p.cfg.attn_layer, "precision": p.cfg.precision,
                               "label_noise": p.cfg.label_noise, "data": p.cfg.data} for p in plans}
    hw = next((r["metrics"].get("hardware") for r in runs if r["status"] == "done"), hardware_string())
    results = {
        "data": data,
        "methods": [v.name for v in variants],
        "variants": {v.name: {**v.describe(), "dir": variant_dir(v.name)} for v in variants},
        "seeds": seed_list,
        "protocols": list(protocols),
        "label_noise": label_noise,
        "hardware": hw,
        "budget": budget,
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "metrics"}
                 | {"test_acc": r["metrics"].get("test_acc"), "eval": r["metrics"].get("eval")} for r in runs],
        "failed": [f"{r['variant']} seed {r['seed']}: {r['action']}" for r in runs if r["status"] != "done"],
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


def _label(results: dict[str, Any]) -> str:
    """``"method"``, or ``"variant"`` when some variant is more than its method's name."""
    variants = results.get("variants") or {}
    return "variant" if any(n != v.get("method", n) for n, v in variants.items()) else "method"


def _budget(b: dict[str, Any], common_noise: float) -> str:
    text = (f"{b.get('backbone')}, {b.get('epochs')} ep, bs {b.get('batch_size')}, "
            f"{b.get('optimizer')} lr {b.get('lr')}")
    if (b.get("max_steps") or -1) > 0:
        text += f", max {b['max_steps']} steps"
    if b.get("attn_layer") not in (None, "none"):
        text += f", attn {b['attn_layer']}"
    if b.get("label_noise", common_noise) != common_noise:
        text += f", label noise {b['label_noise']:.0%}"
    return text


def results_markdown(results: dict[str, Any]) -> str:
    summary = results["summary"]
    cols = _columns_present(summary)
    label = _label(results)
    noise = ""
    if results["label_noise"]:
        noise = f", symmetric label noise {results['label_noise']:.0%} on the training split"
    lines = [
        f"# {results['data']}: {len(results['methods'])} {label}(s) x {len(results['seeds'])} seed(s){noise}",
        "",
        "Test top-1 accuracy in %, mean ± std over seeds (std with n-1; 0 for one seed). \"top-1\" is the method's "
        "own classifier, or the linear probe for methods without one.",
        "",
        f"| {label} | " + " | ".join(COLUMNS[c][0] for c in cols) + " | train time (s) | seeds | budget |",
        "|---|" + "---:|" * len(cols) + "---:|---:|---|",
    ]
    for m, s in summary.items():
        budget = _budget(results["budget"].get(m, {}), results["label_noise"])
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
    t.add_column(_label(results))
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
