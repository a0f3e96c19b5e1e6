"""Atomic file output: every file batchmates writes goes through here (bottom floor; torch only when needed).

Paper: none (library infrastructure).

Library choices:

* A write goes to a temporary file in the destination's directory, is flushed and ``fsync``-ed, then
  ``os.replace``-d over the destination (atomic on POSIX and Windows within one filesystem). A crash or an
  exception at any point leaves either the previous file or the new one, never a truncated mix, and never a
  stray temporary file (it is removed on error).
* Files get the permissions ``open()`` would give a new file (``0o666`` less the process umask), not the
  ``0o600`` of the temporary file they are written to, so other users can read a run directory as they could
  read any other file of its owner.
* Importing this module does not import torch (the CLI uses it before the heavy stack loads).
* ``batchmates.training.io`` re-exports these names for older imports.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_torch",
    "read_json",
    "verify_checkpoint",
]

PathLike = str | os.PathLike


def _file_mode() -> int:
    """``0o666`` less the current umask (read without changing it where /proc allows, else set and restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: str) -> None:
    # Make the rename itself durable where the platform allows it (not on Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on a clean exit it atomically replaces ``path``.

    ``mode`` is ``"wb"`` or ``"w"`` (text, UTF-8). If the ``with`` body raises, the temporary file is deleted
    and ``path`` is left untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb' for an atomic write, got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            if hasattr(os, "fchmod"):  # POSIX
                os.fchmod(f.fileno(), _file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def _json_default(obj: Any) -> Any:
    if type(obj).__module__.startswith("torch") and hasattr(obj, "tolist"):  # a tensor
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):  # numpy arrays
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def atomic_write_json(path: PathLike, obj: Any, *, indent: int = 2) -> None:
    """Serialise ``obj`` to JSON first (so a serialisation error never touches ``path``), then write atomically."""
    text = json.dumps(obj, indent=indent, default=_json_default, allow_nan=True) + "\n"
    atomic_write_text(path, text)


def atomic_save_torch(obj: Any, path: PathLike, *, save: Callable[[Any, IO[bytes]], None] | None = None) -> None:
    """``torch.save(obj, path)`` atomically (serialised in memory first, then one atomic write)."""
    import torch

    buf = io.BytesIO()
    (save or torch.save)(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def verify_checkpoint(path: PathLike) -> None:
    """Raise :class:`~batchmates.options.RunError` unless ``path`` is a complete checkpoint: non-empty, a readable
    zip archive (a truncated file has no central directory) whose members pass their CRC-32 checks (a flipped bit
    otherwise loads silently with ``torch.load``)."""
    import zipfile

    from batchmates.options import RunError

    path = os.fspath(path)
    fix = ("it cannot be resumed or evaluated. Restore it from a backup, or start the run again with --overwrite "
           "(metrics.csv and metrics.json keep the earlier epochs' numbers)")
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise RunError(f"{path!r} cannot be read ({e.strerror or e}); {fix}") from None
    if size == 0:
        raise RunError(f"{path!r} is empty (0 bytes); {fix}")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise RunError(f"{path!r} is truncated or not a checkpoint ({e}); {fix}") from None
    if bad is not None:
        raise RunError(f"{path!r} is corrupt (member {bad!r} fails its CRC check: the file was damaged on disk); "
                       f"{fix}")


def read_json(path: PathLike, default: Any = None) -> Any:
    """Read a JSON file, or return ``default`` when it does not exist."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default
