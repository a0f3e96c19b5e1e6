"""``train(cfg)``: one training run on Lightning, with every output written atomically to ``cfg.out``.

Outputs (``DIR = cfg.out``): ``config.yaml`` (every setting, concrete; rerun with ``batchmates train --config``),
``metrics.json`` (final test top-1, best per-epoch accuracy, per-epoch curve, wall time, hardware, versions,
seed), ``metrics.csv`` (per epoch), TensorBoard logs under ``tb/``, ``last.ckpt`` (every epoch and every
``checkpoint_every_n_steps`` steps; atomic), and ``curves.png``. ``resume(DIR)`` continues an interrupted run
from ``DIR/last.ckpt`` with the same config; it reproduces the uninterrupted run exactly (per-step seeding in
:class:`~batchmates.methods.base.Method`, loader position restored from the checkpoint).

The per-epoch "val" accuracy is measured on the test split (there is no separate validation split on these
benchmarks); ``best_acc`` is therefore optimistic and reported only as a curve summary. The headline number
is ``test_acc``, the accuracy after the last epoch. Library design; no paper involved.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import replace
from typing import Any

import torch

from batchmates.training.config import ConfigError, RunConfig
from batchmates.training.io import atomic_write_json, atomic_write_text, read_json

__all__ = ["train", "resume", "RunError", "apply_label_noise", "hardware_string", "load_run"]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CKPT_FILE = "last.ckpt"


class RunError(RuntimeError):
    """A run cannot start or continue (e.g. resuming a directory without a checkpoint)."""


# ---------------------------------------------------------------------------------------------- helpers
def hardware_string(accelerator: str = "cpu") -> str:
    """E.g. ``"CPU x86_64, 2 cores, 1 torch threads"`` or ``"NVIDIA H100 80GB HBM3 x1"``."""
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def apply_label_noise(labels: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """Symmetric label noise: exactly ``round(fraction·N)`` labels, chosen by ``seed``, moved to a different class
    drawn uniformly from the other ``num_classes - 1`` (library choice; the usual "symmetric" protocol)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"label_noise must be in [0, 1), got {fraction}")
    labels = labels.clone()
    n = labels.shape[0]
    k = int(round(fraction * n))
    if k == 0 or num_classes < 2:
        return labels
    g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    idx = torch.randperm(n, generator=g)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=g)
    labels[idx] = (labels[idx] + shift) % num_classes
    return labels


def _noisy_train_split(train: Any, cfg: RunConfig, num_classes: int) -> Any:
    if cfg.label_noise <= 0:
        return train
    if not (hasattr(train, "images") and hasattr(train, "labels")):
        raise ConfigError(f"label_noise is supported for in-memory datasets only; {cfg.data!r} is not one")
    noisy = apply_label_noise(train.labels, cfg.label_noise, num_classes, cfg.seed)
    try:
        return replace(train, labels=noisy)
    except TypeError:
        return type(train)(train.images, noisy)


def _make_loaders(splits: Any, cfg: RunConfig) -> tuple[Any, Any]:
    """Train loader (global batch ``cfg.batch_size`` split evenly over ``cfg.devices`` ranks, shuffled by
    ``(seed, epoch)``, last incomplete batch dropped so batch-relational losses always see full batches) and
    the test loader (whole test set on every rank, in order)."""
    from batchmates.data import make_loader

    if cfg.batch_size % cfg.devices:
        raise ConfigError(f"batch_size={cfg.batch_size} is the global batch and must be divisible by "
                          f"devices={cfg.devices}; pick a multiple of {cfg.devices}")
    per_rank = cfg.batch_size // cfg.devices
    train = _noisy_train_split(splits.train, cfg, int(splits.num_classes))
    extra: dict[str, Any] = {}
    if not hasattr(train, "images"):
        extra = {"num_workers": cfg.num_workers}
    n_train = len(train)
    if n_train < cfg.batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the training set ({n_train} images) of "
                          f"{cfg.data!r}; use a smaller --batch-size")
    train_loader = make_loader(train, per_rank, shuffle=True, drop_last=True, seed=cfg.seed, **extra)
    test_extra: dict[str, Any] = {"num_replicas": 1, "rank": 0} if hasattr(splits.test, "images") else extra
    test_loader = make_loader(splits.test, max(per_rank, 256), shuffle=False, drop_last=False, seed=cfg.seed,
                              **test_extra)
    return train_loader, _PlainIterable(test_loader)


