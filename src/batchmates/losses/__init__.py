"""Batch-relational losses: SupCon / SimCLR (NT-Xent), SwAV, Barlow Twins, CC-Loss (see METHODS.md §4-7).

Every loss relates the samples of the global batch: under ``torch.distributed`` it gathers or reduces with the
gradient-exact collectives of :mod:`batchmates.distributed` and returns the same value on every rank.
"""

from .barlow_twins import BarlowTwinsLoss, barlow_twins_loss
from .cached import cached_backward
from .cc_loss import CCLoss, cc_loss
from .supcon import NTXentLoss, SupConLoss, supcon_loss
from .swav import SwAVLoss, SwAVPrototypes, SwAVQueue, sinkhorn_knopp, swav_loss

__all__ = [
    "SupConLoss",
    "NTXentLoss",
    "supcon_loss",
    "BarlowTwinsLoss",
    "barlow_twins_loss",
    "SwAVLoss",
    "SwAVPrototypes",
    "SwAVQueue",
    "sinkhorn_knopp",
    "swav_loss",
    "CCLoss",
    "cc_loss",
    "cached_backward",
]
