#!/usr/bin/env python3
"""The accuracy study behind docs/results.md: every method of the survey on Fashion-MNIST, 3 seeds, one fixed
budget per method, run as independent `batchmates train` processes in parallel (several per GPU, or one at a time
on a CPU), then tabulated as mean ± std.

    python scripts/experiments.py --out runs/study --parallel 8 --deadline 300      # on a GPU machine
    python scripts/experiments.py --out runs/study --groups supervised --parallel 1   # one group on a CPU
    python scripts/experiments.py --out runs/study --summarise-only                   # rebuild the tables

Each run lives in OUT/<group>/<name>/seed<k> and is skipped when its metrics.json already holds a test result, so
an interrupted study resumes. `--deadline` stops launching new runs after that many seconds (runs are ordered so
the first seed of every configuration comes first). The tables go to OUT/results.md and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Config:
    group: str
    name: str
    args: list[str]
    protocols: tuple[str, ...] = ("accuracy",)
    corruptions: bool = False
    priority: int = 0  # lower runs first (all seeds of priority 0 before any run of priority 1)
    extra: dict = field(default_factory=dict)


def configs(epochs: int, steps: int, vit_steps: int) -> list[Config]:
    """The study. Budget: ``epochs`` epochs capped at ``steps`` optimiser steps (the LR schedule spans the budget)."""
    fm = ["--data", "fashion-mnist", "--backbone", "resnet-small"]
    e = ["--epochs", str(epochs), "--max-steps", str(steps)]
    se = e
    out: list[Config] = []
    # Issue 3: supervised losses (top-1 of the final classifier).
    out += [
        Config("supervised", "ce", ["--method", "ce", *fm, *e]),
        Config("supervised", "supcon", ["--method", "supcon", *fm, *se]),
        Config("supervised", "ce+cc", ["--method", "cc", *fm, *e]),
    ]
    # Issue 3: self-supervised (kNN and linear probe).
    out += [
        Config("ssl", n, ["--method", n, *fm, *se], ("knn", "linear")) for n in ("simclr", "swav", "barlow")
    ]
    # Issue 4: clean accuracy of batch-attention layers.
    out += [
        Config("attention", "ce+se", ["--method", "ce", "--attn-layer", "se", *fm, *e]),
        Config("attention", "ba2m", ["--method", "ba2m", *fm, *e]),
        Config("attention", "batchformer", ["--method", "batchformer", *fm, *e]),
    ]
    # Issue 4: Batch Transformer under symmetric label noise.
    for noise in (0.0, 0.2, 0.4):
        for m in ("ce", "btn"):
            if m == "ce" and noise == 0.0:
                continue  # the clean CE baseline is the supervised group's
            out.append(Config("label-noise", f"{m}@{noise:.1f}", ["--method", m, *fm, *e, "--label-noise", str(noise)]))
    # Issue 5: curation at small batch sizes (SimCLR at 32/64/256, Barlow Twins at 64).
    for bs in (32, 64, 256):
        for cur in ("none", "frd-pairwise"):
            out.append(Config("curation", f"simclr-b{bs}-{cur}",
                              ["--method", "simclr", *fm, *se, "--batch-size", str(bs), "--opt", f"curate={cur}"],
                              ("knn", "linear")))
    for cur in ("none", "frd-pairwise"):
        out.append(Config("curation", f"barlow-b64-{cur}",
                          ["--method", "barlow", *fm, *se, "--batch-size", "64", "--opt", f"curate={cur}"],
                          ("knn", "linear")))
    # Issue 4: IBAFormer on the ViT, clean and corrupted test sets; the plain-ViT baseline is the same method with
    # no IBA block (same optimiser and budget). ViTs are the slowest runs on a CPU, so they go last, with their own
    # step budget.
    vit = ["--data", "fashion-mnist", "--backbone", "vit-tiny", "--epochs", str(epochs), "--max-steps", str(vit_steps)]
    out += [
        Config("domain-shift", "vit-self", ["--method", "ibaformer", *vit, "--opt", "iba_blocks=none"],
               corruptions=True, priority=1),
        Config("domain-shift", "vit-miba", ["--method", "ibaformer", *vit, "--opt", "mode=mean"], corruptions=True,
               priority=1),
        Config("domain-shift", "vit-eiba", ["--method", "ibaformer", *vit, "--opt", "mode=element"],
               corruptions=True, priority=1),
    ]
    return out


def run_dir(out: str, c: Config, seed: int) -> str:
    return os.path.join(out, c.group, c.name, f"seed{seed}")


def finished(d: str, c: Config) -> bool:
    m = read_metrics(d)
    if not m or "test_acc" not in m:
        return False
    return not c.corruptions or "corruptions" in (m.get("eval") or {})


def command(c: Config, seed: int, d: str, extra: list[str], eval_device: str) -> list[str]:
    """One shell command: train (with its protocols), then the corrupted-test-set evaluation where asked."""
    cmd = [sys.executable, "-m", "batchmates", "train", *c.args, "--seed", str(seed), "--out", d, "--no-progress",
           "--overwrite", *extra]
    for p in c.protocols:
        cmd += ["--protocol", p]
    line = " ".join(shlex.quote(x) for x in cmd)
    if c.corruptions:
        ev = [sys.executable, "-m", "batchmates", "eval", d, "--protocol", "accuracy", "--corruptions",
              "--severity", "3", "--device", eval_device]
        line += " && " + " ".join(shlex.quote(x) for x in ev)
    return ["bash", "-c", line]


def launch_all(cfgs: list[Config], seeds: list[int], out: str, parallel: int, deadline: float, extra: list[str],
               eval_device: str) -> None:
    # first seed of everything first, priority groups in order
    jobs = sorted(((c, s) for s in seeds for c in cfgs), key=lambda j: (j[0].priority, j[1]))
    t0 = time.time()
    running: list[tuple[subprocess.Popen, Config, int, float]] = []
    log_dir = os.path.join(out, "logs")
    os.makedirs(log_dir, exist_ok=True)
    while jobs or running:
        while jobs and len(running) < parallel and time.time() - t0 < deadline:
            c, s = jobs.pop(0)
            d = run_dir(out, c, s)
            if finished(d, c):
                continue
            os.makedirs(d, exist_ok=True)
            log = open(os.path.join(log_dir, f"{c.group}__{c.name}__seed{s}.log"), "w")
            p = subprocess.Popen(command(c, s, d, extra, eval_device), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            running.append((p, c, s, time.time()))
            print(f"[{time.time() - t0:6.0f}s] start {c.group}/{c.name} seed {s}", flush=True)
        if time.time() - t0 >= deadline and jobs:
            print(f"deadline reached: {len(jobs)} runs not started", flush=True)
            jobs.clear()
        still = []
        for p, c, s, ts in running:
            if p.poll() is None:
                still.append((p, c, s, ts))
            else:
                print(f"[{time.time() - t0:6.0f}s] done  {c.group}/{c.name} seed {s} rc={p.returncode} "
                      f"({time.time() - ts:.0f}s)", flush=True)
        running = still
        time.sleep(0.5)


def read_metrics(d: str) -> dict | None:
    try:
        with open(os.path.join(d, "metrics.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def pick(m: dict, key: str) -> float | None:
    ev = m.get("eval", {}) or {}
    if key == "top1":
        v = m.get("test_acc")
        if v is None:
            v = (ev.get("accuracy") or {}).get("top1") if isinstance(ev.get("accuracy"), dict) else ev.get("accuracy")
        return v
    if key == "knn20":
        return (ev.get("knn") or {}).get("k20")
    if key == "knn200":
        return (ev.get("knn") or {}).get("k200")
    if key == "linear":
        return (ev.get("linear") or {}).get("top1")
    if key == "corrupted":
        return (ev.get("corruptions") or {}).get("mean")
    if key == "frac_dropped":  # logged per epoch by curated methods; the last epoch's value
        curve = m.get("curve") or []
        return curve[-1].get("frac_dropped") if curve else None
    if key == "wall_s":
        return m.get("wall_time_s")
    return None


def summarise(out: str, cfgs: list[Config], seeds: list[int]) -> dict:
    keys = ("top1", "knn20", "knn200", "linear", "corrupted", "frac_dropped", "wall_s")
    res: dict = {}
    for c in cfgs:
        vals: dict[str, list[float]] = {k: [] for k in keys}
        hw = None
        for s in seeds:
            m = read_metrics(run_dir(out, c, s))
            if not m:
                continue
            hw = hw or m.get("hardware")
            for k in keys:
                v = pick(m, k)
                if isinstance(v, int | float) and not math.isnan(v):
                    vals[k].append(float(v))
        row = {}
        for k, v in vals.items():
            if v:
                row[k] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
        res.setdefault(c.group, {})[c.name] = {"args": c.args, "hardware": hw, **row}
    return res


def fmt(cell: dict | None, pct: bool = True) -> str:
    if not cell:
        return "—"
    f = 100.0 if pct else 1.0
    return f"{cell['mean'] * f:.2f} ± {cell['std'] * f:.2f} (n={cell['n']})"


def markdown(res: dict) -> str:
    lines = []
    for group, rows in res.items():
        lines += [f"### {group}", "", "| config | top-1 | kNN k=20 | kNN k=200 | linear | corrupted mean | "
                  "dropped | wall s | command args |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            wall = f"{r['wall_s']['mean']:.0f}" if "wall_s" in r else "—"
            lines.append(f"| {name} | {fmt(r.get('top1'))} | {fmt(r.get('knn20'))} | {fmt(r.get('knn200'))} | "
                         f"{fmt(r.get('linear'))} | {fmt(r.get('corrupted'))} | {fmt(r.get('frac_dropped'))} | "
                         f"{wall} | `{' '.join(r['args'])}` |")
        hws = {r.get("hardware") for r in rows.values() if r.get("hardware")}
        lines += ["", f"Hardware: {', '.join(sorted(hws)) or 'unknown'}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1, help="epoch budget of every run")
    ap.add_argument("--steps", type=int, default=200, help="cap on optimiser steps of every run")
    ap.add_argument("--vit-steps", type=int, default=100, help="cap on optimiser steps of the ViT runs")
    ap.add_argument("--groups", default="all", help="comma-separated groups, or all")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=float("inf"), help="seconds after which no run starts")
    ap.add_argument("--summarise-only", action="store_true")
    ap.add_argument("--eval-device", default="cpu", help="device of the corrupted-test-set evaluation")
    ap.add_argument("--extra", default="", help="extra arguments for every run, e.g. '--accelerator gpu'")
    a = ap.parse_args(argv)
    cfgs = configs(a.epochs, a.steps, a.vit_steps)
    if a.groups != "all":
        wanted = set(a.groups.split(","))
        cfgs = [c for c in cfgs if c.group in wanted]
    seeds = list(range(a.seeds))
    if not a.summarise_only:
        launch_all(cfgs, seeds, a.out, a.parallel, a.deadline, a.extra.split(), a.eval_device)
    res = summarise(a.out, cfgs, seeds)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    md = markdown(res)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
