"""Compare IBAFormer's independent-eval forms on trained runs: clean and corrupted test top-1 per form.

    python scripts/iba_eval_forms.py docs/results/fashion-mnist/shift/vit-miba/seed* --json OUT.json

For each run directory (a `batchmates train --method ibaformer` run with its last.ckpt) every intra-batch attention
layer is evaluated, without retraining, in each ``eval_form`` it supports:

* ``running``: against the running means of the training batches' keys and values (the default);
* ``bank`` (EIBA only): against the bank of training keys/values;
* ``sa``: self-attention alone (IBA dropped at test);

plus ``batch`` (``eval_mode=batch``: test batches of the training batch size, the batch mates kept). Reported: the
clean test top-1 and the mean over the corrupted test sets (5 kinds x ``--severities``), and the paired
difference of each form to ``running`` over the runs. Nothing in any run directory is changed.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from batchmates.nn.intra_batch_attention import IntraBatchAttention
from batchmates.training.evaluate import classifier_accuracy, corruption_accuracy
from batchmates.training.rundir import load_run
from batchmates.training.study_stats import paired_comparison, t_interval


def form_accuracies(run_dir: str, severities: list[int]) -> dict[str, dict[str, float]]:
    """``{form: {"clean", "corrupted"}}`` of one run, for every form its layers support."""
    model, cfg, splits = load_run(run_dir)
    layers = [m for m in model.modules() if isinstance(m, IntraBatchAttention)]
    if not layers:
        raise SystemExit(f"{run_dir}: the model has no intra-batch attention layer (is it an ibaformer run?)")
    forms = ["running", "sa"] + (["bank"] if all(m.mode == "element" for m in layers) else [])
    out = {}
    for form in forms + ["batch"]:
        for m in layers:
            m.eval_form = form if form != "batch" else "running"
        # the evaluation applies the run config's eval_mode to every layer (as `batchmates eval --eval-mode` does)
        model.cfg = cfg.replace(eval_mode="batch" if form == "batch" else "independent")
        batch_size = int(cfg.batch_size) if form == "batch" else 512  # batch mates as in training
        clean = classifier_accuracy(model, splits.test, batch_size=batch_size)
        corrupted = corruption_accuracy(model, splits, severities=severities, batch_size=batch_size)["mean"]
        out[form] = {"clean": clean, "corrupted": corrupted}
        print(f"  {form:<8} clean {100 * clean:6.2f}%  corrupted {100 * corrupted:6.2f}%", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories of `batchmates train --method ibaformer`")
    ap.add_argument("--severities", default="1,2,3,4,5", help="corruption severities (default 1,2,3,4,5)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    severities = [int(s) for s in args.severities.split(",")]
    torch.set_num_threads(1)
    per_run = {}
    for run in args.runs:
        print(run, flush=True)
        per_run[run] = form_accuracies(run, severities)
    summary: dict[str, dict] = {}
    forms = sorted({f for r in per_run.values() for f in r}, key=["running", "bank", "sa", "batch"].index)
    for form in forms:
        for metric in ("clean", "corrupted"):
            vals = {i: 100 * r[form][metric] for i, r in enumerate(per_run.values()) if form in r}
            ci = t_interval(list(vals.values()))
            line = f"{form:<8} {metric:<9} {ci['mean']:6.2f}% (n={ci['n']})"
            entry = {"mean": ci}
            if form != "running" and len(vals) >= 2:
                base = {i: 100 * r["running"][metric] for i, r in enumerate(per_run.values()) if i in vals}
                p = paired_comparison(vals, base)
                d = p["diff"]
                line += (f"  - running: {d['mean']:+.2f} pp [{d['lo']:+.2f}, {d['hi']:+.2f}], "
                         f"paired t p = {p['t_test']['p']:.3f}")
                entry["minus_running_pp"] = p
            summary.setdefault(form, {})[metric] = entry
            print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"severities": severities, "runs": per_run, "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
