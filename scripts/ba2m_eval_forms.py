"""Compare BA²M's independent-eval forms on trained runs: the expected factor, the running partition, batch eval.

    python scripts/ba2m_eval_forms.py docs/results/fashion-mnist/attn/ba2m/seed* \
        --baseline docs/results/fashion-mnist/attn/ce+se/seed* --json OUT.json

For each run directory (a `batchmates train --method ba2m` run with its last.ckpt), this reports test top-1 with

* ``expected``: every BA²M layer multiplies by its expected training factor (``eval_form=expected``; for the scaled
  weights that is 1, so the attention is off at test);
* ``running``: each test sample is weighted by its own score against the training batches' partition function
  (``eval_form=running``). Runs trained before the layer tracked it get it from
  :func:`batchmates.nn.ba2m.update_running_scores`: ``--batches`` augmented training batches of the run's batch
  size (seeded, so the figure repeats), in training mode, with every other buffer restored;
* ``batch``: the batch weighting kept in eval (``eval_mode=batch``: test batches of the training batch size, in
  dataset order), read from the run's ``eval_batch`` when ``batchmates eval RUN --eval-mode batch`` stored it.

``--baseline`` runs (paired with the BA²M runs in the order given, e.g. the same seeds) add the paired difference
of each form to their recorded ``test_acc``. Nothing in any run directory is changed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from batchmates.nn.ba2m import BA2M, update_running_scores
from batchmates.training.evaluate import classifier_accuracy
from batchmates.training.rundir import load_run
from batchmates.training.study_stats import paired_comparison


def running_accuracy(run_dir: str, n_batches: int, seed: int = 0) -> tuple[float, float, bool]:
    """``(expected top-1, running top-1, whether the partition had to be recomputed)`` of one run."""
    model, cfg, splits = load_run(run_dir)
    layers = [m for m in model.modules() if isinstance(m, BA2M)]
    if not layers:
        raise SystemExit(f"{run_dir}: the model has no BA2M layer (is it a --method ba2m run?)")
    for m in layers:
        m.eval_form = "expected"
    expected = classifier_accuracy(model, splits.test)
    recomputed = not all(int(m.z_tracked) > 0 for m in layers)
    if recomputed:
        images = splits.train.images
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(images.shape[0], generator=gen)[: n_batches * cfg.batch_size]
        torch.manual_seed(seed)  # the augmentation's draws
        batches = (model.train_views(images[idx]) for idx in order.split(cfg.batch_size))
        update_running_scores(model.backbone, batches)
    for m in layers:
        m.eval_form = "running"
    return expected, classifier_accuracy(model, splits.test), recomputed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories of `batchmates train --method ba2m`")
    ap.add_argument("--batches", type=int, default=100, help="training batches for the partition (default 100)")
    ap.add_argument("--baseline", nargs="*", default=[], help="runs to pair with RUNS (same order), by test_acc")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.baseline and len(args.baseline) != len(args.runs):
        ap.error(f"--baseline needs one run per BA2M run ({len(args.runs)}), got {len(args.baseline)}")
    torch.set_num_threads(1)
    rows = []
    print(f"{'run':<52} {'expected':>9} {'running':>9} {'batch':>9}")
    for run in args.runs:
        expected, running, recomputed = running_accuracy(run, args.batches)
        with open(f"{run}/metrics.json") as f:
            batch = ((json.load(f).get("eval_batch") or {}).get("accuracy") or {}).get("top1")
        rows.append({"run": run, "expected": expected, "running": running, "batch": batch,
                     "partition_recomputed_from_batches": args.batches if recomputed else 0})
        print(f"{run:<52} {100 * expected:>8.2f}% {100 * running:>8.2f}% "
              f"{'-' if batch is None else f'{100 * batch:.2f}%':>9}", flush=True)
    for key in ("expected", "running", "batch"):
        vals = [r[key] for r in rows if r[key] is not None]
        if vals:
            spread = f" ± {100 * statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
            print(f"mean {key:<9} {100 * statistics.fmean(vals):.2f}%{spread} (n={len(vals)})")
    for r, base in zip(rows, args.baseline):
        with open(f"{base}/metrics.json") as f:
            r["baseline"], r["baseline_run"] = json.load(f)["test_acc"], base
    paired = {}
    pairs_to_test = [("running", "expected"), ("running", "batch")]
    pairs_to_test += [(form, "baseline") for form in ("expected", "running", "batch")] if args.baseline else []
    for a, b in pairs_to_test:
        pairs = [r for r in rows if r[a] is not None and r[b] is not None]
        if len(pairs) >= 2:
            p = paired_comparison({i: 100 * r[a] for i, r in enumerate(pairs)},
                                  {i: 100 * r[b] for i, r in enumerate(pairs)})
            paired[f"{a}-{b}"] = p
            d = p["diff"]
            print(f"{a} - {b}: {d['mean']:+.2f} pp, 95% CI [{d['lo']:+.2f}, {d['hi']:+.2f}], "
                  f"paired t p = {p['t_test']['p']:.3f}, Wilcoxon p = {p['wilcoxon']['p']:.3f} (n={len(pairs)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batches": args.batches, "runs": rows, "paired_pp": paired}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
