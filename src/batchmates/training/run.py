"""``train(cfg)``: one training run on Lightning, with every output written atomically to ``cfg.out``.

Outputs (``DIR = cfg.out``): ``config.yaml`` (every setting, concrete; rerun with ``batchmates train --config``),
``metrics.json`` (final test top-1, best per-epoch accuracy, per-epoch curve, wall time, hardware, versions,
seed), ``metrics.csv`` (per epoch), TensorBoard logs under ``tb/``, ``last.ckpt`` (every epoch and every
``checkpoint_every_n_steps`` steps; atomic), and ``curves.png``. ``resume(DIR)`` continues an interrupted run
from ``DIR/last.ckpt`` with the same config; it reproduces the uninterrupted run exactly (per-step seeding in
:class:`~batchmates.methods.base.Method`, loader position restored from the checkpoint, the interrupted epoch's
metric sums restored by :class:`~batchmates.training.callbacks.History`). A finished run is left as it is unless
``reevaluate=True``; evaluation results are merged into ``metrics.json``, never dropped.

A run directory is written by one process at a time (:func:`~batchmates.training.rundir.run_lock`); a run whose
loss turns NaN or infinite stops at that step (:class:`~batchmates.training.safety.NonFiniteGuard`), keeps its
last good checkpoint and records the failure in ``metrics.json`` (``finished: false``, ``failed``).

The pieces live beside this module: the data (:mod:`.data`, a ``LightningDataModule``), the callbacks
(:mod:`.callbacks`: history, throughput, per-step seeding) and the run-directory layout (:mod:`.rundir`,
``load_run``); this module wires them into a ``Trainer``.

Paper: none (library infrastructure).

Library choices: the per-epoch "val" accuracy is measured on the test split (there is no separate validation
split on these benchmarks); ``best_acc`` is therefore optimistic and reported only as a curve summary. The
headline number is ``test_acc``, the accuracy after the last epoch. ``config.yaml`` holds the method's resolved
options (no automatic values).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
import warnings
from typing import Any

import torch

from batchmates.config import ConfigError, RunConfig
from batchmates.io import atomic_write_json, read_json
from batchmates.training.data import apply_label_noise
from batchmates.training.rundir import (
    CKPT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    RunError,
    finished_notice,
    is_finished,
    load_run,
    run_lock,
    write_metrics_csv,
)

# apply_label_noise, load_run, write_metrics_csv and RunError moved to .data / .rundir; re-exported for old imports.
__all__ = ["train", "resume", "RunError", "apply_label_noise", "hardware_string", "load_run", "write_metrics_csv",
           "print_run_summary", "CONFIG_FILE", "METRICS_FILE", "CKPT_FILE"]


def hardware_string(accelerator: str = "cpu") -> str:
    """E.g. ``"CPU x86_64, 2 cores, 1 torch threads"`` or ``"NVIDIA H100 80GB HBM3 x1"``."""
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


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
                        ".*Trying to infer the `batch_size`.*", ".*sync_dist.*",
                        # runs written before callbacks.History kept its state under the old name (it is read)
                        ".*callbacks used to create the checkpoint need to be provided.*"):
                warnings.filterwarnings("ignore", message=pat)
        try:
            yield
        finally:
            for n, lvl in old.items():
                logging.getLogger(n).setLevel(lvl)


def _atomic_checkpoint_io():
    from batchmates.training.checkpoint_io import AtomicCheckpointIO

    return AtomicCheckpointIO()


def _progress_bar(enabled: bool):
    from batchmates.training.progress import progress_bar

    return progress_bar(enabled)


def _accelerator(cfg: RunConfig) -> str:
    if cfg.accelerator != "auto":
        return "gpu" if cfg.accelerator == "cuda" else cfg.accelerator
    return "gpu" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- train
def train(cfg: RunConfig, *, resume_from: str | None = None, overwrite: bool = False,
          verbose: bool = True, backbone: Any = None, train_dataset: Any = None,
          test_dataset: Any = None) -> dict[str, Any]:
    """Train ``cfg.method`` on ``cfg.data`` and write every output to ``cfg.out``; return the metrics dict.

    ``resume_from``: a checkpoint to continue from (see :func:`resume`). A fresh run refuses a directory that
    already holds a checkpoint unless ``overwrite`` (so a finished or interrupted run is never clobbered by
    accident). Every setting is validated before the dataset is loaded. Raises
    :class:`~batchmates.config.ConfigError` for invalid settings and ``DatasetNotFoundError`` (a
    ``FileNotFoundError``) for missing data.

    ``backbone``: an ``nn.Module`` (a timm or torchvision model, or any model mapping images to features) to train
    instead of ``cfg.backbone`` (recorded as ``module:CLASS``; reload it with ``Method.from_checkpoint(DIR,
    backbone=a_fresh_instance)``). ``train_dataset`` / ``test_dataset``: a user's torch ``Dataset`` s (items
    ``image`` or ``(image, label)``; see :func:`batchmates.data.datasets.custom.splits_from_datasets`), recorded
    as ``data: custom:NAME``; without ``test_dataset`` a fixed 20 % of the training set is held out.
    """
    import lightning as L

    from batchmates.methods import get_method
    from batchmates.methods.build import MODULE_SOURCE, rebuilding_from_checkpoint, using_backbone
    from batchmates.training.data import RunDataModule
    from batchmates.training.preflight import check_run_settings
    from batchmates.training.safety import NonFiniteLossError
    from batchmates.training.threads import choose_threads
    from batchmates.training.wiring import check_logger, compile_backbone, user_splits

    wall0 = time.perf_counter()
    method_cls = get_method(cfg.method)
    given_splits = user_splits(cfg, train_dataset, test_dataset)
    if given_splits is not None:
        cfg = cfg.replace(data=given_splits.name)
    if backbone is not None:
        cfg = cfg.replace(backbone=f"{MODULE_SOURCE}:{type(backbone).__module__}.{type(backbone).__qualname__}")
    cfg = cfg.resolve(method_cls)
    check_logger(cfg)
    check_run_settings(cfg)  # output directory, accelerator, strategy, precision: before any data is loaded
    out = cfg.out
    if resume_from is None:
        _refuse_existing_run(out, overwrite)
    torch.set_num_threads(choose_threads(cfg.threads, processes=cfg.devices if _accelerator(cfg) == "cpu" else 1))
    data = RunDataModule(cfg, given_splits)
    data.setup("fit")
    if data.info.num_classes == 0 and method_cls.supervised:
        raise ConfigError(f"method {cfg.method!r} trains on labels but {cfg.data!r} has none; use a self-supervised "
                          "method (simclr, swav, barlow) or a labelled dataset")
    prev = read_json(os.path.join(out, METRICS_FILE), {}) if resume_from else {}

    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_lightning(True))
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        with rebuilding_from_checkpoint() if resume_from else contextlib.nullcontext(), using_backbone(backbone):
            model = method_cls(cfg, data.info)  # resuming: the weights come from the checkpoint, not pretrained_path
        if cfg.compile:
            compile_backbone(model)
        model.steps_per_epoch = max(1, len(data.train_dataloader()))
        # only now: a setting the method rejects leaves no directory behind; held until every file is written
        stack.enter_context(run_lock(out, purpose="resume" if resume_from else "train"))
        if resume_from is None:
            _refuse_existing_run(out, overwrite)  # again, under the lock: another run may have finished meanwhile
        trainer, history = _trainer(cfg, model, verbose)
        if trainer.is_global_zero:
            model.resolved_config.to_yaml(os.path.join(out, CONFIG_FILE))
        try:
            trainer.fit(model, datamodule=data, ckpt_path=resume_from)
        except NonFiniteLossError as e:
            if trainer.is_global_zero:
                _record_failure(cfg, trainer, history, prev, e, wall=time.perf_counter() - wall0)
            raise

        if not trainer.is_global_zero:
            return {}
        model.to(trainer.strategy.root_device if trainer.strategy.root_device.type != "cpu" else "cpu")
        from batchmates.training.evaluate import evaluate_model
        from batchmates.training.progress import EvalProgress

        if data.info.num_classes > 0:
            with EvalProgress(cfg.eval_protocols, verbose):
                eval_results = evaluate_model(model, data.splits, cfg.eval_protocols,
                                              batch_size=max(cfg.batch_size, 256))
        else:  # unlabelled data: no protocol applies (the monitor's embedding rank is in metrics.csv)
            eval_results = {"accuracy": {"top1": None, "source": "none (unlabelled data)"}}
        # "resumed": training continued from a checkpoint (re-evaluating a finished run is not a resume)
        resumed = bool(prev.get("resumed")) or (resume_from is not None and not prev.get("finished"))
        metrics = _merge_metrics(prev, _metrics(cfg, trainer, history, eval_results, resumed=resumed,
                                                wall=time.perf_counter() - wall0 + float(prev.get("wall_time_s", 0.0))))
        atomic_write_json(os.path.join(out, METRICS_FILE), metrics)
        write_metrics_csv(os.path.join(out, "metrics.csv"), history.rows)
        try:
            from batchmates.training.plots import plot_curves

            plot_curves(history.rows, os.path.join(out, "curves.png"),
                        title=f"{cfg.method} on {cfg.data} (seed {cfg.seed})")
        except Exception as e:  # noqa: BLE001 - a plotting failure must not lose a finished run
            warnings.warn(f"could not write curves.png: {e}", stacklevel=2)
    if verbose:
        print_run_summary(metrics, out)
    return metrics


def _refuse_existing_run(out: str, overwrite: bool) -> None:
    if os.path.exists(os.path.join(out, CKPT_FILE)) and not overwrite:
        raise RunError(
            f"{out!r} already holds a run ({CKPT_FILE}); continue it with `batchmates train --resume {out}`, "
            "choose another --out, or pass --overwrite"
        )


def _merge_metrics(prev: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` over ``prev``: keys only ``prev`` has (e.g. ``eval_batch``) are kept, and so are evaluation results
    ``new`` does not recompute (e.g. ``eval["corruptions"]`` from ``batchmates eval --corruptions``)."""
    merged = {k: v for k, v in prev.items() if k != "failed"}
    merged.update(new)
    merged["eval"] = {**(prev.get("eval") or {}), **(new.get("eval") or {})}
    return merged


