"""Run configuration: the one schema of every run setting, the dataset facts a run keeps, and the run files.

Bottom floor: imports only :mod:`batchmates.options`, :mod:`batchmates.schema` (how a setting is declared, checked
and turned into a flag) and :mod:`batchmates.io`. Methods, the trainer and the CLI import it; it imports none of them.

``RunConfig`` is what ``batchmates train`` builds from its flags and writes to ``DIR/config.yaml``;
``batchmates train --config DIR/config.yaml`` reruns it. Each field is declared once, with its type, default,
help, command-line flag, group, choices and range (:class:`Setting`); the CLI flags are generated from these
declarations (:func:`add_run_arguments`) and :meth:`RunConfig.validate` checks them. Fields left ``None`` ("auto")
are filled by the method's per-dataset defaults in :meth:`RunConfig.resolve`, so ``config.yaml`` always holds
concrete values. Method-specific settings live in ``options`` (declared by each method as
:class:`~batchmates.options.Option` s).

Paper: none (library infrastructure).

Library choices:

* Per-dataset defaults (:data:`DEFAULT_SETTINGS`) are sized for the hardware each dataset is usually trained on:
  digits and Fashion-MNIST on a laptop CPU, the rest on a GPU.
* ``RunConfig.resolve()`` without a method class asks the method registry, which installs itself here
  (:func:`set_method_lookup`) when :mod:`batchmates.methods` is imported: this floor never imports the methods.
* Old ``config.yaml`` files keep loading: fields are only ever added (with defaults), never renamed or removed.
* ``precision="auto"`` (the default) resolves, on the machine that resolves the config, to ``bf16-mixed`` where
  the device computes bf16 natively and to ``32-true`` elsewhere (:func:`auto_precision`); ``config.yaml`` holds
  the concrete value.
* ``backbone_spec`` is written by the run, not by the user: the exact timm/torchvision backbone it built
  (:attr:`batchmates.models.foreign.ForeignBackbone.spec`), so that a checkpoint is rebuilt without re-reading
  ``pretrained_path`` (its weights come from the checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import yaml

from batchmates.options import ConfigError, Option, RunError, parse_opt_assignments
from batchmates.schema import Setting, add_arguments, check_value, declare, field_types, values_from_args

__all__ = ["RunConfig", "Setting", "DataInfo", "Option", "ConfigError", "RunError", "parse_opt_assignments",
           "add_run_arguments", "settings_from_args", "set_method_lookup", "dataset_defaults", "DEFAULT_SETTINGS",
           "auto_precision", "native_bf16",
           "SETTINGS", "AUTO_SETTINGS", "TYPES",
           "PRECISIONS", "OPTIMIZERS", "LR_RULES", "LOGGERS", "STRATEGIES", "ACCELERATORS", "PROTOCOLS", "EVAL_MODES",
           "CONFIG_FILE", "METRICS_FILE", "CKPT_FILE"]

PRECISIONS = ("auto", "32-true", "64-true", "bf16-mixed", "16-mixed")
OPTIMIZERS = ("sgd", "adamw", "lars")
LR_RULES = ("none", "linear", "sqrt")
LOGGERS = ("tensorboard", "csv", "wandb")
# No ddp_spawn: its runs lost their history and step count (issue 12). Every method's own wiring uses all its
# parameters (tests/test_training.py), so "ddp" (find_unused_parameters=False, the fast path) fits them; a user's
# backbone with parameters outside the loss (an unused head) needs Lightning's ddp_find_unused_parameters_true.
STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PROTOCOLS = ("accuracy", "knn", "linear")
EVAL_MODES = ("independent", "batch")

# The files of a run directory (``RunConfig.out``).
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CKPT_FILE = "last.ckpt"

GROUPS = ("data and model", "optimisation", "hardware", "evaluation", "output")


# ---------------------------------------------------------------------------------------------- the schema
_s = declare  # a dataclass field carrying its Setting (the machinery lives in batchmates.schema)


_D, _O, _H, _E, _OUT = GROUPS  # the group names, short for the table below


@dataclass
class RunConfig:
    """Every setting of one training run. ``None`` in an auto setting means "the method's default for this dataset"."""

    method: str = _s("ce", "method to train (see `batchmates methods`), e.g. ce", _D, metavar="METHOD")
    data: str = _s("digits", "dataset: digits, fashion-mnist, cifar10, cifar100, stl10, flowers102, imagefolder:PATH, "
                   "imagefolder-unlabeled:PATH (see `batchmates data list`)", _D, metavar="DATA")
    data_dir: str | None = _s(None, "where the dataset files are (else $BATCHMATES_DATA, system paths, cache)", _D)
    download: bool = _s(False, "download missing files where possible", _D)
    backbone: str | None = _s(None, "cnn, resnet-small, resnet18, vit-tiny, vit-tiny-conv, or timm:NAME / "
                              "torchvision:NAME (e.g. timm:resnet18)", _D, auto=True, metavar="NAME")
    pretrained_path: str | None = _s(None, "weights of a timm:/torchvision: backbone: a local .safetensors file or "
                                     "torch state dict (nothing is downloaded)", _D, metavar="FILE")
    backbone_kwargs: dict[str, Any] = _s({}, "keyword of the backbone's constructor (timm.create_model, torchvision "
                                         "get_model or create_backbone), repeatable, value read as YAML", _D,
                                         flag="--backbone-kwarg", metavar="KEY=VALUE")
    backbone_spec: dict[str, Any] | None = _s(None, "the timm/torchvision backbone the run built (written by the run; "
                                              "eval, resume and from_checkpoint rebuild it from here)", _D, flag="")
    image_size: int | None = _s(None, "resize every image to this many pixels (unset: the dataset's own size)", _D,
                                minimum=1, metavar="PX")
    crop_padding: int | None = _s(None, "zero padding of the supervised random crop (unset: the dataset's own; "
                                  "round(image size / 8) unless the dataset sets one)", _D, minimum=0, metavar="PX")
    attn_layer: str | None = _s(None, "attention in every residual block: none, se, ba2m", _D, auto=True)
    epochs: int | None = _s(None, "training epochs", _O, auto=True, minimum=1)
    max_steps: int = _s(-1, "stop after this many optimiser steps (-1: no limit)", _O, rule="-1 (no limit) or >= 1",
                        accept=lambda v: v == -1 or v >= 1)
    batch_size: int | None = _s(None, "global batch size (split over --devices)", _O, auto=True, minimum=1)
    lr: float | None = _s(None, "peak learning rate", _O, auto=True, above=0.0)
    optimizer: str | None = _s(None, "optimiser (lars: timm's LARS, no decay or adaptation on biases and norms)", _O,
                               auto=True, choices=OPTIMIZERS)
    lr_rule: str = _s("none", "read --lr per 256 images and scale it to --batch-size: linear (lr*B/256), sqrt "
                      "(lr*sqrt(B/256)) or none (--lr as given)", _O, choices=LR_RULES)
    accumulate: int = _s(1, "micro-batches per optimiser step of a contrastive method (cached accumulation: the same "
                         "loss and gradients as the whole batch, activations of one micro-batch)", _O, minimum=1,
                         metavar="N")
    momentum: float = _s(0.9, "SGD momentum", _O, minimum=0.0, below=1.0)
    weight_decay: float | None = _s(None, "weight decay (not on biases and norms)", _O, auto=True, minimum=0.0)
    warmup_epochs: float | None = _s(None, "linear warm-up length before the cosine decay", _O, auto=True,
                                     minimum=0.0)
    seed: int = _s(0, "random seed (data order, init, augmentation)", _O, minimum=0)
    out: str = _s("runs/run", "run directory (config.yaml, metrics.json, last.ckpt, curves.png, tb/)", _OUT,
                  shown="runs/METHOD-DATA")
    precision: str = _s("auto", "numeric precision; auto: bf16-mixed where the device computes bf16 natively (CUDA "
                        "with bf16, a CPU with AVX512-BF16 or AMX), else 32-true", _H, choices=PRECISIONS)
    accelerator: str = _s("auto", "device type", _H, choices=ACCELERATORS)
    devices: int = _s(1, "devices/processes per node (DDP when > 1 with --strategy ddp)", _H, minimum=1)
    num_nodes: int = _s(1, "machines (torchrun --nnodes); the global batch is split over num_nodes x devices", _H,
                        minimum=1)
    sync_bn: bool = _s(False, "synchronise BatchNorm statistics over all processes (DDP)", _H)
    compile: bool = _s(False, "torch.compile the backbone (opt-in; the first steps compile)", _H)
    strategy: str = _s("auto", "Lightning strategy (ddp_find_unused_parameters_true: a backbone with parameters the "
                       "loss does not use)", _H, choices=STRATEGIES)
    num_workers: int = _s(0, "DataLoader workers for file-backed datasets", _H, minimum=0)
    checkpoint_every_n_steps: int = _s(100, "also write last.ckpt every N optimiser steps (0: only at epoch ends)",
                                       _OUT, flag="--checkpoint-every", minimum=0, metavar="N")
    eval_protocols: list[str] = _s(list(PROTOCOLS), "evaluation protocol after training (repeatable)", _E,
                                   flag="--protocol", choices=PROTOCOLS)
    label_noise: float = _s(0.0, "fraction of symmetric label noise on the training split", _E, minimum=0.0,
                            below=1.0, what="a fraction")
    eval_mode: str = _s("independent", "inference of batch-relational modules: independent (each test sample on "
                        "its own) or batch", _E, choices=EVAL_MODES)
    deterministic: bool = _s(False, "deterministic algorithms only", _H)
    threads: int | None = _s(None, "torch CPU threads (unset: torch's choice)", _H, minimum=1)
    progress: bool = _s(True, "show a progress bar; --no-progress turns it off", _OUT, flag="--no-progress")
    logger: str = _s("tensorboard", "where per-step metrics go besides metrics.csv: tensorboard (tb/), csv (logs/) "
                     "or wandb (needs the wandb package)", _OUT, choices=LOGGERS)
    monitor_every: int = _s(-1, "kNN accuracy and embedding rank (RankMe) on held-out data every N epochs (0: off; "
                            "-1: every epoch for methods without a classifier, else off)", _E,
                            rule="-1 (per method), 0 (off) or >= 1", accept=lambda v: v >= -1, metavar="N")
    options: dict[str, Any] = _s({}, "method options (--opt KEY=VALUE)", _D, flag="")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eval_protocols"] = list(d["eval_protocols"])
        d["options"] = dict(d["options"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a run config must be a mapping of settings, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def to_yaml(self, path: str | None = None) -> str:
        """The config as YAML; written atomically to ``path`` when given."""
        text = "# batchmates run config: rerun with `batchmates train --config THIS_FILE`\n"
        text += yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            from batchmates.io import atomic_write_text

            atomic_write_text(path, text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str) -> RunConfig:
        """Load from a YAML file path (or YAML text containing a newline)."""
        if "\n" in path_or_text:
            text = path_or_text
        else:
            try:
                with open(path_or_text, encoding="utf-8") as f:
                    text = f.read()
            except FileNotFoundError:
                raise ConfigError(f"config file {path_or_text!r} does not exist") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path_or_text!r} is not valid YAML: {e}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation / resolution
    def validate(self) -> RunConfig:
        """Check every setting against its declaration; raise :class:`ConfigError` naming it and the fix."""
        for f in fields(self):
            _check(f.name, getattr(self, f.name))
        world = self.devices * self.num_nodes
        if self.batch_size is not None and self.batch_size % (world * self.accumulate):
            parts = f"devices={self.devices}" + (f" x num_nodes={self.num_nodes}" if self.num_nodes > 1 else "")
            parts += f" x accumulate={self.accumulate}" if self.accumulate > 1 else ""
            raise ConfigError(f"batch_size={self.batch_size} is the global batch and must be divisible by "
                              f"{parts}; pick a multiple of {world * self.accumulate} for --batch-size")
        return self

    def resolve(self, method_cls: Any = None) -> RunConfig:
        """Validate, fill every auto setting from the method's defaults for ``data``, and parse the options.

        ``method_cls`` is the :class:`~batchmates.methods.Method` subclass (looked up by ``method`` when omitted).
        The method also checks what needs its registries (backbone, attention layer and dataset names, the
        batch size of batch-relational methods). Raises :class:`ConfigError` for a bad setting, an unknown
        method, or an unknown or invalid option. Resolving a resolved config changes nothing.
        """
        self.validate()
        if method_cls is None:
            method_cls = _lookup_method(self.method)
        defaults = method_cls.default_settings(self.data)
        changes = {name: defaults[name] for name in AUTO_SETTINGS if getattr(self, name) is None and name in defaults}
        if self.attn_layer is None and "attn_layer" not in changes:
            changes["attn_layer"] = "none"
        if self.precision == "auto":
            changes["precision"] = auto_precision(self.accelerator)
        cfg = self.replace(**changes)
        for name in AUTO_SETTINGS:
            if getattr(cfg, name) is None:
                raise ConfigError(f"method {cfg.method!r} gives no default for {name}; pass "
                                  f"{SETTINGS[name].cli_flag(name)}")
        cfg.options = method_cls.parse_options(cfg.options)
        method_cls.check_config(cfg)
        return cfg.validate()


SETTINGS: dict[str, Setting] = {f.name: f.metadata["setting"] for f in fields(RunConfig)}
AUTO_SETTINGS: tuple[str, ...] = tuple(n for n, s in SETTINGS.items() if s.auto)


TYPES = field_types(RunConfig)


def _check(name: str, v: Any) -> None:
    check_value(name, v, SETTINGS[name], TYPES[name])


# ---------------------------------------------------------------------------------------------- command line
def add_run_arguments(parser: argparse.ArgumentParser, *, exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per run setting (grouped as in the schema), all defaulting to "not given"."""
    add_arguments(parser, RunConfig, GROUPS, exclude=exclude)


