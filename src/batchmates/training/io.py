"""Atomic file output; moved to :mod:`batchmates.io` (the bottom floor), re-exported here for old imports.

Paper: none (library infrastructure). Library choices: a re-export only; new code imports :mod:`batchmates.io`.
"""

from batchmates.io import (
    atomic_open,
    atomic_save_torch,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
)

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save_torch",
           "read_json"]