def _record_failure(cfg: RunConfig, trainer: Any, history: Any, prev: dict[str, Any], err: Any, *,
                    wall: float) -> None:
    """``metrics.json`` (``finished: false`` and ``failed``) and ``metrics.csv`` of a run stopped by a NaN/inf."""
    metrics = {k: v for k, v in prev.items() if k not in ("finished", "failed")}
    metrics.update({"method": cfg.method, "data": cfg.data, "seed": cfg.seed, "epochs_done": len(history.rows),
                    "steps": int(trainer.global_step), "curve": history.rows, "finished": False,
                    "threads": torch.get_num_threads(),
                    "wall_time_s": round(wall + float(prev.get("wall_time_s", 0.0)), 3),
                    "failed": {"reason": "non-finite", "what": err.what, "step": err.step, "epoch": err.epoch,
                               "message": str(err)}})
    atomic_write_json(os.path.join(cfg.out, METRICS_FILE), metrics)
    write_metrics_csv(os.path.join(cfg.out, "metrics.csv"), history.rows)


def _trainer(cfg: RunConfig, model: Any, verbose: bool) -> tuple[Any, Any]:
    """The Lightning ``Trainer`` of a run (checkpoints, logger, callbacks) and its :class:`History` callback."""
    import lightning as L

    from batchmates.training.callbacks import History, StepSeeding, Throughput
    from batchmates.training.monitor import EmbeddingMonitor
    from batchmates.training.safety import NonFiniteGuard, RunCheckpoint
    from batchmates.training.wiring import make_logger, monitor_every

    out = cfg.out
    history = History(out)
    # NonFiniteGuard before the checkpoints (Lightning runs ModelCheckpoints last): a NaN step is never saved
    callbacks: list[Any] = [history, StepSeeding(cfg.seed), Throughput(),
                            NonFiniteGuard(cfg.checkpoint_every_n_steps, lr=cfg.lr)]
    every = monitor_every(cfg, model)
    if every > 0:  # before History: its row of the epoch reads what the monitor logged
        callbacks.insert(0, EmbeddingMonitor(every, batch_size=max(cfg.batch_size, 256)))
    callbacks.append(RunCheckpoint(os.path.join(out, CKPT_FILE), cfg.checkpoint_every_n_steps))
    bar = _progress_bar(cfg.progress and verbose)
    if bar is not None:
        callbacks.append(bar)
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        accelerator=_accelerator(cfg),
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        sync_batchnorm=cfg.sync_bn,
        strategy=cfg.strategy,
        precision=cfg.precision,
        deterministic=cfg.deterministic,
        logger=make_logger(cfg),
        callbacks=callbacks,
        plugins=[_atomic_checkpoint_io()],
        default_root_dir=out,
        num_sanity_val_steps=0,
        enable_progress_bar=bar is not None,
        enable_model_summary=False,
        log_every_n_steps=10,
        limit_val_batches=1.0 if model.has_classifier else 0,
    )
    return trainer, history


