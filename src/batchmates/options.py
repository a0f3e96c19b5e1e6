"""The words every run setting is spoken in: the two errors, a typed method option, ``--opt`` parsing.

Bottom floor: imports nothing from batchmates, so methods, the trainer and the CLI can all use it.

Paper: none (library infrastructure).

Library choices:

* :class:`ConfigError` (a ``ValueError``) is an invalid setting; :class:`RunError` (a ``RuntimeError``) is a run
  that cannot start or continue. Both messages name the setting or the directory and say how to fix it.
* A method declares its options (``--opt key=value``) as :class:`Option` s: type, default, one-line help, and
  optionally choices and an inclusive numeric range. ``Option.parse`` turns a command-line string or a YAML
  scalar into the typed value (``bool`` accepts 1/0, true/false, yes/no, on/off; ``int`` rejects ``1.5``;
  ``float`` rejects NaN and infinities).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["ConfigError", "RunError", "Option", "parse_opt_assignments", "parse_bool"]


class ConfigError(ValueError):
    """An invalid setting; the message names the setting and how to fix it."""


class RunError(RuntimeError):
    """A run cannot start or continue (e.g. resuming a directory without a checkpoint)."""


_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}


def parse_bool(value: Any) -> bool:
    """``True``/``False`` or one of 1/0, true/false, yes/no, on/off, y/n (any case); ``ValueError`` otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r}")


@dataclass(frozen=True)
class Option:
    """A typed method option (``--opt key=value``): its type, default and one-line help.

    ``type`` is one of ``bool``, ``int``, ``float``, ``str``; ``choices`` restricts the allowed values;
    ``minimum``/``maximum`` bound numbers (inclusive); ``retired`` pairs a value that no longer exists with the
    message that says what replaced it.
    """

    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    retired: tuple[tuple[str, str], ...] = ()

    def parse(self, key: str, value: Any) -> Any:
        """Convert ``value`` (a string from the command line or a YAML scalar) and validate it."""
        for old, message in self.retired:
            if str(value).strip() == old:
                raise ConfigError(message)
        t = self.type
        try:
            if t is bool:
                out: Any = parse_bool(value)
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
