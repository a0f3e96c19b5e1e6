"""Small helpers shared by the SwAV modules: input checks, the working dtype, one global max per column.

Paper: nothing here is from the paper (arXiv:2006.09882); these are the library's plumbing.

Library choices: scores are ``[B, K]`` floating-point tensors; work runs in float32 or higher; the global
per-column max under ``torch.distributed`` uses only :func:`batchmates.distributed.all_reduce_sum` (the one
module that talks to ``torch.distributed``), see :func:`global_column_max`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from batchmates import distributed as bmd

ScoreList = Sequence[Tensor]


def work_dtype(x: Tensor, minimum: torch.dtype) -> torch.dtype:
    """``promote_types(x.dtype, minimum)``: never below ``minimum`` (float32 or float64)."""
    return torch.promote_types(x.dtype, minimum)


def check_scores(scores: Tensor, name: str) -> None:
    """Type and shape checks of one ``[B, K]`` score tensor (no device sync)."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of prototype scores [B, K], got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {scores.dtype}; cast it with .float()")
    if scores.dim() != 2:
        raise ValueError(
            f"{name} must have shape [B, K] (samples x prototypes), got shape {tuple(scores.shape)}; "
            "flatten extra dimensions or pass one tensor per crop"
        )
    if scores.shape[1] == 0:
        raise ValueError(f"{name} has no prototype columns (shape {tuple(scores.shape)})")


def non_finite_error(name: str) -> ValueError:
    return ValueError(f"{name} contains NaN or inf; check the encoder output and the learning rate")


def global_column_max(x: Tensor, gather: bool) -> Tensor:
    """Max of each column of ``[B, K]`` ``x`` over the rows of every rank (exact; -inf for a column with no rows).

    Under ``torch.distributed`` each rank writes its column maxima into its own row of a zero ``[W, K]`` tensor,
    one :func:`batchmates.distributed.all_reduce_sum` makes every rank's maxima visible everywhere (adding zeros
    is exact), and the max is taken locally: ``W * K`` numbers on the wire, no gather of the scores.
    """
    m = x.amax(0) if x.shape[0] else x.new_full((x.shape[1],), float("-inf"))
    if gather and bmd.is_distributed():
        slots = x.new_zeros(bmd.world_size(), x.shape[1])
        slots[bmd.rank()] = m
        m = bmd.all_reduce_sum(slots).amax(0)
    return m
