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

    def state_dict(self, strategy: Any = None) -> dict[str, Any]:
        """The sums; under DDP (a ``strategy`` with ``world_size > 1``; every rank saves a checkpoint together)
        every rank's, as ``{"per_rank": [rank 0's, rank 1's, ...]}``, so each resumed rank gets its own back (with
        rank 0's alone, the interrupted epoch's global mean was wrong after a resume)."""
        local = {k: (s.detach().cpu(), n) for k, (s, n) in self.sums.items()}
        world = int(getattr(strategy, "world_size", 1) or 1)
        if world <= 1:
            return local
        keys = sorted(self.sums)
        rows = [torch.stack([self.sums[k][0].detach().double().reshape(()),
                             torch.tensor(float(self.sums[k][1]), dtype=torch.float64, device=self.sums[k][0].device)])
                for k in keys]
        mine = torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64, device=strategy.root_device)
        every = strategy.all_gather(mine).reshape(world, len(keys), 2).cpu()
        dtypes = {k: self.sums[k][0].dtype for k in keys}
        return {"per_rank": [{k: (every[r, i, 0].to(dtypes[k]), int(every[r, i, 1])) for i, k in enumerate(keys)}
                             for r in range(world)]}

    def load_state_dict(self, state: dict[str, Any], rank: int = 0) -> None:
        if "per_rank" in state:
            per_rank = state["per_rank"]
            state = per_rank[rank] if rank < len(per_rank) else {}  # another world size: that epoch's mean is partial
        self.sums = {k: (torch.as_tensor(s), int(n)) for k, (s, n) in state.items()}
