"""One writer per run directory (issue 12): a second writer is refused with the first one's PID, a killed writer's
lock goes with it, and the next writer clears the temporary files a kill left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchmates.config import RunError
from batchmates.training.rundir import LOCK_FILE, run_lock

ROOT = Path(__file__).resolve().parents[1]
HOLD = "import sys, time\nfrom batchmates.training.rundir import run_lock\nwith run_lock(sys.argv[1]):\n" \
       "    print('locked', flush=True)\n    time.sleep(600)\n"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(RunError, match=f"PID {holder.pid}.*choose another --out"):
            with run_lock(str(tmp_path / "run")):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(str(tmp_path / "run")):  # the kill released it: no stale lock
        assert (tmp_path / "run" / LOCK_FILE).exists()


def test_the_lock_clears_temporaries_of_a_killed_writer(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / ".last.ckpt.abc123.tmp").write_bytes(b"half a checkpoint")
    (run / "metrics.json").write_text("{}")
    with run_lock(str(run)):
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, "metrics.json"]


def test_two_trainings_on_one_out_the_second_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # long enough to outlive the second process's start-up (it is killed below): 30 epochs of digits now take less
    first = subprocess.Popen([sys.executable, "-m", "batchmates", "train", "--method", "ce", "--data", "digits",
                              "--epochs", "1000", "--threads", "1", "--no-progress", "--out", str(out)],
                             env={**_env(), "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "config.yaml").exists():  # written under the lock
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "-m", "batchmates", "train", "--method", "ce", "--data", "digits",
                                 "--epochs", "1", "--threads", "1", "--no-progress", "--out", str(out),
                                 "--overwrite"], env=_env(), capture_output=True, text=True, timeout=300)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"PID {first.pid}" in second.stderr and "another process" in second.stderr