class _PlainIterable:
    """Hides a loader's ``sampler`` from Lightning's evaluation-loader checks (which expect a torch DataLoader
    with ``batch_sampler`` once a ``sampler`` attribute exists); iteration and ``len`` pass through."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __iter__(self):
        return iter(self._loader)

    def __len__(self) -> int:
        return len(self._loader)


@contextlib.contextmanager
def _quiet_lightning(enabled: bool):
    """Silence Lightning's info chatter (GPU available..., model summary) while keeping warnings that matter."""
    import logging

    names = ["lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning"]
    old = {n: logging.getLogger(n).level for n in names}
    if enabled:
        for n in names:
            logging.getLogger(n).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        if enabled:
            for pat in (".*does not have many workers.*", ".*LeafSpec.*", ".*is an invalid version.*",
                        ".*Checkpoint directory.*exists and is not empty.*", ".*_pytree.*",
                        ".*Trying to infer the `batch_size`.*", ".*sync_dist.*"):
                warnings.filterwarnings("ignore", message=pat)
        try:
            yield
        finally:
            for n, lvl in old.items():
                logging.getLogger(n).setLevel(lvl)


def _history_callback_cls():
    import lightning as L

    class History(L.Callback):
        """Collects one row of metrics per epoch and writes metrics.csv / a partial metrics.json atomically.

        Its state (rows so far, training seconds) is part of the checkpoint, so a resumed run keeps its curve.
        """

        def __init__(self, out: str) -> None:
            self.out = out
            self.rows: list[dict[str, Any]] = []
            self.train_seconds = 0.0
            self._t0: float | None = None

        def state_dict(self) -> dict[str, Any]:
            secs = self.train_seconds + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)
            return {"rows": list(self.rows), "train_seconds": secs}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.rows = list(state.get("rows", []))
            self.train_seconds = float(state.get("train_seconds", 0.0))

        def on_train_start(self, trainer, pl_module) -> None:
            self._t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module) -> None:
            if self._t0 is not None:
                self.train_seconds += time.perf_counter() - self._t0
                self._t0 = None

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
            row: dict[str, Any] = {"epoch": int(trainer.current_epoch) + 1, "step": int(trainer.global_step)}
            row["train_loss"] = m.get("train/loss_epoch", m.get("train/loss", math.nan))
            row["train_acc"] = m.get("train/acc", math.nan)
            row["val_loss"] = m.get("val/loss", math.nan)
            row["val_acc"] = m.get("val/acc", math.nan)
            opt = trainer.optimizers[0] if trainer.optimizers else None
            row["lr"] = float(opt.param_groups[0]["lr"]) if opt is not None else math.nan
            # Extra per-epoch training metrics a method logs with log_train(..., key=value) (e.g. frac_dropped).
            for k, v in m.items():
                name = k[len("train/"):] if k.startswith("train/") else ""
                if name and name not in ("loss", "loss_step", "loss_epoch", "acc") and not name.endswith("_step"):
                    row[name.removesuffix("_epoch")] = v
            row["time_s"] = round(self.state_dict()["train_seconds"], 3)
            self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
            if trainer.is_global_zero:
                write_metrics_csv(os.path.join(self.out, "metrics.csv"), self.rows)

    return History


