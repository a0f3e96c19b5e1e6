"""Barlow Twins loss (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021,
arXiv:2103.03230).

For two views ``z_A, z_B ∈ R^{N×D}``, each normalised per feature over the batch (mean 0, std 1)::

    C = ẑ_Aᵀ ẑ_B / N,        L = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²                       (paper, eq. 1-2)

Paper / official code: the formula, ``λ = 0.0051`` (paper text 5e-3), batch normalisation without affine (mean 0,
biased variance, eps 1e-5), an optional overall ``scale_loss``, statistics over the global batch.
Library choices:
    * Global batch under ``torch.distributed`` without gathering the batch: per-feature sums and centred sums of
      squares are reduced with the autograd-aware :func:`batchmates.distributed.all_reduce_sum`, and ``C`` is the
      all-reduced sum of the local products ``ẑ_Aᵀ ẑ_B``. Every rank returns the same loss and gradients are exact
      (the official code's raw ``all_reduce`` has no backward and gives 1/W of the gradient, lightly #1977).
    * In one process, when ``2N < D`` the loss is computed from the ``N×N`` Gram matrices
      (``‖C‖²_F = Σ (ẑ_A ẑ_Aᵀ) ∘ (ẑ_B ẑ_Bᵀ) / N²``, diagonal from ``Σ_n ẑ_A ẑ_B``), ``O(N²D)`` instead of
      ``O(ND²)``; same value, never a ``D×D`` matrix (``algorithm="auto"``; force with ``"cross"``/``"gram"``).
    * Statistics and ``C`` in float32 or higher with autocast disabled; the loss is returned in that dtype.
    * ``N = 1`` (global) raises ``ValueError``: the per-feature variance is undefined.
    * The NaN/inf check of the inputs runs on the CPU only by default (``check_finite=None``): on an accelerator
      it would cost a host-device sync per call.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from batchmates import distributed as bdist
from batchmates._checks import ensure_finite
from batchmates.losses._kernels import no_autocast as _no_autocast

__all__ = ["barlow_twins_loss", "BarlowTwinsLoss"]

Algorithm = Literal["auto", "cross", "gram"]


def _validate(
    z_a: Tensor, z_b: Tensor, lambda_param: float, eps: float, algorithm: str, check_finite: bool | None
) -> None:
    for name, z in (("z_a", z_a), ("z_b", z_b)):
        if not isinstance(z, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [N, D], got {type(z).__name__}")
        if z.ndim != 2:
            raise ValueError(f"{name} must have shape [N, D] (batch, features), got {tuple(z.shape)}; flatten it first")
        if not z.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {z.dtype}")
        if z.shape[1] < 1:
            raise ValueError(f"{name} must have at least one feature, got shape {tuple(z.shape)}")
        ensure_finite(
            z,
            check_finite,
            f"{name} contains NaN or inf; check the projector output (learning rate, AMP scaler); "
            "check_finite=False skips this check",
        )
    if z_a.shape != z_b.shape:
        raise ValueError(f"z_a and z_b must have the same shape [N, D], got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    if z_a.device != z_b.device:
        raise ValueError(f"z_a is on {z_a.device} but z_b on {z_b.device}; put both views on one device")
    if not (lambda_param >= 0 and lambda_param < float("inf")):
        raise ValueError(f"lambda_param must be a finite non-negative number, got {lambda_param}")
    if not (eps >= 0 and eps < float("inf")):
        raise ValueError(f"eps must be a finite non-negative number, got {eps}")
    if algorithm not in ("auto", "cross", "gram"):
        raise ValueError(f"algorithm must be 'auto', 'cross' or 'gram', got {algorithm!r}")


def barlow_twins_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    lambda_param: float = 0.0051,
    scale_loss: float = 1.0,
    eps: float = 1e-5,
    gather: bool = True,
    algorithm: Algorithm = "auto",
    check_finite: bool | None = None,
) -> Tensor:
    """Barlow Twins loss (Zbontar et al. 2021, arXiv:2103.03230) over the global batch.

    Args:
        z_a, z_b: ``[N, D]`` projector outputs of the two views (this rank's share of the batch).
        lambda_param: weight ``λ`` of the redundancy-reduction (off-diagonal) term, 0.0051 as in the official code.
        scale_loss: overall factor on the loss (official option; 1.0 = the paper's formula).
        eps: added to the biased variance before the square root (BatchNorm's 1e-5).
        gather: under ``torch.distributed``, use global statistics and the global ``C`` (default). ``False`` is an
            explicit opt-out: each rank normalises and correlates its local batch only.
        algorithm: ``"cross"`` (the ``D×D`` matrix ``C``), ``"gram"`` (``N×N`` Gram matrices, one process only) or
            ``"auto"`` (Gram when ``2N < D`` in one process; library choice).
        check_finite: check that ``z_a`` and ``z_b`` hold no NaN/inf. ``None`` (default): on the CPU only, so no
            host-device sync (and no ``torch.compile`` graph break) on accelerators; ``True``/``False`` force it.

    Returns:
        Scalar loss, identical on every rank; float32 for half-precision inputs, else the input dtype.
    """
    _validate(z_a, z_b, lambda_param, eps, algorithm, check_finite)
    distributed = gather and bdist.is_distributed()
    n_local, dim = z_a.shape
    n = bdist.global_count(n_local, z_a.device) if distributed else n_local
    if n < 2:
        raise ValueError(
            f"Barlow Twins needs at least 2 samples in the {'global ' if distributed else ''}batch: the per-feature "
            f"variance is undefined for N={n}"
        )
    if algorithm == "gram" and distributed:
        raise ValueError("algorithm='gram' needs the whole batch in one process; use 'cross' or 'auto' under DDP")
    compute_dtype = torch.float64 if torch.float64 in (z_a.dtype, z_b.dtype) else torch.float32

    with _no_autocast(z_a.device):
        a = z_a.to(compute_dtype)
        b = z_b.to(compute_dtype)
        if distributed:
            # Global mean and biased variance from autograd-aware sums (two-pass: centred sum of squares).
            sums = bdist.all_reduce_sum(torch.stack([a.sum(0), b.sum(0)]))
            mean = sums / n
            a = a - mean[0]
            b = b - mean[1]
            sq = bdist.all_reduce_sum(torch.stack([a.square().sum(0), b.square().sum(0)]))
            inv_std = torch.rsqrt(sq / n + eps)
        else:
            a = a - a.mean(0)
            b = b - b.mean(0)
            inv_std = torch.rsqrt(torch.stack([a.square().mean(0), b.square().mean(0)]) + eps)
        a = a * inv_std[0]
        b = b * inv_std[1]

        use_gram = algorithm == "gram" or (algorithm == "auto" and not distributed and 2 * n < dim)
        if use_gram:
            diag = (a * b).sum(0) / n
            frob_sq = ((a @ a.T) * (b @ b.T)).sum() / (n * n)
            off_sq = frob_sq - diag.square().sum()
        else:
            c = a.T @ b
            if distributed:
                c = bdist.all_reduce_sum(c)
            c = c / n
            diag = torch.diagonal(c)
            off_sq = c.square().sum() - diag.square().sum()
        loss = (1 - diag).square().sum() + lambda_param * off_sq
        return loss * scale_loss


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins loss (Zbontar et al. 2021, arXiv:2103.03230); see :func:`barlow_twins_loss`.

    ``BarlowTwinsLoss(lambda_param=0.0051, *, scale_loss=1.0, eps=1e-5, gather=True)(z_a, z_b)`` with
    ``z_a, z_b [N, D]`` returns a scalar, computed with global-batch statistics under ``torch.distributed``.
    ``algorithm`` and ``check_finite`` are documented on :func:`barlow_twins_loss`.
    """

    def __init__(
        self,
        lambda_param: float = 0.0051,
        *,
        scale_loss: float = 1.0,
        eps: float = 1e-5,
        gather: bool = True,
        algorithm: Algorithm = "auto",
        check_finite: bool | None = None,
    ) -> None:
        super().__init__()
        if not (lambda_param >= 0 and lambda_param < float("inf")):
            raise ValueError(f"lambda_param must be a finite non-negative number, got {lambda_param}")
        if algorithm not in ("auto", "cross", "gram"):
            raise ValueError(f"algorithm must be 'auto', 'cross' or 'gram', got {algorithm!r}")
        self.lambda_param = float(lambda_param)
        self.scale_loss = float(scale_loss)
        self.eps = float(eps)
        self.gather = gather
        self.algorithm = algorithm
        self.check_finite = check_finite

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        return barlow_twins_loss(
            z_a,
            z_b,
            lambda_param=self.lambda_param,
            scale_loss=self.scale_loss,
            eps=self.eps,
            gather=self.gather,
            algorithm=self.algorithm,
            check_finite=self.check_finite,
        )

    def extra_repr(self) -> str:
        return f"lambda_param={self.lambda_param}, scale_loss={self.scale_loss}, eps={self.eps}, gather={self.gather}"
