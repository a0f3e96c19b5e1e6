"""Fault injection for the CLI: bad inputs a new user gives, each of which must be one clear error.

Each :class:`Case` prepares its bad input in a scratch directory and says which exit status and which words the
one-paragraph message must have. :func:`run_case` runs it (in this process through :func:`batchmates.cli.main`,
or as a ``python -m batchmates`` subprocess) and classifies the outcome:

* ``clear``: the expected exit status, no traceback, the expected words in the output;
* ``traceback``: a Python traceback reached the user;
* ``silent``: exit status 0 where an error was due (or the wrong outcome without a word);
* ``unclear``: an error without traceback, but not the expected status or words;
* ``skipped``: the case cannot be staged here (e.g. a read-only directory for root, who may write anywhere).

``tests/test_reliability_inputs.py`` asserts every case is ``clear``; ``scripts/fault_inputs.py`` prints the table
of docs/reliability.md. (A test helper, not part of the package: it drives the CLI, the top floor.)

Library choices: cases that need a finished run share one (``digits``, ``ce``, 1 epoch); data cases write a small
synthetic Fashion-MNIST (12 train / 6 test images, IDX, gzip) and damage one file; "no GPU" is staged with
``CUDA_VISIBLE_DEVICES=""`` in a subprocess and by patching the GPU count in this process.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Case", "CASES", "Outcome", "Scratch", "run_case", "write_fashion"]

QUICK = ["--epochs", "1", "--threads", "1", "--no-progress", "--protocol", "accuracy"]


# ---------------------------------------------------------------------------------------------- staging helpers
def write_fashion(folder: Path, n_train: int = 12, n_test: int = 6) -> Path:
    """A synthetic Fashion-MNIST in IDX format (gzip), labels 0..9 cycling; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train-images-idx3-ubyte": bytes(range(256)) * (n_train * 28 * 28 // 256 + 1),
             "t10k-images-idx3-ubyte": bytes(range(255, -1, -1)) * (n_test * 28 * 28 // 256 + 1)}
    for name, n in (("train", n_train), ("t10k", n_test)):
        img = files[f"{name}-images-idx3-ubyte"][: n * 28 * 28]
        _write_idx(folder / f"{name}-images-idx3-ubyte.gz", 3, (n, 28, 28), img)
        _write_idx(folder / f"{name}-labels-idx1-ubyte.gz", 1, (n,), bytes(i % 10 for i in range(n)))
    return folder


def _write_idx(path: Path, ndim: int, shape: tuple[int, ...], payload: bytes, *, magic: bytes | None = None) -> None:
    head = magic if magic is not None else bytes([0, 0, 0x08, ndim])
    with gzip.open(path, "wb") as f:
        f.write(head + struct.pack(f">{ndim}I", *shape) + payload)


def _flip_bit(path: Path, at: float = 0.5) -> None:
    b = bytearray(path.read_bytes())
    b[int(len(b) * at)] ^= 0x10
    path.write_bytes(bytes(b))


def _truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


@dataclass
class Scratch:
    """A scratch directory with one shared finished run (made on first use) and fresh sub-directories."""

    root: Path
    subprocess: bool = False
    _run: Path | None = None
    _n: int = 0

    def fresh(self, name: str) -> Path:
        self._n += 1
        d = self.root / f"{self._n:02d}-{name}"
        d.mkdir(parents=True)
        return d

    def finished_run(self) -> Path:
        if self._run is None:
            out = self.root / "finished-run"
            argv = ["train", "--method", "ce", "--data", "digits", *QUICK, "--out", str(out)]
            code, text = _invoke(argv, {}, self.subprocess)
            if code != 0:
                raise RuntimeError(f"could not make the shared run: {text[-2000:]}")
            self._run = out
        return self._run

    def run_copy(self, name: str, *, finished: bool = True) -> Path:
        d = self.fresh(name) / "run"
        shutil.copytree(self.finished_run(), d, ignore=shutil.ignore_patterns(".lock", "tb"))
        if not finished:
            m = json.loads((d / "metrics.json").read_text())
            m["finished"] = False
            (d / "metrics.json").write_text(json.dumps(m))
        return d


@dataclass
class Case:
    """One bad input: ``stage(scratch) -> argv`` (after ``batchmates``); the status and words the reply must have."""

    group: str
    name: str
    stage: Callable[[Scratch], list[str]]
    expect: int = 2
    words: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    no_gpu: bool = False
    check: Callable[[Scratch, list[str]], str] | None = None  # extra check after the run: "" or what went wrong


@dataclass
class Outcome:
    status: str
    code: int
    text: str
    seconds: float
    why: str = ""


def _config_with(s: Scratch, name: str, **changes: Any) -> list[str]:
    import yaml

    d = s.fresh(name)
    cfg = yaml.safe_load((s.finished_run() / "config.yaml").read_text())
    cfg.update(changes)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return ["train", "--config", str(d / "config.yaml"), "--out", str(d / "out")]


def _config_text(s: Scratch, text: str) -> list[str]:
    p = s.fresh("cfgtext") / "config.yaml"
    p.write_text(text)
    return ["train", "--config", str(p), "--out", str(p.parent / "out")]


def _train(*extra: str, method: str = "ce", data: str = "digits") -> Callable[[Scratch], list[str]]:
    def stage(s: Scratch) -> list[str]:
        return ["train", "--method", method, "--data", data, *QUICK, "--out", str(s.fresh("train") / "out"), *extra]

    return stage


def _fashion(damage: Callable[[Path], None], cmd: str = "train") -> Callable[[Scratch], list[str]]:
    def stage(s: Scratch) -> list[str]:
        d = write_fashion(s.fresh("fashion") / "data")
        damage(d)
        if cmd == "compare":
            return ["compare", "--methods", "ce", "--data", "fashion-mnist", "--data-dir", str(d), "--epochs", "1",
                    "--threads", "1", "--no-progress", "--out", str(d.parent / "cmp")]
        return ["train", "--method", "ce", "--data", "fashion-mnist", "--data-dir", str(d), *QUICK,
                "--batch-size", "4", "--out", str(d.parent / "out")]

    return stage


def _labels_out_of_range(d: Path) -> None:
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", 1, (6,), bytes([0, 1, 2, 3, 4, 10]))


def _count_mismatch(d: Path) -> None:
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", 1, (5,), bytes(range(5)))


def _bad_header(d: Path) -> None:
    _write_idx(d / "train-labels-idx1-ubyte.gz", 1, (12,), bytes(12), magic=b"\x08\x01\x00\x00")


def _resume(damage: Callable[[Path], None] | None = None, *, cmd: str = "resume",
            finished: bool = False) -> Callable[[Scratch], list[str]]:
    def stage(s: Scratch) -> list[str]:
        run = s.run_copy("run", finished=finished)
        if damage is not None:
            damage(run / "last.ckpt")
        return ["train", "--resume", str(run), "--no-progress"] if cmd == "resume" else ["eval", str(run)]

    return stage


def _unchanged_metrics(s: Scratch, argv: list[str]) -> str:
    run = Path(argv[2])
    before = json.loads((s.finished_run() / "metrics.json").read_text())
    after = json.loads((run / "metrics.json").read_text())
    return "" if after == before else "metrics.json changed"


def _nan_recorded(s: Scratch, argv: list[str]) -> str:
    out = Path(argv[argv.index("--out") + 1])
    m = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    if m.get("finished") is not False or (m.get("failed") or {}).get("reason") != "non-finite":
        return f"metrics.json does not record the failure: {m.get('finished')!r} {m.get('failed')!r}"
    return ""


def _file_as_out(s: Scratch) -> list[str]:
    f = s.fresh("out-file") / "afile"
    f.write_text("x")
    return _train()(s)[:-2] + ["--out", str(f)]


def _under_file(s: Scratch) -> list[str]:
    f = s.fresh("out-under") / "afile"
    f.write_text("x")
    return _train()(s)[:-2] + ["--out", str(f / "run")]


def _read_only(s: Scratch) -> list[str]:
    d = s.fresh("read-only")
    d.chmod(0o555)
    return _train()(s)[:-2] + ["--out", str(d / "run")]


def _occupied(s: Scratch) -> list[str]:
    return _train()(s)[:-2] + ["--out", str(s.run_copy("occupied"))]


def _plain(*argv: str) -> Callable[[Scratch], list[str]]:
    return lambda s: list(argv)


# (group, name, stage, status, words, keyword arguments)
CASES: list[Case] = [
    Case("config file", "wrong type: weight_decay: abc", lambda s: _config_with(s, "wd", weight_decay="abc"), 2,
         ("weight_decay",)),
    Case("config file", "wrong type: epochs: true", lambda s: _config_with(s, "ep", epochs=True), 2, ("epochs",)),
    Case("config file", "unknown key", lambda s: _config_with(s, "key", epoch=3), 2, ("unknown config key",)),
    Case("config file", "--config is a directory", lambda s: ["train", "--config", str(s.fresh("cfgdir")),
                                                              "--out", str(s.root / "x")], 2, ("is a directory",)),
    Case("config file", "--config does not exist", lambda s: ["train", "--config", str(s.root / "nope.yaml"),
                                                               "--out", str(s.root / "x")], 2, ("does not exist",)),
    Case("config file", "--config is not YAML", lambda s: _config_text(s, "a: [1,\n"), 2,
         ("not valid YAML", "config.yaml")),
    Case("config file", "--config is empty", lambda s: _config_text(s, ""), 2, ("is empty",)),
    Case("flags", "--epochs 0", _train("--epochs", "0"), 2, ("epochs",)),
    Case("flags", "--lr -1", _train("--lr", "-1"), 2, ("lr",)),
    Case("flags", "--method nope", _train(method="nope"), 2, ("not registered",)),
    Case("flags", "--opt unknown=1", _train("--opt", "unknown=1"), 2, ("unknown option",)),
    Case("flags", "--opt temperature=abc", _train("--opt", "temperature=abc", method="supcon"), 2, ("temperature",)),
    Case("flags", "--data nope", _train(data="nope"), 2, ("unknown dataset",)),
    Case("flags", "--backbone nope", _train("--backbone", "nope"), 2, ("backbone",)),
    Case("flags", "--batch-size larger than the data", _train("--batch-size", "100000"), 2, ("batch_size",)),
    Case("flags", "--devices 3 with batch 64", _train("--devices", "3", "--batch-size", "64"), 2, ("divisible",)),
    Case("devices", "--strategy ddp_spawn", _train("--strategy", "ddp_spawn"), 2, ("ddp_spawn",)),
    Case("devices", "--precision 16-mixed on CPU", _train("--precision", "16-mixed"), 2, ("16-mixed",),
         no_gpu=True),
    Case("devices", "--accelerator gpu without a GPU", _train("--accelerator", "gpu"), 2, ("no CUDA GPU",),
         no_gpu=True),
    Case("devices", "eval --device cuda without a GPU", lambda s: ["eval", str(s.run_copy("dev")), "--device",
                                                                   "cuda"], 2, ("CUDA is not available",),
         no_gpu=True),
    Case("paths", "--out is a file", _file_as_out, 2, ("is a file",)),
    Case("paths", "--out under a file", _under_file, 2, ("under the file",)),
    Case("paths", "--out read-only", _read_only, 2, ("cannot write",)),
    Case("paths", "--out holds a run", _occupied, 1, ("already holds a run",)),
    Case("paths", "--resume a missing directory", _plain("train", "--resume", "/nonexistent/run"), 1,
         ("does not exist",)),
    Case("checkpoint", "--resume truncated last.ckpt", _resume(_truncate), 1, ("truncated",)),
    Case("checkpoint", "--resume zero-byte last.ckpt", _resume(lambda p: p.write_bytes(b"")), 1, ("empty",)),
    Case("checkpoint", "eval with a bit-flipped last.ckpt", _resume(_flip_bit, cmd="eval"), 1, ("CRC",)),
    Case("checkpoint", "--resume a finished run", _resume(finished=True), 0, ("finished", "--reevaluate"),
         check=_unchanged_metrics),
    Case("data", "truncated .gz", _fashion(lambda d: _truncate(d / "train-images-idx3-ubyte.gz")), 2,
         ("train-images-idx3-ubyte.gz", "--download")),
    Case("data", "bit-flipped .gz", _fashion(lambda d: _flip_bit(d / "train-images-idx3-ubyte.gz", 0.6)), 2,
         ("train-images-idx3-ubyte.gz", "--download")),
    Case("data", "labels outside [0, num_classes)", _fashion(_labels_out_of_range), 2, ("outside [0, 10)",)),
    Case("data", "images and labels counts differ", _fashion(_count_mismatch), 2, ("6 images but 5 labels",)),
    Case("data", "bad IDX header", _fashion(_bad_header), 2, ("not an IDX file",)),
    Case("data", "incomplete --data-dir", _fashion(lambda d: (d / "t10k-labels-idx1-ubyte.gz").unlink()), 1,
         ("incomplete", "t10k-labels-idx1-ubyte")),
    Case("data", "compare with an unknown dataset", _plain("compare", "--methods", "ce", "--data", "nope",
                                                           "--out", "/tmp/never"), 2, ("unknown dataset",)),
    Case("data", "compare with a damaged dataset", _fashion(_labels_out_of_range, cmd="compare"), 2,
         ("outside [0, 10)",)),
    Case("training", "--lr 1e6 (the loss turns NaN)", _train("--lr", "1e6", "--epochs", "2"), 1,
         ("NaN or infinite", "--lr"), check=_nan_recorded),
]


# ---------------------------------------------------------------------------------------------- running
def _invoke(argv: list[str], env: dict[str, str], in_subprocess: bool) -> tuple[int, str]:
    if in_subprocess:
        full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
        r = subprocess.run([sys.executable, "-m", "batchmates", *argv], capture_output=True, text=True, env=full,
                           timeout=900)
        return r.returncode, r.stdout + r.stderr
    from batchmates.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = int(e.code or 0)
        except BaseException:  # noqa: BLE001 - an escaped exception is what a user sees as a traceback
            import traceback

            buf.write(traceback.format_exc())
            code = 1
    return code, buf.getvalue()


def run_case(case: Case, scratch: Scratch) -> Outcome:
    """Stage and run ``case``; classify the reply (see the module docstring)."""
    if case.name == "--out read-only" and hasattr(os, "geteuid") and os.geteuid() == 0:
        return Outcome("skipped", 0, "root writes into read-only directories", 0.0, "running as root")
    argv = case.stage(scratch)
    env = dict(case.env)
    if case.no_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    with _no_gpu_here(case.no_gpu and not scratch.subprocess):
        code, text = _invoke(argv, env, scratch.subprocess)
    secs = time.perf_counter() - t0
    if "Traceback (most recent call last)" in text:
        return Outcome("traceback", code, text, secs)
    missing = [w for w in case.words if w not in text]
    extra = case.check(scratch, argv) if case.check is not None else ""
    if code == case.expect and not missing and not extra:
        return Outcome("clear", code, text, secs)
    if code == 0 and case.expect != 0:
        return Outcome("silent", code, text, secs, "exit status 0")
    return Outcome("unclear", code, text, secs, f"status {code} (want {case.expect}); missing {missing}; {extra}")


@contextlib.contextmanager
def _no_gpu_here(active: bool):
    if not active:
        yield
        return
    from batchmates.training import preflight

    saved = preflight.gpu_count
    preflight.gpu_count = lambda: 0
    try:
        yield
    finally:
        preflight.gpu_count = saved