def _metrics(cfg: RunConfig, trainer: Any, history: Any, eval_results: dict[str, Any], *, resumed: bool,
             wall: float) -> dict[str, Any]:
    """The content of ``metrics.json`` for a finished run."""
    import lightning as L

    rows = history.rows
    val_accs = [r["val_acc"] for r in rows if not math.isnan(r.get("val_acc", math.nan))]
    best_i = max(range(len(val_accs)), key=lambda i: val_accs[i]) if val_accs else None
    return {
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
        "resumed": resumed,
        "hardware": hardware_string(_accelerator(cfg)),
        "precision": str(trainer.precision),  # what ran (Lightning may substitute a precision the device lacks)
        "devices": cfg.devices,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "label_noise": cfg.label_noise,
        "curve": rows,
        "eval": dict(eval_results),
        "finished": True,
    }


def print_run_summary(metrics: dict[str, Any], out: str) -> None:
    from rich.console import Console

    ev = metrics.get("eval", {})
    acc = metrics["test_acc"]
    parts = [f"test top-1 [bold]{acc:.4f}[/] ({metrics['accuracy_source']})" if acc is not None
             else f"no test accuracy ({metrics['accuracy_source']})"]
    if "top1_flip_tta" in ev.get("accuracy", {}):
        parts.append(f"with flip TTA {ev['accuracy']['top1_flip_tta']:.4f}")
    if "knn" in ev:
        parts.append(f"kNN k=20 {ev['knn']['k20']:.4f}, k=200 {ev['knn']['k200']:.4f}")
    if "linear" in ev and metrics["accuracy_source"] != "linear_probe":
        parts.append(f"linear probe {ev['linear']['top1']:.4f}")
    parts.append(f"{metrics['epochs_done']} epochs / {metrics['steps']} steps in {metrics['train_time_s']:.1f} s")
    con = Console()
    con.print(f"[bold]{metrics['method']}[/] on {metrics['data']} (seed {metrics['seed']}): " + "; ".join(parts))
    con.print(f"hardware: {metrics['hardware']}; outputs in [bold]{out}[/] "
              "(metrics.json, metrics.csv, curves.png, last.ckpt, tb/)")


