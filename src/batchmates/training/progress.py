"""What a run prints while it works: progress bars that count epochs from 1, and the evaluation phase's lines.

Paper: none (library infrastructure).

Library choices: Lightning's bars number epochs from 0 and show the last epoch's index ("Epoch 0/0" for a
one-epoch run); these say "Epoch 1/1". The Rich bar is used on a terminal, the tqdm bar (refreshed every 50
steps) otherwise. Evaluation after training (features, kNN, linear probe) has no Lightning bar; it prints one line
when it starts and one when it ends, with its duration.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

__all__ = ["EpochRichProgressBar", "EpochTQDMProgressBar", "progress_bar", "epoch_description", "EvalProgress"]


def epoch_description(current_epoch: int, max_epochs: int | None) -> str:
    """``"Epoch 1/4"`` for Lightning's 0-based ``current_epoch`` 0 of 4 epochs (``"Epoch 1"`` without a limit)."""
    return f"Epoch {current_epoch + 1}" + (f"/{max_epochs}" if max_epochs is not None and max_epochs > 0 else "")


class EpochRichProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        text = epoch_description(current_epoch, self.trainer.max_epochs)
        return f"{text:{len(self.validation_description)}}" if len(self.validation_description) > len(text) else text


class EpochTQDMProgressBar(TQDMProgressBar):
    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(epoch_description(trainer.current_epoch, trainer.max_epochs))


def progress_bar(enabled: bool) -> Any:
    """The run's progress bar callback, or None when disabled."""
    if not enabled:
        return None
    if sys.stdout.isatty():
        return EpochRichProgressBar(leave=True)
    return EpochTQDMProgressBar(refresh_rate=50)


class EvalProgress:
    """``with EvalProgress(protocols, enabled):`` prints "evaluating ..." and then "... done in 3.2 s"."""

    def __init__(self, protocols: Sequence[str], enabled: bool = True, *, what: str = "the trained model") -> None:
        self.protocols, self.enabled, self.what = list(protocols), enabled, what
        self._t0 = 0.0

    def __enter__(self) -> EvalProgress:
        self._t0 = time.perf_counter()
        if self.enabled:
            print(f"Evaluating {self.what}: {', '.join(self.protocols)} (frozen features; this may take a while) ...",
                  flush=True)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self.enabled and exc_type is None:
            print(f"Evaluation done in {time.perf_counter() - self._t0:.1f} s", flush=True)
