"""The registries as plain data, cached on disk, so the CLI can list and check names without importing torch.

``batchmates methods``, and the checks of ``--method``, ``--opt``, ``--data``, ``--backbone`` and ``--attn-layer``
made before a run imports the heavy stack, read a snapshot of the method, dataset, backbone and attention-layer
registries: each method's description, options (type, default, help, choices, range), supported datasets and
per-dataset defaults. Building the snapshot imports the registries (torch and Lightning, seconds); it is then
written to ``$XDG_CACHE_HOME/batchmates/catalog-<key>.json`` (``~/.cache``), where ``key`` hashes the package
version and the size and modification time of every source file of the package: any edit of the code builds a
new snapshot, so the cache is never stale. Reading it takes milliseconds.

Paper: none (library infrastructure).

Library choices: a cache that cannot be written (read-only home) is skipped silently (the listing is then as slow
as before); ``BATCHMATES_NO_CATALOG_CACHE=1`` disables it. A process that has already imported the registries
(e.g. user code that registered its own method, then calls ``batchmates.cli.main``) reads them live instead. The
full checks of :meth:`RunConfig.resolve` still run when the run starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

from batchmates.options import ConfigError, Option

__all__ = ["catalog", "build_catalog", "cache_path", "check_names", "check_options", "method_help"]

_VERSION = 1
_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def _package_dir() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_key() -> str:
    from batchmates import __version__

    h = hashlib.sha256(f"{_VERSION} {__version__} {sys.version} {_package_dir()}".encode())
    for root, dirs, files in os.walk(_package_dir()):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                st = os.stat(os.path.join(root, name))
                h.update(f"{os.path.relpath(os.path.join(root, name), _package_dir())} {st.st_size} "
                         f"{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cache_path() -> str:
    """Where the snapshot of the current source tree is (or would be) cached."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "batchmates", f"catalog-{_source_key()}.json")


def _option_dict(opt: Option) -> dict[str, Any]:
    return {"type": opt.type.__name__, "default": opt.default, "help": opt.help,
            "choices": list(opt.choices) if opt.choices is not None else None,
            "minimum": opt.minimum, "maximum": opt.maximum, "retired": [list(r) for r in opt.retired]}


def _option(d: dict[str, Any]) -> Option:
    return Option(_TYPES[d["type"]], d["default"], d["help"],
                  choices=tuple(d["choices"]) if d["choices"] is not None else None,
                  minimum=d["minimum"], maximum=d["maximum"],
                  retired=tuple((str(old), str(msg)) for old, msg in d.get("retired", ())))


def build_catalog() -> dict[str, Any]:
    """The snapshot, from the live registries (imports torch and Lightning)."""
    from batchmates.data.datasets import DATASET_SOURCES, available_datasets
    from batchmates.methods import available_methods, get_method
    from batchmates.models import available_attn_layers, available_backbones

    datasets = {name: source.argument for name, source in DATASET_SOURCES.items()}
    shown = [d.split(":", 1)[0] for d in available_datasets()]
    methods = {name: method_entry(get_method(name), shown) for name in available_methods()}
    return {"version": _VERSION, "methods": methods, "datasets": datasets, "datasets_shown": shown,
            "backbones": list(available_backbones()),
            "attn_layers": ["none", *(n for n in available_attn_layers() if n != "none")]}


def method_entry(cls: Any, datasets: list[str]) -> dict[str, Any]:
    """One method of the snapshot: description, options, and support and defaults on each of ``datasets``."""
    return {"describe": cls.describe(), "options": {k: _option_dict(o) for k, o in cls.options.items()},
            "describe_options": cls.describe_options(), "supports": {d: bool(cls.supports(d)) for d in datasets},
            "defaults": {d: cls.default_settings(d) for d in datasets}}


_MEMO: dict[str, Any] = {}


