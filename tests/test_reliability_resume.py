"""Exact resume for every method (issue 12): a run stopped right after a mid-epoch step checkpoint and resumed ends
bitwise equal to the uninterrupted run (every weight and buffer, the optimiser's step count, every metrics row),
and a stop at an epoch's end loses no row.

The stop is simulated in this process: the checkpoint writer raises after its k-th write (what a ``kill -9`` right
after that write leaves behind is that file; ``scripts/kill_test.py`` does real kills in subprocesses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from batchmates.config import RunConfig
from batchmates.methods import available_methods
from batchmates.training import checkpoint_io
from batchmates.training.run import resume, train

# digits: 1347 training images, batch 64 -> 21 steps per epoch
BUDGET = dict(data="digits", epochs=1, max_steps=12, batch_size=64, checkpoint_every_n_steps=5, threads=1,
              progress=False, eval_protocols=["accuracy"], deterministic=True)
# options that make the short run exercise what a long one would: SwAV's queue (full after 2 steps, used from
# step 3) and the end of its prototype freezing (step 4)
OPTIONS = {"swav": {"queue_length": "128", "queue_start_epoch": "0", "freeze_prototypes": "4"}}


class _Stop(Exception):
    pass


def _train(monkeypatch, method: str, out: Path, *, stop_after: int | None = None, **changes) -> dict | None:
    writes = [0]
    original = checkpoint_io.AtomicCheckpointIO.save_checkpoint

    def save(self, checkpoint, path, storage_options=None):
        original(self, checkpoint, path, storage_options)
        writes[0] += 1
        if stop_after is not None and writes[0] == stop_after:
            raise _Stop(int(checkpoint["global_step"]))

    monkeypatch.setattr(checkpoint_io.AtomicCheckpointIO, "save_checkpoint", save)
    cfg = RunConfig(method=method, out=str(out), options=OPTIONS.get(method, {}), **{**BUDGET, **changes})
    try:
        return train(cfg, verbose=False)
    except _Stop:
        return None
    finally:
        monkeypatch.setattr(checkpoint_io.AtomicCheckpointIO, "save_checkpoint", original)


def _ckpt(d: Path) -> dict:
    return torch.load(d / "last.ckpt", map_location="cpu", weights_only=False)


def _rows(metrics: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in metrics["curve"]]


def _assert_same_run(ref_dir: Path, got_dir: Path) -> None:
    a, b = _ckpt(ref_dir), _ckpt(got_dir)
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    diff = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not diff, f"{len(diff)} of {len(a['state_dict'])} tensors differ after the resume, e.g. {diff[:4]}"
    ma = json.loads((ref_dir / "metrics.json").read_text())
    mb = json.loads((got_dir / "metrics.json").read_text())
    assert _rows(mb) == _rows(ma)  # the interrupted epoch's train loss too
    assert mb["test_acc"] == ma["test_acc"] and mb["resumed"] and mb["finished"]


@pytest.mark.slow
@pytest.mark.parametrize("method", available_methods())
def test_mid_epoch_stop_then_resume_is_bitwise_exact(monkeypatch, tmp_path: Path, method: str) -> None:
    ref = _train(monkeypatch, method, tmp_path / "ref")
    assert ref is not None and ref["steps"] == 12
    assert _train(monkeypatch, method, tmp_path / "cut", stop_after=2) is None  # right after the step-10 checkpoint
    assert _ckpt(tmp_path / "cut")["global_step"] == 10
    assert not (tmp_path / "cut" / "metrics.json").exists() or not json.loads(
        (tmp_path / "cut" / "metrics.json").read_text()).get("finished")
    resume(str(tmp_path / "cut"), verbose=False)
    _assert_same_run(tmp_path / "ref", tmp_path / "cut")


def test_stop_at_an_epoch_end_loses_no_row(monkeypatch, tmp_path: Path) -> None:
    # a step checkpoint every 21 steps falls on each epoch's last batch; it is skipped there (Lightning would resume
    # it in the next epoch without the epoch's row), so the first write is the epoch-end one, with the row
    budget = dict(epochs=2, max_steps=-1, checkpoint_every_n_steps=21)
    _train(monkeypatch, "ce", tmp_path / "ref", **budget)
    assert _train(monkeypatch, "ce", tmp_path / "cut", stop_after=1, **budget) is None
    state = _ckpt(tmp_path / "cut")
    history = next(v for k, v in state["callbacks"].items() if "History" in k)
    assert state["global_step"] == 21 and [r["epoch"] for r in history["rows"]] == [1]
    got = resume(str(tmp_path / "cut"), verbose=False)
    assert got["epochs_done"] == 2
    _assert_same_run(tmp_path / "ref", tmp_path / "cut")
    assert (tmp_path / "cut" / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs


def test_checkpoint_zero_means_epoch_ends(monkeypatch, tmp_path: Path) -> None:
    """``--checkpoint-every 0`` writes last.ckpt at every epoch end (Lightning 2.6's ModelCheckpoint with
    save_top_k=0 wrote none until training ended)."""
    steps = []
    original = checkpoint_io.AtomicCheckpointIO.save_checkpoint

    def save(self, checkpoint, path, storage_options=None):
        steps.append(int(checkpoint["global_step"]))
        original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(checkpoint_io.AtomicCheckpointIO, "save_checkpoint", save)
    cfg = RunConfig(method="ce", out=str(tmp_path / "run"), **{**BUDGET, "epochs": 2, "max_steps": -1,
                                                                 "checkpoint_every_n_steps": 0})
    train(cfg, verbose=False)
    assert steps == [21, 42]


KILL_AFTER_SAVE = """import os, signal, sys
from batchmates.training import checkpoint_io
save, n = checkpoint_io.AtomicCheckpointIO.save_checkpoint, [0]
def counting(self, checkpoint, path, storage_options=None):
    save(self, checkpoint, path, storage_options)
    n[0] += 1
    if n[0] == int(os.environ["KILL_AFTER_SAVE"]):
        os.killpg(os.getpgid(0), signal.SIGKILL)  # the whole run, DDP workers included
checkpoint_io.AtomicCheckpointIO.save_checkpoint = counting
from batchmates.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ddp_kill_after_a_mid_epoch_checkpoint_then_resume_is_bitwise_exact(tmp_path: Path) -> None:
    """2-process DDP (gloo): killed right after the step-10 checkpoint, resumed; weights and rows (each rank's share
    of the interrupted epoch's mean included) equal the uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "kill_after_save.py"
    script.write_text(KILL_AFTER_SAVE)
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    args = ["train", "--method", "ce", "--data", "digits", "--epochs", "1", "--max-steps", "12", "--batch-size", "64",
            "--checkpoint-every", "5", "--threads", "1", "--no-progress", "--protocol", "accuracy", "--devices", "2",
            "--strategy", "ddp", "--accelerator", "cpu"]

    def run(out: Path, kill_after: int = 0) -> int:
        p = subprocess.run([sys.executable, str(script), *args, "--out", str(out)], capture_output=True, text=True,
                           env={**env, "KILL_AFTER_SAVE": str(kill_after)}, timeout=600, start_new_session=True)
        return p.returncode

    assert run(tmp_path / "ref") == 0
    assert run(tmp_path / "cut", kill_after=2) == -signal.SIGKILL
    assert _ckpt(tmp_path / "cut")["global_step"] == 10
    r = subprocess.run([sys.executable, "-m", "batchmates", "train", "--resume", str(tmp_path / "cut"),
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_run(tmp_path / "ref", tmp_path / "cut")
