"""Per-epoch means of the training metrics as running sums on the device, logged once per epoch.

Paper: none (library infrastructure).

Library choices: Lightning's ``self.log`` costs about as much per call as a small model's forward on a CPU
(measured with ``batchmates bench train``: its result collection walks the metric's state on every call), and
``sync_dist=True`` on a step value is a collective and a host sync per step under DDP. So
:meth:`~batchmates.methods.base.Method.log_train` adds each step's values, weighted by the batch size, to these
sums (tensor additions on the training device, no host sync) and the method logs the means once, at the epoch's
last step (with ``sync_dist=True``: the exact global weighted mean over the ranks). The sums are part of the
checkpoint, so a run resumed mid-epoch logs the same epoch means as the uninterrupted run.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["EpochMeans"]


class EpochMeans:
    """``name -> (sum of value × batch size, total batch size)`` for the steps of the current epoch."""

    def __init__(self) -> None:
        self.sums: dict[str, tuple[torch.Tensor, int]] = {}

    def add(self, batch_size: int, values: dict[str, Any], device: torch.device) -> None:
        """Add one step's ``values`` (tensors or numbers) with weight ``batch_size``."""
        for k, v in values.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=device)
            weighted = v.reshape(()) * batch_size
            prev = self.sums.get(k)
            self.sums[k] = (weighted, batch_size) if prev is None else (prev[0].to(v.device) + weighted,
                                                                          prev[1] + batch_size)

    def pop(self) -> dict[str, tuple[torch.Tensor, int]]:
        """``name -> (mean, total batch size)`` of the epoch so far; the sums start again from zero."""
        sums, self.sums = self.sums, {}
        return {k: (s / n, n) for k, (s, n) in sums.items()}

    def state_dict(self) -> dict[str, Any]:
        return {k: (s.detach().cpu(), n) for k, (s, n) in self.sums.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = {k: (torch.as_tensor(s), int(n)) for k, (s, n) in state.items()}