def resume(run_dir: str, *, verbose: bool = True, backbone: Any = None, reevaluate: bool = False,
           train_dataset: Any = None, test_dataset: Any = None, **overrides: Any) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from ``run_dir/last.ckpt`` with its saved ``config.yaml`` (``backbone``: a
    fresh instance of the module a ``train(cfg, backbone=...)`` run was given; ``train_dataset`` /
    ``test_dataset``: the same ``Dataset`` s a ``train(cfg, train_dataset=...)`` run was given).

    A finished run is left untouched and its ``metrics.json`` returned (with a message when ``verbose``), unless
    ``reevaluate``: then it is evaluated again and the results are merged into ``metrics.json``.
    """
    from batchmates.training.preflight import check_checkpoint_file, check_config_file

    cfg_path = os.path.join(run_dir, CONFIG_FILE)
    ckpt = os.path.join(run_dir, CKPT_FILE)
    if not os.path.isdir(run_dir):
        raise RunError(f"--resume {run_dir!r}: no such directory; pass the --out directory of an earlier run")
    if not os.path.exists(cfg_path):
        raise RunError(f"--resume {run_dir!r}: no {CONFIG_FILE} there; is it a batchmates run directory?")
    if not os.path.exists(ckpt):
        raise RunError(f"--resume {run_dir!r}: no {CKPT_FILE} yet (the run stopped before its first checkpoint); "
                       "start it again without --resume")
    check_config_file(cfg_path)
    if is_finished(run_dir) and not reevaluate:
        if verbose:
            print(finished_notice(run_dir), flush=True)
        return read_json(os.path.join(run_dir, METRICS_FILE), {})
    check_checkpoint_file(ckpt)
    cfg = RunConfig.from_yaml(cfg_path).replace(out=run_dir, **overrides)
    given = _same_user_data(run_dir, cfg, train_dataset, test_dataset)
    return train(cfg, resume_from=ckpt, verbose=verbose, backbone=backbone, train_dataset=given)


def _same_user_data(run_dir: str, cfg: RunConfig, train_dataset: Any, test_dataset: Any) -> Any:
    """The user's datasets for resuming a ``custom:NAME`` run, checked against the name the run recorded."""
    from batchmates.training.wiring import user_splits

    custom = cfg.data.startswith("custom:")
    if custom and train_dataset is None:
        raise RunError(f"resume {run_dir!r}: the run trained on a torch Dataset of yours ({cfg.data}); pass the same "
                       "ones back: resume(RUN_DIR, train_dataset=..., test_dataset=...) (the CLI cannot)")
    given = user_splits(cfg, train_dataset, test_dataset)
    if given is not None and given.name != cfg.data:
        raise RunError(f"resume {run_dir!r}: the run trained on {cfg.data!r}, but train_dataset is {given.name!r}; "
                       "pass the datasets the run was started with")
    return given
