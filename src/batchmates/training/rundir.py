"""The run directory: what ``batchmates train`` writes to ``--out`` and how to read it back.

A run directory holds ``config.yaml`` (every setting, resolved), ``metrics.json`` (final results; ``finished``
is true once the run completed), ``metrics.csv`` (one row per epoch), ``last.ckpt`` (Lightning checkpoint with
the config and the :class:`~batchmates.config.DataInfo`), ``curves.png`` and TensorBoard logs under ``tb/``.

Paper: none (library infrastructure).

Library choices: every file is written atomically (:mod:`batchmates.io`); :func:`load_run` rebuilds the method
from the checkpoint alone (:meth:`~batchmates.methods.base.Method.from_checkpoint`) and loads the dataset only
because its callers evaluate on it. A process that writes a run directory (train, resume, eval) holds
:func:`run_lock`: an exclusive ``fcntl.flock`` on ``DIR/.lock``, which the operating system releases when the
process ends however it ends (no stale lock after a ``kill -9``); a second writer is refused with the first one's
PID and command; the holder first removes the temporary files of atomic writes a killed writer left behind. Only
rank 0 of a DDP run takes it. Where ``fcntl`` does not exist (Windows) nothing is locked.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from batchmates.config import CKPT_FILE, CONFIG_FILE, METRICS_FILE, RunConfig, RunError
from batchmates.io import atomic_write_text, read_json

__all__ = ["CONFIG_FILE", "METRICS_FILE", "CKPT_FILE", "LOCK_FILE", "RunError", "load_run", "read_config",
           "read_metrics", "is_finished", "finished_notice", "has_checkpoint", "write_metrics_csv", "run_lock"]

LOCK_FILE = ".lock"


def read_config(run_dir: str) -> RunConfig:
    """``run_dir/config.yaml`` as a :class:`RunConfig` (:class:`RunError` when the directory has none)."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise RunError(f"{run_dir!r} has no {CONFIG_FILE}; pass a directory written by `batchmates train`")
    return RunConfig.from_yaml(path)


def read_metrics(run_dir: str) -> dict[str, Any] | None:
    """``run_dir/metrics.json``, or None when it does not exist yet."""
    return read_json(os.path.join(run_dir, METRICS_FILE), None)


def is_finished(run_dir: str) -> bool:
    """Whether the run in ``run_dir`` completed (its ``metrics.json`` says ``finished``)."""
    m = read_metrics(run_dir)
    return bool(m and m.get("finished"))


def finished_notice(run_dir: str) -> str:
    """What ``--resume`` of the finished run in ``run_dir`` says (it changes nothing)."""
    m = read_metrics(run_dir) or {}
    return (f"{run_dir} is a finished run ({m.get('epochs_done', '?')} epochs, {m.get('steps', '?')} steps); nothing "
            "to resume, nothing changed. Pass --reevaluate to evaluate it again, or start a new run with --config "
            f"{os.path.join(run_dir, CONFIG_FILE)} --out NEW_DIR.")


def has_checkpoint(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, CKPT_FILE))


def load_run(run_dir: str, map_location: str = "cpu") -> tuple[Any, RunConfig, Any]:
    """Rebuild the trained method of ``run_dir`` and load its dataset: ``(method in eval mode, cfg, splits)``."""
    from batchmates.data import load_dataset
    from batchmates.methods import Method

    if not has_checkpoint(run_dir):
        raise RunError(f"{run_dir!r} has no {CKPT_FILE}; pass a directory written by `batchmates train`")
    model = Method.from_checkpoint(run_dir, map_location=map_location)  # checks the file first (verify_checkpoint)
    cfg = model.cfg
    splits = load_dataset(cfg.data, data_dir=cfg.data_dir, download=False, image_size=cfg.image_size)
    return model, cfg, splits


def write_metrics_csv(path: str, rows: list[dict[str, Any]]) -> None:
    """One line per epoch row (floats with 6 significant digits), written atomically; nothing for no rows."""
    if not rows:
        return
    buf = io.StringIO()
    keys = list(rows[0])
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


@contextlib.contextmanager
def run_lock(run_dir: str, *, purpose: str = "train") -> Iterator[None]:
    """Hold the exclusive write lock of ``run_dir`` (created if missing) for the ``with`` body.

    Raises :class:`RunError` naming the holder's PID and command when another process holds it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks
        yield
        return
    if not _is_rank_zero():
        yield
        return
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            raise RunError(
                f"{run_dir!r} is being written by another process (PID {holder.get('pid', '?')}: "
                f"`{holder.get('command', '?')}`, {holder.get('purpose', 'writing')} since "
                f"{holder.get('since', '?')}); wait for it to finish or stop it, or choose another --out"
            ) from None
        info = {"pid": os.getpid(), "command": " ".join(sys.argv) or sys.executable, "purpose": purpose,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _remove_stale_temporaries(run_dir)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _remove_stale_temporaries(run_dir: str) -> None:
    """Temporary files of atomic writes a killed process left behind (``.NAME.XXXX.tmp``); only the lock holder
    writes here, so none of them is in use."""
    for name in os.listdir(run_dir):
        if name.startswith(".") and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(run_dir, name))


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
