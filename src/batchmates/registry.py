"""One small name -> object registry, shared by methods, backbones, attention layers, token mixers and datasets.

```python
from batchmates.registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone", flag="--backbone")

@BACKBONES.register("cnn")
def small_cnn(...): ...

BACKBONES.get("cnn")        # the object; an unknown name raises UnknownNameError listing the choices
BACKBONES.names()           # registration order
"cnn" in BACKBONES
```

Library choices:

* A registry holds what its owner imports: factories import their members (as timm's do), never the other
  way round, so importing a member never builds the factory's table.
* Names are case-sensitive, non-empty, without spaces or commas (commas separate names on the command line).
* Registering a second, different object under a taken name is an error; registering the same object again is
  a no-op (modules can be reloaded).
* :class:`UnknownNameError` is a ``ValueError`` *and* a ``KeyError``, so ``except ValueError`` (input checking)
  and ``except KeyError`` (mapping look-up) both catch it; its message names the argument and the choices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")


class UnknownNameError(ValueError, KeyError):
    """A name that is not registered; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Names to objects (classes or factories) of one kind.

    Args:
        kind: what the registry holds, for messages (``"backbone"``, ``"method"``, ...).
        flag: how a user passes the name (``"--backbone"``), for messages; defaults to ``kind``.
    """

    def __init__(self, kind: str, *, flag: str | None = None) -> None:
        self.kind = kind
        self.flag = flag or kind
        self._items: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: T | None = None):  # type: ignore[no-untyped-def]
        """Register ``obj`` under ``name``; without ``obj``, a decorator that does so."""
        if not isinstance(name, str) or not name or name != name.strip() or " " in name or "," in name:
            raise ValueError(f"{self.kind} name must be a non-empty word without spaces or commas, got {name!r}")

        def add(o: T) -> T:
            old = self._items.get(name)
            if old is not None and old is not o:
                raise ValueError(f"{self.kind} {name!r} is already registered ({_describe(old)})")
            self._items[name] = o
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """The object registered as ``name``; :class:`UnknownNameError` lists the choices otherwise."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownNameError(
                f"{self.flag}={name!r} is not a registered {self.kind}; choose one of {self.names()}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"


def _describe(obj: object) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__qualname__
