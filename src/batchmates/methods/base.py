"""``Method``: the LightningModule every trainable batchmates method derives from.

How to add a method (one file plus one import line in ``methods/__init__.py``)::

    from batchmates.config import Option
    from batchmates.methods.base import Method
    from batchmates.methods.registry import register_method

    @register_method("mymethod")
    class MyMethod(Method):
        '''One line on what it does (cite the arXiv id).'''
        supervised = False            # uses labels during training?
        batch_relational = True       # does the loss/model relate samples of the batch? (then batch_size >= 2)
        options = {"temperature": Option(float, 0.1, "softmax temperature", minimum=1e-6),
                   "width": Option(int, 0, "head width (0: the backbone's feature width)", minimum=0)}

        def __init__(self, cfg, info):
            super().__init__(cfg, info)           # builds self.backbone and the train augmentation
            width = self.resolve_option("width", self.opts["width"] or self.backbone.feature_dim)
            self.head = torch.nn.Linear(self.backbone.feature_dim, width)
            self.loss_fn = MyLoss(self.opts["temperature"])

        def build_train_augment(self):            # optional: e.g. two SimCLR views
            return TwoViews(self.make_augment("simclr"), self.make_augment("simclr"))

        def training_step(self, batch, batch_idx):
            x, y = batch                           # uint8 images on the device, int64 labels
            v1, v2 = self.train_views(x)           # float, normalised, random per (seed, step)
            loss = self.loss_fn(...)
            self.log_train(loss, batch_size=x.shape[0])
            return loss

        # embed(x) -> [N, D] features for kNN / linear probe: default = backbone features
        # classify(x) -> logits or None: default None (then the trainer fits a linear probe for "accuracy")

Hooks a subclass may override (all optional except ``training_step``):

* ``default_settings(data)`` (classmethod): per-dataset defaults (backbone, epochs, batch size, lr, optimizer,
  weight decay, warm-up) for settings the user left unset; start from ``super().default_settings(data)``.
* ``check_config(cfg)`` (classmethod): checks of a resolved config that need the method (call ``super()``);
  run before any run starts.
* ``supports(data)`` (classmethod): whether the method makes sense on ``data`` (``--methods all`` uses it).
* ``build_backbone()``, ``build_train_augment()``, ``train_views(x_uint8)``, ``embed(x)``, ``classify(x)``,
  ``parameter_groups()`` (to give some parameters another lr or no weight decay).

An option whose default means "the method chooses" (``0`` = automatic width, ...) records the value it resolved
to with :meth:`Method.resolve_option`, so ``config.yaml`` and the checkpoint hold the concrete value
(:attr:`Method.resolved_config`).

Paper: none (the methods' papers are cited in their own modules).

Library choices: backbone creation (:func:`batchmates.models.create_backbone` with the run's ``attn_layer``), the
augmentation on the training device (uint8 batch in, normalised float views out), SGD-momentum/AdamW with linear
warm-up then per-step cosine decay, validation/test top-1 of ``classify`` (on the clean, normalised test images,
in eval mode, with every batch-relational module in its ``eval_mode``, ``"independent"`` by default), logging of
loss and accuracy (epoch means as running sums on the device, logged once per epoch:
:mod:`batchmates.methods.train_metrics`), and :meth:`Method.from_checkpoint` (rebuilds a trained method from the
config and dataset facts every checkpoint stores, without loading the dataset). The trainer adds per-step seeding
and throughput as callbacks (:mod:`batchmates.training.callbacks`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from batchmates.config import CKPT_FILE, DEFAULT_SETTINGS, ConfigError, DataInfo, Option, RunConfig, RunError
from batchmates.config import dataset_defaults as _dataset_defaults
from batchmates.io import verify_checkpoint
from batchmates.methods.registry import get_method
from batchmates.methods.train_metrics import EpochMeans
from batchmates.models import set_eval_mode
from batchmates.seeding import step_seed

# DataInfo, DEFAULT_SETTINGS, step_seed and set_eval_mode live below this floor; re-exported for old imports.
__all__ = ["Method", "DataInfo", "set_eval_mode", "step_seed", "warmup_cosine", "DEFAULT_SETTINGS"]


class Method(L.LightningModule):
    """Base class of every trainable method; see the module docstring for how to write one."""

    name: ClassVar[str] = "?"
    supervised: ClassVar[bool] = True
    batch_relational: ClassVar[bool] = False
    options: ClassVar[dict[str, Option]] = {}
    datasets: ClassVar[tuple[str, ...] | None] = None  # None: every dataset
    cached_accumulation: ClassVar[bool] = False  # supports --accumulate N > 1 (exact cached accumulation)
    summary: ClassVar[str] = ""

    # ------------------------------------------------------------------ class-level configuration
    @classmethod
    def default_settings(cls, data: str) -> dict[str, Any]:
        """Defaults for the run settings left ``None`` (backbone, epochs, batch_size, lr, ...) on ``data``."""
        return _dataset_defaults(data)

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Checks of a resolved ``cfg`` that need this method or the registries, before anything runs.

        The base checks the batch size of batch-relational methods and that ``data``, ``backbone`` and
        ``attn_layer`` name registered datasets, backbones and attention layers (nothing is loaded or built;
        a foreign backbone ``SOURCE:NAME`` is checked when it is built).
        """
        if cls.batch_relational and cfg.batch_size < 2:
            raise ConfigError(
                f"batch_size must be >= 2 for the batch-relational method {cfg.method!r} (got {cfg.batch_size})"
            )
        from batchmates.data.datasets import resolve_dataset
        from batchmates.models import available_attn_layers, available_backbones

        try:
            source, _ = resolve_dataset(cfg.data)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"data={cfg.data!r}: {e}") from None
        if cls.supervised and not getattr(source, "labeled", True):
            raise ConfigError(f"method {cfg.method!r} trains on labels but data={cfg.data!r} has none; use a "
                              "self-supervised method (simclr, swav, barlow) or labelled data (--data)")
        if cfg.pretrained_path and ":" not in cfg.backbone:
            raise ConfigError(f"pretrained_path loads the weights of a timm:NAME or torchvision:NAME backbone, not of "
                              f"batchmates' own {cfg.backbone!r}; drop --pretrained-path or pass e.g. "
                              "--backbone timm:resnet18")
        if cfg.accumulate > 1 and not cls.cached_accumulation:
            raise ConfigError(f"accumulate={cfg.accumulate}: cached accumulation is exact for the contrastive methods "
                              f"(supcon, simclr) only, not for {cfg.method!r}; drop --accumulate (or lower "
                              "--batch-size)")
        attn_layers = ["none", *(n for n in available_attn_layers() if n != "none")]
        for name, value, known in (("backbone", cfg.backbone, available_backbones()),
                                   ("attn_layer", cfg.attn_layer, attn_layers)):
            if name == "backbone" and ":" in value:
                continue  # a foreign backbone (timm:NAME, torchvision:NAME): checked when it is built
            if value not in known:
                raise ConfigError(f"{name}={value!r} is not registered; choose one of {known} "
                                  f"(--{name.replace('_', '-')})")

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, map_location: Any = "cpu",
                        backbone: nn.Module | None = None) -> Method:
        """Rebuild the trained method of a checkpoint file, or of a run directory's ``last.ckpt``, in eval mode.

        The dataset is not loaded: every checkpoint stores the resolved config and the :class:`DataInfo`.
        ``cfg.out`` becomes the directory the checkpoint was read from. On a subclass, the checkpoint must hold
        that method. A timm/torchvision backbone is rebuilt from the recorded ``backbone_spec`` (``pretrained_path``
        is not read); a run trained on a user's module needs a fresh instance of it as ``backbone``.
        Checkpoints are pickles: load only files you trust.
        """
        from batchmates.methods.build import rebuilding_from_checkpoint, using_backbone

        path = os.fspath(path)
        ckpt = os.path.join(path, CKPT_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(ckpt):
            raise RunError(f"{path!r} has no {CKPT_FILE}; pass a run directory written by `batchmates train` or "
                           "its checkpoint file")
        verify_checkpoint(ckpt)  # truncated or bit-flipped: a RunError naming the file (torch.load may not notice)
        state = torch.load(ckpt, map_location=map_location, weights_only=False)
        meta = state.get("batchmates") if isinstance(state, dict) else None
        if not isinstance(meta, dict) or not {"cfg", "info"} <= set(meta):
            raise RunError(f"{ckpt!r} is not a batchmates checkpoint (it lacks the 'batchmates' entry with the "
                           "run config and dataset facts)")
        out = path if os.path.isdir(path) else (os.path.dirname(ckpt) or ".")
        cfg = RunConfig.from_dict(meta["cfg"]).replace(out=out)
        method_cls = get_method(meta.get("method", cfg.method))
        if not issubclass(method_cls, cls):
            raise RunError(f"{ckpt!r} holds a {method_cls.name!r} run, not a {cls.__name__}; use "
                           "Method.from_checkpoint to load any method")
        with rebuilding_from_checkpoint(), using_backbone(backbone):
            model = method_cls(cfg, DataInfo.from_dict(meta["info"]))
        model.load_state_dict(state["state_dict"])
        return model.eval()

    @classmethod
    def supports(cls, data: str) -> bool:
        """Whether this method applies to dataset ``data`` (``--methods all`` trains only supporting methods)."""
        base = data.split(":", 1)[0]
        return cls.datasets is None or data in cls.datasets or base in cls.datasets

    @classmethod
    def parse_options(cls, raw: dict[str, Any] | None) -> dict[str, Any]:
        """Validate ``--opt`` values against :attr:`options`; return every option with defaults filled in."""
        raw = dict(raw or {})
        unknown = sorted(k for k in raw if k not in cls.options)
        if unknown:
            listing = cls.describe_options() or "  (this method has no options)"
            raise ConfigError(f"unknown option(s) {unknown} for method {cls.name!r}; its options are:\n{listing}")
        return {k: opt.parse(k, raw[k]) if k in raw else opt.default for k, opt in cls.options.items()}

    @classmethod
    def describe_options(cls) -> str:
        return "\n".join(f"  {k}: {opt.describe()}" for k, opt in cls.options.items())

    @classmethod
    def describe(cls) -> str:
        doc = cls.summary or ((cls.__doc__ or "").strip().splitlines() or [""])[0]
        kind = "supervised" if cls.supervised else "self-supervised"
        rel = ", batch-relational" if cls.batch_relational else ""
        return f"{cls.name} ({kind}{rel}): {doc}"

    # ------------------------------------------------------------------ construction
    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__()
        if not isinstance(cfg, RunConfig):
            raise TypeError(f"cfg must be a RunConfig, got {type(cfg).__name__}")
        if not isinstance(info, DataInfo):
            raise TypeError(f"info must be a DataInfo, got {type(info).__name__}")
        self.cfg = cfg
        self.info = info
        self.opts: dict[str, Any] = type(self).parse_options(cfg.options)
        self.register_buffer("_mean", torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.backbone = self.build_backbone()
        self.train_augment = self.build_train_augment()
        self.steps_per_epoch: int | None = None  # optimiser steps per epoch; set by the trainer (run.py)
        self.train_means = EpochMeans()  # running sums of log_train's values, logged at the epoch's last step

    def resolve_option(self, key: str, value: Any) -> Any:
        """Record the concrete ``value`` an automatic option (e.g. ``0`` = "the feature width") resolved to.

        Returns the parsed value. :attr:`resolved_config` (what ``config.yaml`` and the checkpoint hold) then
        carries it, and rebuilding the method from that config gives the same model.
        """
        if key not in self.options:
            raise KeyError(f"method {self.name!r} has no option {key!r}; its options: {sorted(self.options)}")
        self.opts[key] = self.options[key].parse(key, value)
        return self.opts[key]

    @property
    def resolved_config(self) -> RunConfig:
        """The run config with every option as this method resolved it (no automatic values left) and the spec of
        a timm/torchvision backbone (``backbone_spec``), so that it rebuilds without ``pretrained_path``."""
        spec = getattr(self.backbone, "spec", None)  # batchmates' own backbones have none (a stale one is dropped)
        return self.cfg.replace(options=dict(self.opts), backbone_spec=dict(spec) if isinstance(spec, dict) else None)

    def build_backbone(self) -> nn.Module:
        """The feature extractor (``forward(x) -> [N, feature_dim]``); default from the run's backbone setting."""
        return self.create_run_backbone(self.cfg.backbone, attn_layer=self.cfg.attn_layer)

    def create_run_backbone(self, name: str, **kw: Any) -> nn.Module:
        """Backbone ``name`` for this run's images (:func:`batchmates.methods.build.build_run_backbone`: own names,
        ``timm:``/``torchvision:`` with ``pretrained_path``, or the module given to ``train(backbone=...)``);
        ``kw`` are more ``create_backbone`` keywords. Records them as :attr:`backbone_recipe` (for export)."""
        from batchmates.methods.build import build_run_backbone

        self.backbone_recipe = {"name": name, **{**self.cfg.backbone_kwargs, **kw}}
        return build_run_backbone(self.cfg, self.info, name, **kw)

    def make_augment(self, strength: str = "weak", **kwargs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """A batched augmentation (``uint8 [B,C,H,W] -> normalised float``) for this dataset."""
        from batchmates.data.augment import make_augment

        kwargs.setdefault("hflip", self.info.hflip)
        padding = self.cfg.crop_padding if self.cfg.crop_padding is not None else self.info.crop_padding
        if padding is not None:  # the run's --crop-padding, else the dataset's own (Fashion-MNIST: 1 px)
            kwargs.setdefault("padding", padding)
        return make_augment(self.info.image_size, self.info.in_channels, self.info.mean, self.info.std,
                            strength=strength, **kwargs)

    def build_train_augment(self) -> Callable[[torch.Tensor], Any]:
        """The training augmentation; default: one weakly augmented view (crop + flip where sensible)."""
        return self.make_augment("weak")

    # ------------------------------------------------------------------ views, features, predictions
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Clean test-time input: uint8 (or float in [0, 1]) images -> float normalised by the dataset mean/std."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        else:
            x = x.float()
        return (x - self._mean) / self._std

    def train_views(self, x: torch.Tensor) -> Any:
        """Augmented training view(s) of a uint8 batch; the result type is whatever the augmentation returns."""
        return self.train_augment(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features of normalised images for kNN / linear probing (default: the backbone's pooled features)."""
        return self.backbone(x)

    def classify(self, x: torch.Tensor) -> torch.Tensor | None:
        """Class logits of normalised images, or None if the method has no classifier of its own."""
        return None

    @property
    def has_classifier(self) -> bool:
        return type(self).classify is not Method.classify

    def set_eval_mode(self, mode: str) -> int:
        """Set ``eval_mode`` (``"independent"``/``"batch"``) on every batch-relational submodule."""
        return set_eval_mode(self, mode)

    # ------------------------------------------------------------------ training loop hooks
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"method {type(self).__name__} must implement training_step(batch, batch_idx)")

    def log_train(self, loss: torch.Tensor, *, batch_size: int, acc: torch.Tensor | float | None = None,
                  **extra: torch.Tensor | float) -> None:
        """Record a step's training loss (and accuracy, and extra per-epoch metrics) for the progress bar and loggers.

        The epoch means (``train/loss_epoch``, ``train/acc``, ``train/<extra>``) are kept as running sums on the
        device (:class:`~batchmates.methods.train_metrics.EpochMeans`) and logged once, at the epoch's last step;
        the step loss (``train/loss_step``) is logged every ``log_every_n_steps`` steps. Called outside a trainer,
        every value is logged at once under ``train/<name>``.
        """
        values = {"loss": loss, **({} if acc is None else {"acc": acc}), **extra}
        if self._trainer is None:
            for k, v in values.items():
                self.log(f"train/{k}", v.detach().float() if torch.is_tensor(v) else v, batch_size=batch_size)
            return
        self.train_means.add(batch_size, values, self.device)
        every = int(self.trainer.log_every_n_steps or 0)  # the steps whose values the loggers write (Lightning's rule)
        if every > 0 and (self.trainer.global_step + 1) % every == 0:
            self.log("train/loss_step", loss.detach().float(), prog_bar=True, on_step=True, on_epoch=False,
                     batch_size=batch_size)

    def log_train_epoch(self, *, batch_size: int, **values: torch.Tensor | float) -> None:
        """Add per-epoch training metrics without a loss (e.g. the statistics of a skipped step)."""
        if self._trainer is None:
            for k, v in values.items():
                self.log(f"train/{k}", v, batch_size=batch_size)
            return
        self.train_means.add(batch_size, values, self.device)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """At the epoch's last step (or the run's, under ``max_steps``): log the epoch means, synced over ranks."""
        trainer = self.trainer
        if batch_idx + 1 >= trainer.num_training_batches or 0 < trainer.max_steps <= trainer.global_step:
            for k, (mean, n) in self.train_means.pop().items():
                self.log("train/loss_epoch" if k == "loss" else f"train/{k}", mean, prog_bar=k in ("loss", "acc"),
                         on_step=False, on_epoch=True, batch_size=n, sync_dist=True)

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = batch[0], batch[1]
        logits = self.classify(self.normalize(x))
        if logits is None:
            return
        logits = logits.float()
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        self.log(f"{stage}/acc", acc, prog_bar=True, on_epoch=True, batch_size=x.shape[0], sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_start(self) -> None:
        self.set_eval_mode(self.cfg.eval_mode)

    def on_test_start(self) -> None:
        self.set_eval_mode(self.cfg.eval_mode)

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameter groups: weight decay on weights; none (and, under LARS, no trust-ratio adaptation) on biases,
        normalisation parameters and ``no_weight_decay()`` names (:func:`batchmates.optim.make_param_groups`)."""
        from batchmates.optim import make_param_groups

        groups = make_param_groups(self, float(self.cfg.weight_decay))
        for g in groups:
            g.pop("param_names", None)  # optimiser states of runs written before keep loading
        return groups

    def configure_optimizers(self) -> Any:
        from batchmates.methods.build import create_optimizer

        cfg = self.cfg
        opt = create_optimizer(cfg, self.parameter_groups())
        per_epoch = self.steps_per_epoch
        if per_epoch is None:
            # Note: Trainer.estimated_stepping_batches sets up the train loader before a checkpoint's loop state is
            # restored, which loses a resumable loader's position; the trainer therefore sets steps_per_epoch.
            per_epoch = max(1, math.ceil(int(self.trainer.estimated_stepping_batches) / max(1, cfg.epochs)))
        total = per_epoch * int(cfg.epochs)
        if cfg.max_steps > 0:
            total = min(total, int(cfg.max_steps))
        total = max(1, total)
        warmup = min(int(round(float(cfg.warmup_epochs) * per_epoch)), total - 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["batchmates"] = {"cfg": self.resolved_config.to_dict(), "info": self.info.to_dict(),
                                    "method": self.name}
        strategy = self._trainer.strategy if self._trainer is not None else None
        checkpoint["batchmates_train_means"] = self.train_means.state_dict(strategy)  # a mid-epoch checkpoint's sums

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rank = int(self._trainer.global_rank) if self._trainer is not None else 0
        self.train_means.load_state_dict(checkpoint.get("batchmates_train_means") or {}, rank=rank)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_steps`` (from 1/warmup), then cosine decay to 0 at the end."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return f

