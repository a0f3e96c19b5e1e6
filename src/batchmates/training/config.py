"""Run configuration: one dataclass holding every setting of a training run, round-tripping through YAML.

``RunConfig`` is what ``batchmates train`` builds from its flags and writes to ``DIR/config.yaml``;
``batchmates train --config DIR/config.yaml`` reruns it. Fields left ``None`` ("auto") are filled by the
method's per-dataset defaults (:meth:`batchmates.methods.base.Method.default_settings`) in :meth:`RunConfig.resolve`,
so the written file always holds concrete values. Method-specific settings live in ``options`` and are
declared (typed, with defaults and help) by each method as :class:`Option` s. Library design; no paper involved.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # pragma: no cover
    from batchmates.methods.base import Method

__all__ = ["Option", "RunConfig", "ConfigError", "parse_opt_assignments", "PRECISIONS", "OPTIMIZERS", "PROTOCOLS"]

PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed")
OPTIMIZERS = ("sgd", "adamw")
STRATEGIES = ("auto", "ddp", "ddp_spawn")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PROTOCOLS = ("accuracy", "knn", "linear")


class ConfigError(ValueError):
    """An invalid setting; the message names the setting and how to fix it."""


_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}


@dataclass(frozen=True)
class Option:
    """A typed method option (``--opt key=value``): its type, default and one-line help.

    ``type`` is one of ``bool``, ``int``, ``float``, ``str``; ``choices`` restricts the allowed values;
    ``minimum``/``maximum`` bound numbers (inclusive).
    """

    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None

    def parse(self, key: str, value: Any) -> Any:
        """Convert ``value`` (a string from the command line or a YAML scalar) and validate it."""
        t = self.type
        try:
            if t is bool:
                if isinstance(value, bool):
                    out: Any = value
                elif str(value).strip().lower() in _TRUE:
                    out = True
                elif str(value).strip().lower() in _FALSE:
                    out = False
                else:
                    raise ValueError
            elif t is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                out = int(value) if not isinstance(value, str) else int(value.strip())
            elif t is float:
                if isinstance(value, bool):
                    raise ValueError
                out = float(value)
                if not math.isfinite(out):
                    raise ValueError
            elif t is str:
                out = str(value)
            else:  # pragma: no cover - declared by method authors
                out = t(value)
        except (TypeError, ValueError):
            raise ConfigError(f"option {key}={value!r}: expected a {t.__name__} ({self.help})") from None
        if self.choices is not None and out not in self.choices:
            raise ConfigError(f"option {key}={out!r}: choose one of {list(self.choices)}")
        if self.minimum is not None and out < self.minimum:
            raise ConfigError(f"option {key}={out!r}: must be >= {self.minimum}")
        if self.maximum is not None and out > self.maximum:
            raise ConfigError(f"option {key}={out!r}: must be <= {self.maximum}")
        return out

    def describe(self) -> str:
        extra = f", one of {list(self.choices)}" if self.choices else ""
        return f"{self.type.__name__}, default {self.default!r}{extra}: {self.help}"


def parse_opt_assignments(items: list[str] | None) -> dict[str, str]:
    """Turn repeated ``--opt key=value`` strings into a dict (values stay strings; the method parses them)."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--opt {item!r}: expected key=value, e.g. --opt temperature=0.1")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise ConfigError(f"--opt {item!r}: the key before '=' is empty")
        out[key] = value.strip()
    return out


