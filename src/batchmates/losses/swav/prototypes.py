"""The SwAV prototype layer ``C`` (Caron et al. 2020, arXiv:2006.09882): scores of L2-normalised features.

Paper / official code: a bias-free linear layer whose ``K`` rows are re-normalised to unit norm, applied to
L2-normalised features; its gradients are dropped for the first iterations. Library choices: see
:class:`SwAVPrototypes`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SwAVPrototypes"]


class SwAVPrototypes(nn.Module):
    """The SwAV prototype layer ``C`` (arXiv:2006.09882): scores ``z C^T`` of L2-normalised ``z``.

    Paper / official code: a linear layer without bias, ``K = n_prototypes`` rows of dimension ``dim``, each
    row re-normalised to unit norm under ``no_grad`` at every iteration; features are L2-normalised before it;
    the prototypes' gradients are dropped for the first ``freeze_iterations`` iterations (official
    ``freeze_prototypes_niters``) while the encoder still learns from the loss.

    Library choices:

    * **Row normalisation** happens at the start of ``forward`` whenever the weight changed since the last
      normalisation (tracked with the tensor's in-place version counter), i.e. once after every optimiser step
      or ``load_state_dict``. Calling ``forward`` several times per step (high and low crops, the queue) is
      therefore safe: the weight is not modified between those calls. :meth:`normalize_` forces it.
    * **Unnormalised input** is L2-normalised inside ``forward`` (the gradient flows through the
      normalisation, as in the official model). With ``normalize_input=False`` the input must already have unit
      rows and anything else is rejected with a ``ValueError``.
    * **Freezing**: call :meth:`freeze_prototypes_if` after ``backward()`` and before ``optimizer.step()``; it
      sets ``weight.grad = None`` while ``step < freeze_iterations`` so the optimiser skips the prototypes
      (no momentum or weight-decay update either). The forward graph is unchanged, so this is safe under DDP
      (no "unused parameter" errors), unlike detaching the weight.

    ``forward`` takes one ``[N, dim]`` tensor or a list of them (one per crop) and returns the same structure.
    """

    def __init__(
        self,
        dim: int = 128,
        n_prototypes: int = 3000,
        *,
        freeze_iterations: int = 0,
        normalize_input: bool = True,
    ) -> None:
        super().__init__()
        for name, val in (("dim", dim), ("n_prototypes", n_prototypes)):
            if not (isinstance(val, int) and val >= 1):
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if not (isinstance(freeze_iterations, int) and freeze_iterations >= 0):
            raise ValueError(f"freeze_iterations must be a non-negative integer, got {freeze_iterations!r}")
        self.dim = dim
        self.n_prototypes = n_prototypes
        self.freeze_iterations = freeze_iterations
        self.normalize_input = normalize_input
        self.layer = nn.Linear(dim, n_prototypes, bias=False)
        self._normalized_version: int | None = None
        self.normalize_()

    @property
    def weight(self) -> nn.Parameter:
        """The ``[n_prototypes, dim]`` prototype matrix ``C`` (unit rows after :meth:`normalize_`)."""
        return self.layer.weight

    @torch.no_grad()
    def normalize_(self) -> None:
        """Re-normalise the prototype rows to unit L2 norm in place (no gradient)."""
        w = self.layer.weight
        w.copy_(F.normalize(w, dim=1))
        self._normalized_version = w._version

    def _maybe_normalize(self) -> None:
        if self.layer.weight._version != self._normalized_version:
            self.normalize_()

    def is_frozen(self, step: int) -> bool:
        """True while the prototypes are frozen (``step < freeze_iterations``)."""
        return step < self.freeze_iterations

    def freeze_prototypes_if(self, step: int) -> bool:
        """Drop the prototypes' gradient (``grad = None``) if ``step < freeze_iterations``; return whether it did.

        Call after ``loss.backward()`` and before ``optimizer.step()`` (in Lightning: ``on_after_backward``).
        """
        if self.is_frozen(step):
            self.layer.weight.grad = None
            return True
        return False

    def _scores(self, z: Tensor, name: str) -> Tensor:
        if not isinstance(z, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [N, {self.dim}], got {type(z).__name__}")
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(
                f"{name} must have shape [N, {self.dim}] (features of dimension dim={self.dim}), got {tuple(z.shape)}"
            )
        if self.normalize_input:
            z = F.normalize(z, dim=1)
        else:
            with torch.no_grad():
                norms = z.detach().float().norm(dim=1)
                ok = bool(((norms - 1).abs() <= 1e-3).all()) if z.shape[0] else True
            if not ok:
                raise ValueError(
                    f"{name} rows must be L2-normalised when normalize_input=False (found norms in "
                    f"[{norms.min().item():.4g}, {norms.max().item():.4g}]); normalise them with "
                    "F.normalize(z, dim=1) or construct SwAVPrototypes(normalize_input=True)"
                )
        return self.layer(z)

    def forward(self, z: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        self._maybe_normalize()
        if isinstance(z, Tensor):
            return self._scores(z, "z")
        return [self._scores(t, f"z[{i}]") for i, t in enumerate(z)]

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n_prototypes={self.n_prototypes}, freeze_iterations={self.freeze_iterations}, "
            f"normalize_input={self.normalize_input}"
        )
