"""Trainable methods: a registry of :class:`Method` LightningModules (``batchmates train --method NAME``).

Adding a method is one file (a ``Method`` subclass decorated with ``@register_method("name")``) plus one import
line below. See :mod:`batchmates.methods.base` for the hooks; ``Method.from_checkpoint(path)`` rebuilds a trained
method from its run directory without loading the dataset.

Paper: none here (each method's module cites its paper).

Library choices: the methods floor imports the building blocks (losses, nn, curation, models, data) and the
bottom floor (:mod:`batchmates.config`), never the trainer.
"""

from batchmates.config import DataInfo
from batchmates.methods.base import Method, set_eval_mode
from batchmates.methods.registry import (
    UnknownMethodError,
    available_methods,
    get_method,
    methods_for_dataset,
    register_method,
)

# Built-in methods register themselves on import (one line per method).
from batchmates.methods import ce  # noqa: E402,F401  isort: skip
from batchmates.methods import ba2m  # noqa: E402,F401  isort: skip
from batchmates.methods import batchformer  # noqa: E402,F401  isort: skip
from batchmates.methods import btn  # noqa: E402,F401  isort: skip
from batchmates.methods import ibaformer  # noqa: E402,F401  isort: skip
from batchmates.methods import supcon  # noqa: E402,F401  isort: skip
from batchmates.methods import barlow  # noqa: E402,F401  isort: skip
from batchmates.methods import swav  # noqa: E402,F401  isort: skip
from batchmates.methods import cc  # noqa: E402,F401  isort: skip

__all__ = [
    "Method",
    "DataInfo",
    "set_eval_mode",
    "register_method",
    "get_method",
    "available_methods",
    "methods_for_dataset",
    "UnknownMethodError",
]
