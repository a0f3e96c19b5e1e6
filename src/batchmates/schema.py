"""The machinery of the run-setting schema: how one setting is declared, checked and offered as a flag.

Bottom floor: imports nothing from batchmates except :mod:`batchmates.options`. :mod:`batchmates.config` declares
the table of settings (the :class:`~batchmates.config.RunConfig` dataclass, one :func:`declare` per field) with
this machinery; the CLI flags and the checks are generated from that table.

Paper: none (library infrastructure).

Library choices:

* A setting's Python type comes from its annotation (``int | None`` -> ``int``, accepts ``None``); bounds,
  choices and a free-form ``rule``/``accept`` pair describe what a value may be, and every error names the setting,
  the flag and the fix.
* Flags default to "not given" (``argparse.SUPPRESS``), so a config file's value is only overridden by a flag the
  user typed. A ``bool`` flag stores the opposite of the default; a ``list`` flag is repeatable; a ``dict`` flag is
  repeatable ``KEY=VALUE`` with the value read as YAML (``--backbone-kwarg drop_path_rate=0.1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from batchmates.options import ConfigError

__all__ = ["Setting", "declare", "field_types", "check_value", "add_arguments", "values_from_args", "parse_kv"]


@dataclass(frozen=True)
class Setting:
    """How one :class:`~batchmates.config.RunConfig` field is checked and offered on the command line.

    ``flag``: ``None`` gives ``--name-with-dashes``, ``""`` no flag. ``auto``: ``None`` means "the method's
    default for the dataset" (filled by ``RunConfig.resolve``). ``minimum``/``maximum`` are inclusive,
    ``above``/``below`` exclusive; ``rule``/``accept`` state a rule the bounds cannot. ``shown``: the default
    as ``--help`` words it, when the CLI fills it differently from the dataclass.
    """

    help: str
    group: str
    flag: str | None = None
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None
    auto: bool = False
    what: str = ""
    rule: str = ""
    accept: Callable[[Any], bool] | None = None
    metavar: str | None = None
    shown: str = ""

    def cli_flag(self, name: str) -> str:
        return self.flag if self.flag is not None else "--" + name.replace("_", "-")

    def range_text(self) -> str:
        if self.rule:
            return self.rule
        lo = f"[{self.minimum:g}" if self.minimum is not None else (f"({self.above:g}" if self.above is not None
                                                                    else "")
        hi = f"{self.maximum:g}]" if self.maximum is not None else (f"{self.below:g})" if self.below is not None
                                                                   else "")
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f">= {self.minimum:g}" if self.minimum is not None else f"> {self.above:g}"
        return f"<= {self.maximum:g}" if self.maximum is not None else f"< {self.below:g}"

    def in_range(self, v: Any) -> bool:
        if self.accept is not None:
            return bool(self.accept(v))
        return not ((self.minimum is not None and v < self.minimum) or (self.maximum is not None and v > self.maximum)
                    or (self.above is not None and v <= self.above) or (self.below is not None and v >= self.below))


def declare(default: Any, help: str, group: str, **kw: Any) -> Any:
    """A dataclass field carrying its :class:`Setting` (a list or dict default is copied per instance)."""
    meta = {"setting": Setting(help, group, **kw)}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """``name -> (base type, accepts None)`` from a dataclass's annotations (``int | None`` -> ``(int, True)``)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        base = next(a for a in args if a is not type(None))
        out[name] = (typing.get_origin(base) or base, type(None) in args)
    return out


def check_value(name: str, v: Any, s: Setting, typ: tuple[type, bool]) -> None:
    """Raise :class:`ConfigError` naming ``name``, its flag and the fix when ``v`` is not a valid value."""
    t, nullable = typ
    flag = s.cli_flag(name) if s.flag != "" else f"the config key {name!r}"
    if v is None:
        if nullable:
            return
        raise ConfigError(f"{name} must be set (got None); pass {flag}")
    ok = {bool: lambda: isinstance(v, bool),
          int: lambda: isinstance(v, int) and not isinstance(v, bool),
          float: lambda: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
          str: lambda: isinstance(v, str) and bool(v),
          list: lambda: isinstance(v, list | tuple),
          dict: lambda: isinstance(v, dict)}[t]()
    if not ok:
        kind = {float: "a finite number", int: "an integer", bool: "true or false", list: "a list",
                dict: "a mapping", str: "a non-empty string"}[t]
        raise ConfigError(f"{name} must be {kind} (got {v!r}); fix {flag}")
    if s.choices is not None:
        bad = [x for x in (v if t is list else [v]) if x not in s.choices]
        if bad:
            shown = bad if t is list else repr(bad[0])
            raise ConfigError(f"{name}={shown}: choose one of {list(s.choices)} ({flag})")
    elif t in (int, float) and not s.in_range(v):
        what = f"{s.what} " if s.what else ""
        raise ConfigError(f"{name} must be {what}{s.range_text()} (got {v!r}); fix {flag}")


def parse_kv(items: Iterable[str], flag: str) -> dict[str, Any]:
    """``["depth=6", "drop_path_rate=0.1"]`` -> ``{"depth": 6, "drop_path_rate": 0.1}`` (values read as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} drop_path_rate=0.1")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type, groups: Iterable[str], *,
                  exclude: tuple[str, ...] = ()) -> None:
    """One flag per declared field of dataclass ``cls`` (grouped as declared), all defaulting to "not given"."""
    by_group = {g: parser.add_argument_group(g) for g in groups}
    kinds = field_types(cls)
    for f in dataclasses.fields(cls):
        name, s = f.name, f.metadata["setting"]
        if name in exclude or s.flag == "":
            continue
        t, _ = kinds[name]
        if s.shown or s.auto:
            shown = s.shown or "per method and dataset"
        else:
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = "unset" if value is None or value == {} else (", ".join(value) if t is list else value)
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": f"{s.help} (default: {shown})"}
        if t is bool:
            kw.update(action="store_const", const=not f.default)
        elif t is list:
            kw.update(action="append", choices=s.choices)
        elif t is dict:
            kw.update(action="append", metavar=s.metavar or "KEY=VALUE")
        else:
            kw.update(type=t, choices=s.choices, metavar=s.metavar)
        by_group[s.group].add_argument(s.cli_flag(name), **kw)


def values_from_args(args: argparse.Namespace, cls: type, *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (flags of :func:`add_arguments`), by field name."""
    kinds = field_types(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = f.name
        if f.metadata["setting"].flag == "" or name in exclude or not hasattr(args, name):
            continue
        value = getattr(args, name)
        out[name] = parse_kv(value, f.metadata["setting"].cli_flag(name)) if kinds[name][0] is dict else value
    return out
