"""Named variants for ``compare``: a method plus run settings plus method options, and where each run lives.

A variant is written compactly on the command line (``batchmates compare --variants ce ce@noise0.4 ...``)::

    [NAME:]METHOD[@SETTING]...[+OPTION]...

* ``@SETTING`` sets a run setting: ``@KEY=VALUE`` for any setting of ``batchmates train`` except ``method``,
  ``seed`` and ``out`` (dashes or underscores: ``@batch-size=32``, ``@attn_layer=se``,
  ``@eval_protocols=knn,linear``), or a shorthand: ``@b32`` (batch size), ``@noise0.4`` (label noise),
  ``@ep5`` (epochs), ``@steps200`` (max steps), ``@lr0.1`` (learning rate).
* ``+OPTION`` sets a method option, as ``--opt``: ``+temperature=0.2``, ``+curate=frd-pairwise``.
* ``NAME:`` names the variant; without it the name is the spec as written (``simclr@b32+curate=frd-pairwise``).
  Values containing ``@``, ``+`` or a leading ``NAME:`` cannot be written compactly; use a variants file.

A variants file (``--variants-file FILE``, YAML) holds optional common ``settings``, optional ``seeds``, and the
``variants``, as a list (compact specs, or mappings with an optional ``name``) or a mapping ``NAME: spec``::

    seeds: 3
    settings: {data: fashion-mnist, epochs: 1, max_steps: 200}
    variants:
      supervised/ce: ce@eval_protocols=accuracy
      ssl/simclr: {method: simclr, eval_protocols: [knn, linear]}
      shift/vit-miba: {method: ibaformer, backbone: vit-tiny, max_steps: 100, options: {mode: mean},
                       corruptions: true}

Each run of a variant lives in ``OUT/<dir>/seed<k>``, ``<dir>`` = the variant's name (a ``/`` in a name makes
sub-directories) when it is made of letters, digits and ``._@+=,-``, else a cleaned name plus 8 hex digits of
its SHA-1. The mapping depends on the name only, so rerunning a compare finds its earlier runs.

Paper: none (library infrastructure).

Library choices: the grammar and shorthands above; ``corruptions: true|false`` in a file variant overrides
``compare --corruptions`` for that variant.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from batchmates.config import SETTINGS, TYPES, ConfigError, RunConfig
from batchmates.options import parse_bool

__all__ = ["Variant", "parse_variant", "load_variants_file", "read_yaml_mapping", "setting_value", "variant_dir",
           "SHORTHANDS"]

#: ``@<prefix><value>`` shorthands of run settings.
SHORTHANDS: dict[str, str] = {"b": "batch_size", "noise": "label_noise", "ep": "epochs", "steps": "max_steps",
                              "lr": "lr"}
NOT_IN_VARIANTS = ("method", "seed", "out", "options")
_SAFE = re.compile(r"[A-Za-z0-9._@+=,-]+")
_SHORT = re.compile(r"(" + "|".join(sorted(SHORTHANDS, key=len, reverse=True)) + r")(-?[0-9][0-9.e+-]*)")


@dataclass(frozen=True)
class Variant:
    """One configuration of a compare: ``method``, run ``settings`` (RunConfig fields) and method ``options``."""

    name: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    corruptions: bool | None = None

    def config(self, common: RunConfig, *, seed: int, out: str) -> RunConfig:
        """``common`` with this variant's method, settings and options applied (not yet resolved)."""
        return common.replace(method=self.method, seed=seed, out=out, **self.settings,
                              options={**common.options, **self.options})

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "settings": dict(self.settings), "options": dict(self.options)}


def _setting(key: str, value: Any, where: str) -> tuple[str, Any]:
    """``(field name, typed value)`` of a run setting given as ``key``/``value`` in a variant."""
    name = key.strip().replace("-", "_")
    if name in NOT_IN_VARIANTS or name not in SETTINGS:
        valid = sorted(n for n in SETTINGS if n not in NOT_IN_VARIANTS)
        raise ConfigError(f"{where}: {key!r} is not a run setting a variant may set; choose from {valid} "
                          "(the seed comes from --seeds, options go after '+')")
    t, nullable = TYPES[name]
    if not isinstance(value, str):
        return name, list(value) if t is list and isinstance(value, list | tuple) else value
    text = value.strip()
    try:
        if nullable and text.lower() in ("none", "null", ""):
            return name, None
        if t is bool:
            return name, parse_bool(text)
        if t is list:
            return name, [x.strip() for x in text.split(",") if x.strip()]
        return name, t(text)
    except ValueError:
        raise ConfigError(f"{where}: {key}={value!r} is not a valid {t.__name__}") from None


def setting_value(key: str, value: Any, where: str) -> tuple[str, Any]:
    """``(field name, typed value)`` of run setting ``key`` given as ``value`` (a string is parsed as on the command
    line); :class:`ConfigError` naming ``where`` for a setting a variant may not set or a bad value."""
    return _setting(key, value, where)