@dataclass
class RunConfig:
    """Every setting of one training run. ``None`` means "the method's default for this dataset"."""

    method: str = "ce"
    data: str = "digits"
    data_dir: str | None = None
    download: bool = False
    backbone: str | None = None
    attn_layer: str | None = None  # None: the method's default (default_settings), else "none"
    epochs: int | None = None
    max_steps: int = -1
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    seed: int = 0
    out: str = "runs/run"
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    num_workers: int = 0
    checkpoint_every_n_steps: int = 100
    eval_protocols: list[str] = field(default_factory=lambda: ["accuracy", "knn", "linear"])
    label_noise: float = 0.0
    eval_mode: str = "independent"
    deterministic: bool = False
    threads: int | None = None
    progress: bool = True
    options: dict[str, Any] = field(default_factory=dict)

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
            from batchmates.training.io import atomic_write_text

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
        """Check every generic setting; raise :class:`ConfigError` naming the setting and the fix."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(isinstance(self.method, str) and bool(self.method), "method must be a non-empty name, e.g. --method ce")
        need(isinstance(self.data, str) and bool(self.data), "data must be a dataset name, e.g. --data digits")
        if self.epochs is not None:
            need(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be >= 1 (got {self.epochs})")
        need(isinstance(self.max_steps, int) and (self.max_steps == -1 or self.max_steps >= 1),
             f"max_steps must be -1 (no limit) or >= 1 (got {self.max_steps})")
        if self.batch_size is not None:
            need(isinstance(self.batch_size, int) and self.batch_size >= 1,
                 f"batch_size must be >= 1 (got {self.batch_size})")
        if self.lr is not None:
            need(isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0,
                 f"lr must be a finite number > 0 (got {self.lr})")
        if self.optimizer is not None:
            need(self.optimizer in OPTIMIZERS, f"optimizer={self.optimizer!r}: choose one of {list(OPTIMIZERS)}")
        if self.weight_decay is not None:
            need(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                 f"weight_decay must be >= 0 (got {self.weight_decay})")
        if self.warmup_epochs is not None:
            need(math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0,
                 f"warmup_epochs must be >= 0 (got {self.warmup_epochs})")
        need(0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1) (got {self.momentum})")
        need(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0 (got {self.seed})")
        need(self.precision in PRECISIONS, f"precision={self.precision!r}: choose one of {list(PRECISIONS)}")
        need(self.accelerator in ACCELERATORS, f"accelerator={self.accelerator!r}: choose one of {list(ACCELERATORS)}")
        need(isinstance(self.devices, int) and self.devices >= 1, f"devices must be >= 1 (got {self.devices})")
        need(self.strategy in STRATEGIES, f"strategy={self.strategy!r}: choose one of {list(STRATEGIES)}")
        need(isinstance(self.num_workers, int) and self.num_workers >= 0,
             f"num_workers must be >= 0 (got {self.num_workers})")
        need(isinstance(self.checkpoint_every_n_steps, int) and self.checkpoint_every_n_steps >= 0,
             f"checkpoint_every_n_steps must be >= 0 (0 = only at epoch ends), got {self.checkpoint_every_n_steps}")
        bad = [p for p in self.eval_protocols if p not in PROTOCOLS]
        need(not bad, f"eval_protocols {bad} unknown: choose from {list(PROTOCOLS)}")
        need(isinstance(self.label_noise, int | float) and 0.0 <= self.label_noise < 1.0,
             f"label_noise must be a fraction in [0, 1) (got {self.label_noise})")
        if self.threads is not None:
            need(isinstance(self.threads, int) and self.threads >= 1, f"threads must be >= 1 (got {self.threads})")
        need(self.eval_mode in ("independent", "batch"),
             f"eval_mode={self.eval_mode!r}: choose 'independent' (default) or 'batch'")
        need(isinstance(self.options, dict), "options must be a mapping of method option names to values")
        return self

    def resolve(self, method_cls: type[Method] | None = None) -> RunConfig:
        """Validate, fill every ``None`` setting from the method's defaults for ``data``, and parse options.

        Raises :class:`ConfigError` for a bad setting, an unknown method, or an unknown/invalid option.
        """
        self.validate()
        if method_cls is None:
            from batchmates.methods import get_method

            method_cls = get_method(self.method)
        defaults = method_cls.default_settings(self.data)
        changes: dict[str, Any] = {}
        for f in fields(self):
            if getattr(self, f.name) is None and f.name in defaults:
                changes[f.name] = defaults[f.name]
        if self.attn_layer is None and "attn_layer" not in defaults:
            changes["attn_layer"] = "none"
        cfg = self.replace(**changes)
        for name in ("backbone", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "warmup_epochs"):
            if getattr(cfg, name) is None:
                raise ConfigError(f"method {cfg.method!r} gives no default for {name}; pass --{name.replace('_', '-')}")
        cfg.options = method_cls.parse_options(cfg.options)
        if method_cls.batch_relational and cfg.batch_size < 2:
            raise ConfigError(
                f"batch_size must be >= 2 for the batch-relational method {cfg.method!r} (got {cfg.batch_size})"
            )
        return cfg.validate()
