"""SwAV building blocks (moved from ``losses/swav.py``; split into one module per part in the next commit)."""

from .loss import SwAVLoss, SwAVPrototypes, SwAVQueue, sinkhorn_knopp, swav_loss

__all__ = ["sinkhorn_knopp", "swav_loss", "SwAVLoss", "SwAVPrototypes", "SwAVQueue"]