def settings_from_args(args: argparse.Namespace, *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The run settings given on the command line (flags added by :func:`add_run_arguments`), by field name."""
    return values_from_args(args, RunConfig, exclude=exclude)


# ---------------------------------------------------------------------------------------------- dataset facts
@dataclass(frozen=True)
class DataInfo:
    """What a method needs to know about its dataset; every checkpoint stores it next to the config."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int | None = None
    hflip: bool = True
    crop_padding: int | None = None  # the supervised crop's zero padding (None: round(image_size / 8))

    @classmethod
    def from_splits(cls, splits: Any) -> DataInfo:
        """From a loaded dataset (``batchmates.data.load_dataset``'s ``DatasetSplits``)."""
        train = getattr(splits, "train", None)
        try:
            n = len(train) if train is not None else None
        except TypeError:
            n = None
        return cls(name=str(splits.name), num_classes=int(splits.num_classes), in_channels=int(splits.in_channels),
                   image_size=int(splits.image_size), mean=tuple(float(m) for m in splits.mean),
                   std=tuple(float(s) for s in splits.std), train_size=n, hflip=bool(getattr(splits, "hflip", True)),
                   crop_padding=getattr(splits, "crop_padding", None))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataInfo:
        """From :meth:`to_dict` output (e.g. a checkpoint's ``batchmates.info``); lists become tuples."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown DataInfo key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**{k: tuple(v) if k in ("mean", "std") else v for k, v in d.items()})


# Per-dataset defaults for the auto settings (library choice; see the module docstring). Fashion-MNIST: 15 epochs
# (issue 10, with a 2 px crop padding and bf16, seed 0: 93.15% test top-1 after 15 epochs, 92.78% after 12; with the
# dataset's 1 px padding, 93.70% over seeds 0-2: docs/benchmarks.md, "Recipe measurements").
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "digits": dict(backbone="cnn", epochs=8, batch_size=64, lr=0.05, optimizer="sgd", weight_decay=5e-4,
                   warmup_epochs=0.0),
    "fashion-mnist": dict(backbone="resnet-small", epochs=15, batch_size=128, lr=0.1, optimizer="sgd",
                          weight_decay=5e-4, warmup_epochs=0.5),
    "cifar10": dict(backbone="resnet18", epochs=100, batch_size=256, lr=0.1, optimizer="sgd", weight_decay=5e-4,
                    warmup_epochs=2.0),
    "cifar100": dict(backbone="resnet18", epochs=100, batch_size=256, lr=0.1, optimizer="sgd", weight_decay=5e-4,
                     warmup_epochs=2.0),
    "*": dict(backbone="resnet-small", epochs=20, batch_size=128, lr=0.05, optimizer="sgd", weight_decay=5e-4,
              warmup_epochs=1.0),
}


def dataset_defaults(data: str) -> dict[str, Any]:
    """A copy of the auto-setting defaults for dataset ``data`` (the ``"*"`` row for datasets not listed)."""
    return dict(DEFAULT_SETTINGS[data if data in DEFAULT_SETTINGS else "*"])


# ---------------------------------------------------------------------------------------------- precision
def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` (``"cpu"``, ``"cuda"``, ...) computes bf16 natively: CUDA with bf16 support, or a
    CPU whose flags (Linux ``/proc/cpuinfo``) include ``avx512_bf16`` or ``amx_bf16``. Other CPUs would emulate
    bf16 and run slower than fp32."""
    if device_type == "cuda":
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(accelerator: str = "auto") -> str:
    """What ``precision="auto"`` resolves to on this machine: ``"bf16-mixed"`` (autocast, fp32 master weights)
    where the accelerator computes bf16 natively (:func:`native_bf16`), else ``"32-true"``. Library choice,
    measured with ``batchmates bench train`` (bf16 vs fp32 images/s, and final accuracy within seed noise)."""
    kind = accelerator
    if accelerator == "auto":
        import torch

        kind = "cuda" if torch.cuda.is_available() else "cpu"
    kind = "cuda" if kind in ("gpu", "cuda") else kind
    return "bf16-mixed" if native_bf16(kind) else "32-true"


# ---------------------------------------------------------------------------------------------- method look-up
_method_lookup: Callable[[str], Any] | None = None


def set_method_lookup(lookup: Callable[[str], Any]) -> None:
    """Install the ``name -> Method class`` look-up ``RunConfig.resolve()`` uses (done by the method registry)."""
    global _method_lookup
    _method_lookup = lookup


def _lookup_method(name: str) -> Any:
    if _method_lookup is None:
        raise ConfigError(f"RunConfig.resolve() needs the class of method {name!r}: import batchmates.methods "
                          "first, or pass it, e.g. cfg.resolve(batchmates.methods.get_method(name))")
    return _method_lookup(name)