def parse_variant(spec: str) -> Variant:
    """Parse ``[NAME:]METHOD[@SETTING]...[+OPTION]...`` (see the module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"variant {spec!r}: expected METHOD[@SETTING]...[+OPTION]..., e.g. ce@noise0.4")
    spec = spec.strip()
    name, sep, body = spec.partition(":")
    if not sep or re.search(r"[@+=]", name):
        name, body = spec, spec
    name, body = name.strip(), body.strip()
    parts = re.split(r"([@+])", body)
    method, settings, options = parts[0].strip(), {}, {}
    if not method:
        raise ConfigError(f"variant {spec!r}: the method is missing before '@'/'+', e.g. ce@noise0.4")
    for delim, token in zip(parts[1::2], parts[2::2], strict=True):
        token = token.strip()
        where = f"variant {spec!r}"
        if delim == "+":
            key, eq, value = token.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"{where}: option {token!r} must be KEY=VALUE, e.g. +temperature=0.2")
            options[key.strip().replace("-", "_")] = value.strip()
            continue
        key, eq, value = token.partition("=")
        if not eq:
            m = _SHORT.fullmatch(token)
            if not m:
                raise ConfigError(f"{where}: setting {token!r} must be KEY=VALUE or a shorthand "
                                  f"{[k + 'N' for k in SHORTHANDS]}, e.g. @b32 or @label_noise=0.4")
            key, value = SHORTHANDS[m.group(1)], m.group(2)
        k, v = _setting(key, value, where)
        settings[k] = v
    return Variant(name=name, method=method, settings=settings, options=options)


def _from_mapping(item: dict[str, Any], name: str | None, where: str) -> Variant:
    item = dict(item)
    method = item.pop("method", None)
    if not isinstance(method, str) or not method:
        raise ConfigError(f"{where}: a variant mapping needs 'method', e.g. {{method: ce, label_noise: 0.4}}")
    options = item.pop("options", None) or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: 'options' must be a mapping of method options, got {options!r}")
    corruptions = item.pop("corruptions", None)
    if corruptions is not None and not isinstance(corruptions, bool):
        raise ConfigError(f"{where}: 'corruptions' must be true or false, got {corruptions!r}")
    name = item.pop("name", name)
    settings = dict(_setting(k, v, where) for k, v in item.items())
    if name is None:
        name = method + "".join(f"@{k}={_compact(v)}" for k, v in settings.items())
        name += "".join(f"+{k}={_compact(v)}" for k, v in options.items())
    return Variant(name=str(name), method=method, settings=settings, options=dict(options), corruptions=corruptions)


def _compact(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)


def read_yaml_mapping(path: str, flag: str = "--variants-file") -> dict[str, Any]:
    """The YAML mapping in ``path`` (a :class:`ConfigError` naming ``flag`` when missing or not YAML)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{flag} {path!r} is not valid YAML: {e}") from None
    return data


def load_variants_file(path: str, *, data: dict[str, Any] | None = None, extra_keys: tuple[str, ...] = (),
                       flag: str = "--variants-file") -> tuple[list[Variant], dict[str, Any], int | list[int] | None]:
    """``(variants, common settings, seeds or None)`` of a YAML variants file (see the module docstring).

    ``data``: the file's mapping, already read; ``extra_keys``: more top-level keys the caller reads itself (a
    study file's ``claims``)."""
    if data is None:
        data = read_yaml_mapping(path, flag)
    if not isinstance(data, dict) or "variants" not in data:
        raise ConfigError(f"{flag} {path!r} must be a mapping with 'variants' (and optional 'settings', "
                          "'seeds')")
    allowed = ("variants", "settings", "seeds", *extra_keys)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{flag} {path!r}: unknown key(s) {unknown}; use {', '.join(allowed)}")
    settings = dict(_setting(k, v, f"{path}: settings") for k, v in (data.get("settings") or {}).items())
    raw = data["variants"]
    items = list(raw.items()) if isinstance(raw, dict) else [(None, v) for v in (raw or [])]
    variants = []
    for name, item in items:
        where = f"{path}: variant {name or item!r}"
        if isinstance(item, str):
            v = parse_variant(item)
            variants.append(v if name is None else Variant(str(name), v.method, v.settings, v.options))
        elif isinstance(item, dict):
            variants.append(_from_mapping(item, name, where))
        else:
            raise ConfigError(f"{where}: a variant is a spec string or a mapping with 'method'")
    if not variants:
        raise ConfigError(f"{flag} {path!r} lists no variants")
    return variants, settings, data.get("seeds")


def variant_dir(name: str) -> str:
    """The run directory of variant ``name`` relative to the compare's output (see the module docstring)."""
    parts = name.split("/")
    if all(_SAFE.fullmatch(p) and p not in (".", "..") for p in parts):
        return os.path.join(*parts)
    clean = re.sub(r"[^A-Za-z0-9._@+=,-]+", "_", name).strip("._") or "variant"
    return f"{clean}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
