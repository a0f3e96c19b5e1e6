"""``Method``: the LightningModule every trainable batchmates method derives from.

How to add a method (one file plus one import line in ``methods/__init__.py``)::

    from batchmates.methods.base import Method
    from batchmates.methods.registry import register_method
    from batchmates.training.config import Option

    @register_method("mymethod")
    class MyMethod(Method):
        '''One line on what it does (cite the arXiv id).'''
        supervised = False            # uses labels during training?
        batch_relational = True       # does the loss/model relate samples of the batch? (then batch_size >= 2)
        options = {"temperature": Option(float, 0.1, "softmax temperature", minimum=1e-6)}

        def __init__(self, cfg, info):
            super().__init__(cfg, info)           # builds self.backbone and the train augmentation
            self.head = torch.nn.Linear(self.backbone.feature_dim, 128)
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
* ``supports(data)`` (classmethod): whether the method makes sense on ``data`` (``--methods all`` uses it).
* ``build_backbone()``, ``build_train_augment()``, ``train_views(x_uint8)``, ``embed(x)``, ``classify(x)``,
  ``parameter_groups()`` (to give some parameters another lr or no weight decay).

What the base provides: backbone creation (:func:`batchmates.models.create_backbone` with the run's
``attn_layer``), the augmentation on the training device (uint8 batch in, normalised float views out),
deterministic per-step randomness (the RNG is re-seeded from ``(seed, global_step, rank)`` before every training
step, so a run resumed mid-epoch reproduces the uninterrupted one), SGD-momentum/AdamW with linear warm-up then
per-step cosine decay, validation/test top-1 of ``classify`` (on the clean, normalised test images, in eval mode,
with every batch-relational module in its ``eval_mode``, ``"independent"`` by default), and logging of loss,
accuracy and throughput (images/s) to the progress bar. All of this is library design, not from a paper.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from batchmates.training.config import ConfigError, Option, RunConfig

__all__ = ["Method", "DataInfo", "set_eval_mode", "step_seed", "DEFAULT_SETTINGS"]


@dataclass(frozen=True)
class DataInfo:
    """What a method needs to know about its dataset (from :func:`batchmates.data.load_dataset`)."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int | None = None
    hflip: bool = True

    @classmethod
    def from_splits(cls, splits: Any) -> DataInfo:
        train = getattr(splits, "train", None)
        try:
            n = len(train) if train is not None else None
        except TypeError:
            n = None
        return cls(
            name=str(splits.name),
            num_classes=int(splits.num_classes),
            in_channels=int(splits.in_channels),
            image_size=int(splits.image_size),
            mean=tuple(float(m) for m in splits.mean),
            std=tuple(float(s) for s in splits.std),
            train_size=n,
            hflip=bool(getattr(splits, "hflip", True)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Per-dataset defaults for settings the user leaves unset (library choice, sized for the hardware each dataset
# is usually trained on: digits and Fashion-MNIST on a laptop CPU, the rest on a GPU).
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "digits": dict(backbone="cnn", epochs=8, batch_size=64, lr=0.05, optimizer="sgd", weight_decay=5e-4,
                   warmup_epochs=0.0),
    "fashion-mnist": dict(backbone="resnet-small", epochs=12, batch_size=128, lr=0.1, optimizer="sgd",
                          weight_decay=5e-4, warmup_epochs=0.5),
    "cifar10": dict(backbone="resnet18", epochs=100, batch_size=256, lr=0.1, optimizer="sgd", weight_decay=5e-4,
                    warmup_epochs=2.0),
    "cifar100": dict(backbone="resnet18", epochs=100, batch_size=256, lr=0.1, optimizer="sgd", weight_decay=5e-4,
                     warmup_epochs=2.0),
    "*": dict(backbone="resnet-small", epochs=20, batch_size=128, lr=0.05, optimizer="sgd", weight_decay=5e-4,
              warmup_epochs=1.0),
}


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A well-mixed 63-bit seed for training step ``step`` of run ``seed`` on ``rank`` (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB + 1) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


def set_eval_mode(module: nn.Module, mode: str) -> int:
    """Set ``eval_mode`` on every submodule that has one (``"independent"`` or ``"batch"``); returns the count."""
    if mode not in ("independent", "batch"):
        raise ValueError(f"eval_mode must be 'independent' (each test sample on its own) or 'batch', got {mode!r}")
    n = 0
    for m in module.modules():
        if hasattr(m, "eval_mode") and isinstance(m.eval_mode, str):
            m.eval_mode = mode
            n += 1
    return n


class Method(L.LightningModule):
    """Base class of every trainable method; see the module docstring for how to write one."""

    name: ClassVar[str] = "?"
    supervised: ClassVar[bool] = True
    batch_relational: ClassVar[bool] = False
    options: ClassVar[dict[str, Option]] = {}
    datasets: ClassVar[tuple[str, ...] | None] = None  # None: every dataset
    summary: ClassVar[str] = ""

    # ------------------------------------------------------------------ class-level configuration
    @classmethod
    def default_settings(cls, data: str) -> dict[str, Any]:
        """Defaults for the run settings left ``None`` (backbone, epochs, batch_size, lr, ...) on ``data``."""
        key = data if data in DEFAULT_SETTINGS else "*"
        return dict(DEFAULT_SETTINGS[key])

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
        self._last_step_time: float | None = None
        self._throughput: float | None = None

    def build_backbone(self) -> nn.Module:
        """The feature extractor (``forward(x) -> [N, feature_dim]``); default from the run's backbone setting."""
        from batchmates.models import create_backbone

        return create_backbone(
            self.cfg.backbone,
            in_channels=self.info.in_channels,
            image_size=self.info.image_size,
            attn_layer=self.cfg.attn_layer,
        )

    def make_augment(self, strength: str = "weak", **kwargs: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """A batched augmentation (``uint8 [B,C,H,W] -> normalised float``) for this dataset."""
        from batchmates.data.augment import make_augment

        kwargs.setdefault("hflip", self.info.hflip)
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

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Randomness of step t depends only on (seed, t, rank): exact mid-epoch resume.
        torch.manual_seed(step_seed(self.cfg.seed, int(self.global_step), int(self.global_rank)))
        now = time.perf_counter()
        if self._last_step_time is not None:
            n = _batch_size(batch) * max(1, int(self.trainer.world_size) if self._trainer is not None else 1)
            rate = n / max(now - self._last_step_time, 1e-9)
            self._throughput = rate if self._throughput is None else 0.9 * self._throughput + 0.1 * rate
        self._last_step_time = now

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None

    def log_train(self, loss: torch.Tensor, *, batch_size: int, acc: torch.Tensor | float | None = None,
                  **extra: torch.Tensor | float) -> None:
        """Log the training loss (and accuracy, and throughput) to the progress bar and the loggers."""
        self.log("train/loss", loss.detach().float(), prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=batch_size, sync_dist=True)
        if acc is not None:
            self.log("train/acc", acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=batch_size,
                     sync_dist=True)
        for k, v in extra.items():
            self.log(f"train/{k}", v, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)
        if self._throughput is not None:
            self.log("img_per_s", self._throughput, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)

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
        """Parameter groups: weight decay on weights, none on biases and normalisation parameters (library choice)."""
        decay, no_decay = [], []
        for _, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": float(self.cfg.weight_decay)}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        groups = self.parameter_groups()
        if cfg.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        elif cfg.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=cfg.lr)
        else:  # pragma: no cover - validated in RunConfig
            raise ConfigError(f"optimizer={cfg.optimizer!r}: choose 'sgd' or 'adamw'")
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
        checkpoint["batchmates"] = {"cfg": self.cfg.to_dict(), "info": self.info.to_dict(), "method": self.name}


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_steps`` (from 1/warmup), then cosine decay to 0 at the end."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, list | tuple) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 0


def iter_batches(x: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size]