def write_metrics_csv(path: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    keys = list(rows[0])
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def _atomic_checkpoint_io():
    from batchmates.training.checkpoint_io import AtomicCheckpointIO

    return AtomicCheckpointIO()


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    if sys.stdout.isatty():
        from lightning.pytorch.callbacks import RichProgressBar

        return RichProgressBar(leave=True)
    from lightning.pytorch.callbacks import TQDMProgressBar

    return TQDMProgressBar(refresh_rate=50)


def _accelerator(cfg: RunConfig) -> str:
    if cfg.accelerator != "auto":
        return "gpu" if cfg.accelerator == "cuda" else cfg.accelerator
    return "gpu" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- train
def train(cfg: RunConfig, *, resume_from: str | None = None, overwrite: bool = False,
          verbose: bool = True) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.data`` and write every output to ``cfg.out``; return the metrics dict.

    ``resume_from``: a checkpoint to continue from (see :func:`resume`). A fresh run refuses a directory that
    already holds a checkpoint unless ``overwrite`` (so a finished or interrupted run is never clobbered by
    accident). Raises :class:`~batchmates.training.config.ConfigError` for invalid settings and
    ``DatasetNotFoundError`` (a ``FileNotFoundError``) for missing data.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from batchmates.data import load_dataset
    from batchmates.methods import DataInfo, get_method

    wall0 = time.perf_counter()
    method_cls = get_method(cfg.method)
    cfg = cfg.resolve(method_cls)
    out = cfg.out
    ckpt = os.path.join(out, CKPT_FILE)
    if resume_from is None and os.path.exists(ckpt) and not overwrite:
        raise RunError(
            f"{out!r} already holds a run ({CKPT_FILE}); continue it with `batchmates train --resume {out}`, "
            "choose another --out, or pass --overwrite"
        )
    os.makedirs(out, exist_ok=True)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)

    splits = load_dataset(cfg.data, data_dir=cfg.data_dir, download=cfg.download)
    info = DataInfo.from_splits(splits)
    prev = read_json(os.path.join(out, METRICS_FILE), {}) if resume_from else {}

    with _quiet_lightning(True):
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        train_loader, test_loader = _make_loaders(splits, cfg)
        model = method_cls(cfg, info)
        model.steps_per_epoch = max(1, len(train_loader))
        history = _history_callback_cls()(out)
        callbacks: list[Any] = [history]
        if cfg.checkpoint_every_n_steps > 0:
            callbacks.append(ModelCheckpoint(dirpath=out, save_last=True, save_top_k=0, enable_version_counter=False,
                                             every_n_train_steps=cfg.checkpoint_every_n_steps))
        callbacks.append(ModelCheckpoint(dirpath=out, save_last=True, save_top_k=0, enable_version_counter=False,
                                         every_n_epochs=1, save_on_train_epoch_end=True))
        bar = _progress_bar(cfg.progress and verbose)
        if bar is not None:
            callbacks.append(bar)
        logger = TensorBoardLogger(save_dir=out, name="tb", version="", default_hp_metric=False)
        trainer = L.Trainer(
            max_epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            accelerator=_accelerator(cfg),
            devices=cfg.devices,
            strategy=cfg.strategy,
            precision=cfg.precision,
            deterministic=cfg.deterministic,
            logger=logger,
            callbacks=callbacks,
            plugins=[_atomic_checkpoint_io()],
            default_root_dir=out,
            num_sanity_val_steps=0,
            enable_progress_bar=bar is not None,
            enable_model_summary=False,
            log_every_n_steps=10,
            limit_val_batches=1.0 if model.has_classifier else 0,
        )
        if trainer.is_global_zero:
            cfg.to_yaml(os.path.join(out, CONFIG_FILE))
        trainer.fit(model, train_dataloaders=train_loader,
                    val_dataloaders=test_loader if model.has_classifier else None, ckpt_path=resume_from)

    if not trainer.is_global_zero:
        return {}
    model.to(trainer.strategy.root_device if trainer.strategy.root_device.type != "cpu" else "cpu")
    from batchmates.training.evaluate import evaluate_model

    eval_results = evaluate_model(model, splits, cfg.eval_protocols, batch_size=max(cfg.batch_size, 256))
    rows = history.rows
    val_accs = [r["val_acc"] for r in rows if not math.isnan(r.get("val_acc", math.nan))]
    best_i = max(range(len(val_accs)), key=lambda i: val_accs[i]) if val_accs else None
    wall = time.perf_counter() - wall0 + float(prev.get("wall_time_s", 0.0))
    metrics: dict[str, Any] = {
        "method": cfg.method,
        "data": cfg.data,
        "backbone": cfg.backbone,
        "attn_layer": cfg.attn_layer,
        "seed": cfg.seed,
        "test_acc": eval_results["accuracy"]["top1"],
        "accuracy_source": eval_results["accuracy"]["source"],
        "best_acc": max(val_accs) if val_accs else eval_results["accuracy"]["top1"],
        "best_epoch": (rows[best_i]["epoch"] if best_i is not None else len(rows)),
        "epochs_done": len(rows),
        "steps": int(trainer.global_step),
        "train_time_s": round(history.train_seconds, 3),
        "wall_time_s": round(wall, 3),
        "resumed": bool(resume_from) or bool(prev.get("resumed", False)),
        "hardware": hardware_string(_accelerator(cfg)),
        "precision": cfg.precision,
        "devices": cfg.devices,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "label_noise": cfg.label_noise,
        "curve": rows,
        "eval": {k: v for k, v in eval_results.items()},
        "finished": True,
    }
    atomic_write_json(os.path.join(out, METRICS_FILE), metrics)
    write_metrics_csv(os.path.join(out, "metrics.csv"), rows)
    try:
        from batchmates.training.plots import plot_curves

        plot_curves(rows, os.path.join(out, "curves.png"), title=f"{cfg.method} on {cfg.data} (seed {cfg.seed})")
    except Exception as e:  # noqa: BLE001 - a plotting failure must not lose a finished run
        warnings.warn(f"could not write curves.png: {e}", stacklevel=2)
    if verbose:
        print_run_summary(metrics, out)
    return metrics


