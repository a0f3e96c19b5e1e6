"""Shared handling of ``eval_mode`` for the batch-relational layers of :mod:`batchmates.nn`.

METHODS.md ("Inference"): a module whose output depends on its batch mates has ``eval_mode``:

* ``"independent"`` (default): in ``eval()`` a sample's output never depends on the other samples of the batch
  and equals the module's batch-size-1 behaviour;
* ``"batch"`` (opt-in): the module keeps relating samples in ``eval()`` as it does in training.

In training mode every such module always uses the batch.
"""

from __future__ import annotations

from torch import nn

from batchmates._checks import finite_check_enabled  # re-exported: the layers import it from here

__all__ = ["EVAL_MODES", "check_eval_mode", "uses_batch", "finite_check_enabled"]

EVAL_MODES: tuple[str, ...] = ("independent", "batch")


def check_eval_mode(value: str) -> str:
    """Validate an ``eval_mode`` string and return it.

    Raises:
        TypeError: ``value`` is not a string.
        ValueError: ``value`` is not ``"independent"`` or ``"batch"``.
    """
    if not isinstance(value, str):
        raise TypeError(f"eval_mode must be a string ('independent' or 'batch'), got {type(value).__name__}")
    if value not in EVAL_MODES:
        raise ValueError(
            f"eval_mode must be 'independent' (default: each sample predicted on its own) or 'batch' "
            f"(relate test samples to each other), got {value!r}"
        )
    return value


def uses_batch(module: nn.Module, eval_mode: str) -> bool:
    """Whether ``module`` should relate the samples of its batch in the current call.

    True in training mode, or in eval mode when ``eval_mode == "batch"``; False in eval mode with
    ``eval_mode == "independent"``.
    """
    return bool(module.training) or eval_mode == "batch"
