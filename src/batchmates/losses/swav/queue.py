"""The SwAV queue of past embeddings (Caron et al. 2020, arXiv:2006.09882, Sec. 4 "small batches").

Paper / official code: embeddings of the assignment crops of the last ``length`` samples, re-scored with the
current prototypes and prepended to the batch's scores before Sinkhorn. Library choices: see :class:`SwAVQueue`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchmates import distributed as bmd

from .prototypes import SwAVPrototypes

__all__ = ["SwAVQueue"]


class SwAVQueue(nn.Module):
    """Queue of past embeddings for SwAV's codes (arXiv:2006.09882, Sec. 4 "small batches" / official code).

    Paper / official: the embeddings of the assignment crops of the last ``length`` samples are kept; at each
    step they are re-scored with the *current* prototypes and their scores are prepended to the batch's
    scores before Sinkhorn, which makes the equal-partition constraint meaningful for small batches.

    Library choices: the queue starts with zeros and is only used once full (:meth:`scores` returns None until
    then; lightly starts with random vectors); :meth:`enqueue` gathers the global batch (no gradient) so every
    rank holds the same queue, the newest samples first; ``length`` must be a multiple of the global batch
    size (checked at the first :meth:`enqueue`). Stored embeddings are L2-normalised (``normalize=True``).
    Buffers are saved in ``state_dict`` so a resumed run keeps its queue.
    """

    embeddings: Tensor
    n_filled: Tensor

    def __init__(
        self,
        length: int,
        dim: int,
        *,
        n_crops: int = 2,
        normalize: bool = True,
        gather: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        for name, val in (("length", length), ("dim", dim), ("n_crops", n_crops)):
            if not (isinstance(val, int) and val >= 1):
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        self.length = length
        self.dim = dim
        self.n_crops = n_crops
        self.normalize = normalize
        self.gather = gather
        self.register_buffer("embeddings", torch.zeros(n_crops, length, dim, dtype=dtype))
        self.register_buffer("n_filled", torch.zeros((), dtype=torch.long))

    @property
    def is_full(self) -> bool:
        return int(self.n_filled) >= self.length

    def reset(self) -> None:
        """Empty the queue (zeros, not used until full again)."""
        self.embeddings.zero_()
        self.n_filled.zero_()

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor | Sequence[Tensor]) -> None:
        """Push the global batch: one ``[B_local, dim]`` tensor per assignment crop (or ``[n_crops, B_local, dim]``).

        Gathers across ranks (every rank must call it), newest first. Raises ``ValueError`` if ``length`` is not a
        multiple of the global batch size.
        """
        crops = list(embeddings.unbind(0)) if isinstance(embeddings, Tensor) and embeddings.dim() == 3 else embeddings
        if isinstance(crops, Tensor) or not isinstance(crops, Sequence):
            raise TypeError(
                f"embeddings must be a list of {self.n_crops} tensors [B, {self.dim}] (one per assignment crop) "
                f"or a tensor [{self.n_crops}, B, {self.dim}]"
            )
        if len(crops) != self.n_crops:
            raise ValueError(f"embeddings must hold {self.n_crops} crops (n_crops), got {len(crops)}")
        b = None
        for i, e in enumerate(crops):
            if not isinstance(e, Tensor) or e.dim() != 2 or e.shape[1] != self.dim:
                shape = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
                raise ValueError(f"embeddings[{i}] must have shape [B, {self.dim}], got {shape}")
            if b is None:
                b = e.shape[0]
            elif e.shape[0] != b:
                raise ValueError(f"all crops must have the same batch size; embeddings[{i}] has {e.shape[0]}, not {b}")
        new = torch.stack([e.detach() for e in crops]).to(self.embeddings.dtype)
        if self.normalize:
            new = F.normalize(new, dim=2)
        if self.gather and bmd.is_distributed():
            new = bmd.gather(new.transpose(0, 1).contiguous()).transpose(0, 1)
        g = new.shape[1]
        if g == 0 or self.length % g != 0:
            raise ValueError(
                f"SwAVQueue length={self.length} must be a multiple of the global batch size {g} "
                f"(batch per rank x world size); use e.g. length={max(g, 1) * max(1, self.length // max(g, 1))}"
            )
        if g < self.length:
            self.embeddings[:, g:] = self.embeddings[:, :-g].clone()
        self.embeddings[:, :g] = new.to(self.embeddings.device)
        self.n_filled.fill_(min(int(self.n_filled) + g, self.length))

    @torch.no_grad()
    def scores(self, prototypes: SwAVPrototypes | nn.Module | Tensor) -> list[Tensor] | None:
        """Scores ``[L, K]`` of the queued embeddings under the current prototypes, one per crop; None if not full.

        ``prototypes`` is a :class:`SwAVPrototypes` (its rows are re-normalised first if they changed), any
        module with a ``weight`` ``[K, dim]``, or the weight itself. Computed without gradient, autocast off.
        """
        if not self.is_full:
            return None
        if isinstance(prototypes, SwAVPrototypes):
            prototypes._maybe_normalize()
        w = prototypes if isinstance(prototypes, Tensor) else prototypes.weight
        if w.dim() != 2 or w.shape[1] != self.dim:
            raise ValueError(f"prototype weight must have shape [K, {self.dim}], got {tuple(w.shape)}")
        with torch.autocast(device_type=w.device.type, enabled=False):
            dt = torch.promote_types(w.dtype, self.embeddings.dtype)
            return list(torch.matmul(self.embeddings.to(dt), w.detach().to(dt).t()).unbind(0))

    def extra_repr(self) -> str:
        return f"length={self.length}, dim={self.dim}, n_crops={self.n_crops}, filled={int(self.n_filled)}"
