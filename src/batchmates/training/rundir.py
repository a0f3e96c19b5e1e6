"""The run directory: what ``batchmates train`` writes to ``--out`` and how to read it back.

A run directory holds ``config.yaml`` (every setting, resolved), ``metrics.json`` (final results; ``finished``
is true once the run completed), ``metrics.csv`` (one row per epoch), ``last.ckpt`` (Lightning checkpoint with
the config and the :class:`~batchmates.config.DataInfo`), ``curves.png`` and TensorBoard logs under ``tb/``.

Paper: none (library infrastructure).

Library choices: every file is written atomically (:mod:`batchmates.io`); :func:`load_run` rebuilds the method
from the checkpoint alone (:meth:`~batchmates.methods.base.Method.from_checkpoint`) and loads the dataset only
because its callers evaluate on it.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from batchmates.config import CKPT_FILE, CONFIG_FILE, METRICS_FILE, RunConfig, RunError
from batchmates.io import atomic_write_text, read_json

__all__ = ["CONFIG_FILE", "METRICS_FILE", "CKPT_FILE", "RunError", "load_run", "read_config", "read_metrics",
           "is_finished", "has_checkpoint", "write_metrics_csv"]


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


def has_checkpoint(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, CKPT_FILE))


def load_run(run_dir: str, map_location: str = "cpu") -> tuple[Any, RunConfig, Any]:
    """Rebuild the trained method of ``run_dir`` and load its dataset: ``(method in eval mode, cfg, splits)``."""
    from batchmates.data import load_dataset
    from batchmates.methods import Method

    if not has_checkpoint(run_dir):
        raise RunError(f"{run_dir!r} has no {CKPT_FILE}; pass a directory written by `batchmates train`")
    model = Method.from_checkpoint(run_dir, map_location=map_location)
    cfg = model.cfg
    splits = load_dataset(cfg.data, data_dir=cfg.data_dir, download=False)
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