def print_run_summary(metrics: dict[str, Any], out: str) -> None:
    from rich.console import Console

    ev = metrics.get("eval", {})
    parts = [f"test top-1 [bold]{metrics['test_acc']:.4f}[/] ({metrics['accuracy_source']})"]
    if "knn" in ev:
        parts.append(f"kNN k=20 {ev['knn']['k20']:.4f}, k=200 {ev['knn']['k200']:.4f}")
    if "linear" in ev and metrics["accuracy_source"] != "linear_probe":
        parts.append(f"linear probe {ev['linear']['top1']:.4f}")
    parts.append(f"{metrics['epochs_done']} epochs / {metrics['steps']} steps in {metrics['train_time_s']:.1f} s")
    con = Console()
    con.print(f"[bold]{metrics['method']}[/] on {metrics['data']} (seed {metrics['seed']}): " + "; ".join(parts))
    con.print(f"hardware: {metrics['hardware']}; outputs in [bold]{out}[/] "
              "(metrics.json, metrics.csv, curves.png, last.ckpt, tb/)")


def resume(run_dir: str, *, verbose: bool = True, **overrides: Any) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from ``run_dir/last.ckpt`` with its saved ``config.yaml``."""
    cfg_path = os.path.join(run_dir, CONFIG_FILE)
    ckpt = os.path.join(run_dir, CKPT_FILE)
    if not os.path.exists(cfg_path):
        raise RunError(f"--resume {run_dir!r}: no {CONFIG_FILE} there; is it a batchmates run directory?")
    if not os.path.exists(ckpt):
        raise RunError(f"--resume {run_dir!r}: no {CKPT_FILE} yet (the run stopped before its first checkpoint); "
                       "start it again without --resume")
    cfg = RunConfig.from_yaml(cfg_path).replace(out=run_dir, **overrides)
    return train(cfg, resume_from=ckpt, verbose=verbose)


def load_run(run_dir: str, map_location: str = "cpu") -> tuple[Any, RunConfig, Any]:
    """Rebuild the trained method of ``run_dir`` from its config and ``last.ckpt``: ``(method, cfg, splits)``."""
    from batchmates.data import load_dataset
    from batchmates.methods import DataInfo, get_method

    cfg_path = os.path.join(run_dir, CONFIG_FILE)
    ckpt = os.path.join(run_dir, CKPT_FILE)
    for p in (cfg_path, ckpt):
        if not os.path.exists(p):
            raise RunError(f"{run_dir!r} has no {os.path.basename(p)}; pass a directory written by `batchmates train`")
    cfg = RunConfig.from_yaml(cfg_path)
    method_cls = get_method(cfg.method)
    splits = load_dataset(cfg.data, data_dir=cfg.data_dir, download=False)
    info = DataInfo.from_splits(splits)
    model = method_cls(cfg, info)
    state = torch.load(ckpt, map_location=map_location, weights_only=False)
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model, cfg, splits


__all__ += ["write_metrics_csv", "print_run_summary", "CONFIG_FILE", "METRICS_FILE", "CKPT_FILE"]
_ = atomic_write_json  # re-exported helper used by evaluate/compare
