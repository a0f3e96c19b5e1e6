"""The method registry: ``@register_method("name")`` makes a :class:`~batchmates.methods.base.Method` trainable
by name from the CLI (``batchmates train --method name``) and from :func:`batchmates.training.train`.

Registering a method is one file (the subclass, decorated) plus one import line in ``methods/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from batchmates.methods.base import Method

__all__ = ["register_method", "get_method", "available_methods", "methods_for_dataset", "UnknownMethodError"]

_METHODS: dict[str, type[Method]] = {}
M = TypeVar("M", bound="type[Method]")


class UnknownMethodError(ValueError):
    """``method`` is not registered; the message lists the registered names."""


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator registering a ``Method`` subclass under ``name`` (lower case, no spaces)."""
    if not isinstance(name, str) or not name or name != name.strip().lower() or " " in name or "," in name:
        raise ValueError(f"method name must be a non-empty lower-case word without spaces or commas, got {name!r}")

    def deco(cls: M) -> M:
        from batchmates.methods.base import Method

        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register_method({name!r}) must decorate a subclass of batchmates.methods.Method")
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__qualname__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type[Method]:
    """The ``Method`` class registered as ``name``; :class:`UnknownMethodError` lists the choices otherwise."""
    import batchmates.methods  # noqa: F401  (registers the built-in methods)

    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"method={name!r} is not registered; choose one of {available_methods()}") from None


def available_methods() -> list[str]:
    """Registered method names, in registration order."""
    import batchmates.methods  # noqa: F401

    return list(_METHODS)


def methods_for_dataset(data: str) -> list[str]:
    """Registered methods that declare support for dataset ``data`` (what ``--methods all`` means)."""
    return [n for n in available_methods() if _METHODS[n].supports(data)]
