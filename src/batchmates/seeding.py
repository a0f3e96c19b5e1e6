"""Per-step seeding: the randomness of training step ``t`` depends only on ``(seed, t, rank)``.

Bottom floor: imports only torch. The trainer's seeding callback (:mod:`batchmates.training.callbacks`) calls
:func:`seed_step` before every training step, so a run resumed mid-epoch draws the same augmentations as the
uninterrupted run.

Paper: none (library infrastructure).

Library choices:

* The step seed is a splitmix64 finaliser of ``seed``, ``step`` and ``rank`` mixed with odd 64-bit constants:
  nearby inputs give unrelated seeds, and every rank of a DDP run draws different augmentations.
"""

from __future__ import annotations

import torch

__all__ = ["step_seed", "seed_step"]


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A well-mixed 63-bit seed for training step ``step`` of run ``seed`` on ``rank`` (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB + 1) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


def seed_step(seed: int, step: int, rank: int = 0) -> None:
    """Seed torch's global generators (CPU and every CUDA device) for training step ``step``."""
    torch.manual_seed(step_seed(int(seed), int(step), int(rank)))
