"""Kill runs with SIGKILL at random moments, resume them, and check nothing was lost (docs/reliability.md).

For each method: one uninterrupted reference run, then one run that is killed ``--kills`` times at random moments
(``kill -9`` of its whole process group, DDP workers included) and resumed with ``batchmates train --resume`` after
each kill (started afresh when no checkpoint existed yet), then resumed to the end. Checked after every kill:
``last.ckpt`` passes :func:`~batchmates.training.preflight.check_checkpoint_file` and loads; at the end: the
final weights are bitwise equal to the reference's, and so is every metrics row (except its wall time), so no
row was lost.

    .venv/bin/python scripts/kill_test.py --methods ce,swav --kills 3 [--ddp] [--epochs 3] [--out DIR]

Prints one Markdown row per method and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from batchmates.training.preflight import check_checkpoint_file


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchmates", "train", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _args(method: str, epochs: int, ddp: bool, out: Path) -> list[str]:
    a = ["--method", method, "--data", "digits", "--epochs", str(epochs), "--batch-size", "64", "--seed", "1",
         "--checkpoint-every", "5", "--threads", "1", "--no-progress", "--protocol", "accuracy", "--out", str(out)]
    if ddp:
        a += ["--devices", "2", "--strategy", "ddp", "--accelerator", "cpu"]
    return a


def _rows(run: Path) -> list[dict]:
    m = json.loads((run / "metrics.json").read_text())
    return [{k: v for k, v in r.items() if k != "time_s"} for r in m["curve"]]


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, env=_env(), stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def _kill_at_random(proc: subprocess.Popen, ckpt: Path, window: float, rng: random.Random) -> str:
    """Wait for the first checkpoint (or up to 120 s), then a random time in [0, window]; SIGKILL the group."""
    t0 = time.time()
    while proc.poll() is None and not ckpt.exists() and time.time() - t0 < 120:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, window))
    if proc.poll() is not None:
        return "finished before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return "killed"


def run_method(method: str, kills: int, epochs: int, ddp: bool, root: Path, rng: random.Random) -> dict:
    ref, run = root / f"{method}-ref", root / f"{method}-killed"
    t0 = time.time()
    r = subprocess.run(_cmd(*_args(method, epochs, ddp, ref)), env=_env(), capture_output=True, text=True)
    if r.returncode != 0:
        return {"method": method, "error": f"reference run failed: {r.stdout[-1500:]}{r.stderr[-1500:]}"}
    train_s = json.loads((ref / "metrics.json").read_text())["train_time_s"]
    window = max(0.5, train_s)  # kill moments spread over the training part of the run
    stats = {"method": method, "ddp": ddp, "kills": 0, "no_ckpt_yet": 0, "unloadable": 0, "temp_files": 0,
             "resumes": 0, "ref_s": round(time.time() - t0, 1)}
    log = root / f"{method}.log"
    for _ in range(kills):
        has_ckpt = (run / "last.ckpt").exists()
        argv = _cmd("--resume", str(run), "--no-progress") if has_ckpt else _cmd(*_args(method, epochs, ddp, run))
        stats["resumes"] += int(has_ckpt)
        what = _kill_at_random(_start(argv, log), run / "last.ckpt", window, rng)
        if what != "killed":
            break
        stats["kills"] += 1
        stats["temp_files"] += len(list(run.glob(".*.tmp")))  # removed by the next start (under its lock)
        if not (run / "last.ckpt").exists():
            stats["no_ckpt_yet"] += 1
            continue
        try:
            check_checkpoint_file(str(run / "last.ckpt"))
            torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - counted
            stats["unloadable"] += 1
    argv = _cmd("--resume", str(run), "--no-progress") if (run / "last.ckpt").exists() else _cmd(
        *_args(method, epochs, ddp, run))
    r = subprocess.run(argv, env=_env(), capture_output=True, text=True)
    if r.returncode != 0:
        return {**stats, "error": f"final run failed: {r.stdout[-1500:]}{r.stderr[-1500:]}"}
    a = torch.load(ref / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    b = torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    stats["tensors_differ"] = sum(not torch.equal(a[k], b[k]) for k in a) + len(set(a) ^ set(b))
    ref_rows, got_rows = _rows(ref), _rows(run)
    stats["rows"] = f"{len(got_rows)}/{len(ref_rows)}"
    stats["rows_equal"] = got_rows == ref_rows
    stats["lost_rows"] = len({r["epoch"] for r in ref_rows} - {r["epoch"] for r in got_rows})
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="ce", help="comma-separated methods")
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs per method")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--ddp", action="store_true", help="2-process DDP on the CPU (gloo)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kill-test-"))
    root.mkdir(parents=True, exist_ok=True)
    ok = True
    print("| method | DDP | kills | before 1st ckpt | unloadable ckpt | temp files left | rows | rows equal | "
          "tensors differ |\n|---|---|---:|---:|---:|---:|---:|---|---:|", flush=True)
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        s = run_method(method, args.kills, args.epochs, args.ddp, root, rng)
        if "error" in s:
            ok = False
            print(f"| {method} | {args.ddp} | error: {s['error'][-300:]!r} |", flush=True)
            continue
        good = s["unloadable"] == 0 and s["lost_rows"] == 0 and s["rows_equal"] and s["tensors_differ"] == 0
        ok &= good
        print(f"| {method} | {'yes' if args.ddp else 'no'} | {s['kills']} | {s['no_ckpt_yet']} | {s['unloadable']} | "
              f"{s['temp_files']} | {s['rows']} | {s['rows_equal']} | {s['tensors_differ']} |", flush=True)
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
