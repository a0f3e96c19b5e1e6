"""The method registry: ``@register_method("name")`` makes a :class:`~batchmates.methods.base.Method` trainable
by name from the CLI (``batchmates train --method name``) and from :func:`batchmates.training.train`.

Registering a method is one file (the subclass, decorated) plus one import line in ``methods/__init__.py``;
importing :mod:`batchmates.methods` registers the built-in ones.

Paper: none (library infrastructure).

Library choices:

* One :class:`batchmates.registry.Registry` (:data:`METHODS`) holds the classes; this module imports nothing of
  the methods themselves (the package ``__init__`` imports them), so ``base.py`` can look methods up by name.
* Importing this module installs :func:`get_method` as the look-up of ``RunConfig.resolve()``
  (:func:`batchmates.config.set_method_lookup`): the config floor never imports the methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from batchmates.config import set_method_lookup
from batchmates.registry import Registry, UnknownNameError

__all__ = ["register_method", "get_method", "available_methods", "methods_for_dataset", "UnknownMethodError",
           "METHODS"]

METHODS: Registry[type] = Registry("method", flag="--method")
M = TypeVar("M", bound=type)


class UnknownMethodError(UnknownNameError):
    """``method`` is not registered; the message lists the registered names (a ``ValueError`` and ``KeyError``)."""


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator registering a ``Method`` subclass under ``name`` (lower case, no spaces)."""
    if not isinstance(name, str) or not name or name != name.strip().lower() or " " in name or "," in name:
        raise ValueError(f"method name must be a non-empty lower-case word without spaces or commas, got {name!r}")

    def deco(cls: M) -> M:
        # Duck-typed so that this module need not import base.py (which imports it).
        if not (isinstance(cls, type) and all(callable(getattr(cls, a, None)) for a in _METHOD_API)):
            raise TypeError(f"@register_method({name!r}) must decorate a subclass of batchmates.methods.Method")
        METHODS.register(name, cls)  # a second, different class under a taken name is a ValueError
        cls.name = name
        return cls

    return deco


_METHOD_API = ("default_settings", "parse_options", "check_config", "from_checkpoint", "training_step")


def get_method(name: str) -> Any:
    """The ``Method`` class registered as ``name``; :class:`UnknownMethodError` lists the choices otherwise."""
    try:
        return METHODS.get(name)
    except UnknownNameError:
        raise UnknownMethodError(f"method={name!r} is not registered; choose one of {available_methods()}") from None


def available_methods() -> list[str]:
    """Registered method names, in registration order."""
    return METHODS.names()


def methods_for_dataset(data: str) -> list[str]:
    """Registered methods that declare support for dataset ``data`` (what ``--methods all`` means)."""
    return [n for n in available_methods() if METHODS.get(n).supports(data)]


set_method_lookup(get_method)