def catalog() -> dict[str, Any]:
    """The snapshot: read from the cache when it matches the source tree, else built (and cached). In a process
    that has imported the registries already, the live registries (methods registered at run time included)."""
    if "batchmates.methods" in sys.modules and "batchmates.models" in sys.modules:
        return build_catalog()  # cheap once imported, and current
    if "catalog" in _MEMO:
        return _MEMO["catalog"]
    use_cache = not os.environ.get("BATCHMATES_NO_CATALOG_CACHE")
    path = cache_path() if use_cache else ""
    cat = None
    if use_cache:
        try:
            with open(path, encoding="utf-8") as f:
                cat = json.load(f)
        except (OSError, ValueError):
            cat = None
    if not isinstance(cat, dict) or cat.get("version") != _VERSION:
        cat = build_catalog()
        if use_cache:
            _write_cache(path, cat)
    _MEMO["catalog"] = cat
    return cat


def _write_cache(path: str, cat: dict[str, Any]) -> None:
    try:
        from batchmates.io import atomic_write_text

        atomic_write_text(path, json.dumps(cat))
        for name in os.listdir(os.path.dirname(path)):  # snapshots of older source trees
            if name.startswith("catalog-") and name.endswith(".json") and name != os.path.basename(path):
                os.unlink(os.path.join(os.path.dirname(path), name))
    except (OSError, TypeError, ValueError):
        pass  # no cache: the next listing builds the snapshot again


# ---------------------------------------------------------------------------------------------- checks
def _method(cat: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in cat["methods"]:
        raise ConfigError(f"method={name!r} is not registered; choose one of {list(cat['methods'])}")
    return cat["methods"][name]


def check_options(method: str, raw: dict[str, Any] | None, cat: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parse ``--opt`` values of ``method`` as :meth:`Method.parse_options` does (ConfigError naming the option)."""
    cat = cat or catalog()
    m = _method(cat, method)
    unknown = sorted(k for k in (raw or {}) if k not in m["options"])
    if unknown:
        listing = m["describe_options"] or "  (this method has no options)"
        raise ConfigError(f"unknown option(s) {unknown} for method {method!r}; its options are:\n{listing}")
    return {k: _option(m["options"][k]).parse(k, v) for k, v in (raw or {}).items()}


def check_data(name: str, cat: dict[str, Any] | None = None) -> None:
    """The ``--data`` value names a registered dataset (and carries its argument, e.g. ``imagefolder:PATH``)."""
    cat = cat or catalog()
    base, sep, argument = str(name).strip().partition(":")
    if base.strip().lower() not in cat["datasets"]:
        shown = [d + (":" + cat["datasets"][d] if cat["datasets"][d] else "") for d in cat["datasets_shown"]]
        raise ConfigError(f"data={name!r}: unknown dataset; choose one of {shown}")
    arg = cat["datasets"][base.strip().lower()]
    if arg and not argument:
        raise ConfigError(f"--data {name!r}: {base} needs {base}:{arg}, e.g. {base}:~/images")
    if not arg and sep:
        raise ConfigError(f"--data {name!r}: {base} takes no ':{argument}'; pass --data {base}")


def check_names(method: str, options: dict[str, Any] | None, data: str | None, backbone: str | None = None,
                attn_layer: str | None = None) -> None:
    """Method, options, dataset, backbone and attention-layer names, checked against the snapshot."""
    cat = catalog()
    check_options(method, options, cat)
    if data is not None:
        check_data(data, cat)
    if backbone is not None and ":" not in backbone and backbone not in cat["backbones"]:
        raise ConfigError(f"backbone={backbone!r} is not registered; choose one of {cat['backbones']} (--backbone)")
    if attn_layer is not None and attn_layer not in cat["attn_layers"]:
        raise ConfigError(f"attn_layer={attn_layer!r} is not registered; choose one of {cat['attn_layers']} "
                          "(--attn-layer)")


def method_help(name: str, data: str = "digits") -> str:
    """The ``batchmates methods`` text of one method on ``data`` (from the snapshot when it has that dataset)."""
    m = _method(catalog(), name)
    if data not in m["supports"]:  # e.g. imagefolder:PATH: ask the method itself
        from batchmates.methods import get_method

        m = method_entry(get_method(name), [data])
    lines = [m["describe"], f"  supports {data}: {m['supports'][data]}",
             "  defaults on " + data + ": " + ", ".join(f"{k}={v}" for k, v in m["defaults"][data].items())]
    opts = m["describe_options"]
    lines.append("  options (--opt KEY=VALUE):" + ("\n" + opts if opts else " none"))
    return "\n".join(lines)


def method_names() -> list[str]:
    return list(catalog()["methods"])
