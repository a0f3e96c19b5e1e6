"""Sinkhorn-Knopp equal partitioning: the soft codes of SwAV (Caron et al. 2020, arXiv:2006.09882, Sec. 3.1).

Paper: the codes of a batch are ``Q = diag(u) exp(scores / epsilon) diag(v)`` with the prototype totals made
equal (``1/K``) and the sample totals made equal (``1/B``), found by a few alternating normalisations (3 with
``epsilon = 0.05``), then scaled so that each sample's code sums to 1. Codes carry no gradient. In the official
``distributed_sinkhorn`` the prototype totals are summed over the global batch (all-reduced), prototypes first.

Library choices: the iterations run in the log domain on the scaling vectors, with exact shifts, so that float32
gives rows that sum to 1 for any finite scores (see :func:`sinkhorn_knopp`); distributed sums use
:mod:`batchmates.distributed` (scores are never gathered); a non-finite code raises instead of being dropped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from batchmates import distributed as bmd

from ._common import check_scores, global_column_max, non_finite_error, work_dtype

__all__ = ["sinkhorn_knopp"]


def check_sinkhorn_options(epsilon: float, iterations: int, dtype: torch.dtype, prefix: str = "") -> None:
    """Validate Sinkhorn's options; ``prefix`` names them as the caller does (e.g. ``sinkhorn_``)."""
    if not (isinstance(epsilon, int | float) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive number (paper default 0.05), got {epsilon!r}")
    if not (isinstance(iterations, int) and iterations >= 1):
        raise ValueError(f"{prefix}iterations must be an integer >= 1 (paper default 3), got {iterations!r}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{prefix}dtype must be torch.float32 or torch.float64, got {dtype}")


def log_domain_sinkhorn(s: Tensor, epsilon: float, iterations: int, gather: bool) -> Tensor:
    """The codes of ``[B, K]`` scores ``s`` (already detached, in the working dtype, autocast off); no checks.

    Exactly the official iteration, written on ``log u`` (size K) and ``log v`` (size B):
    ``log u_k = -LSE_b(x_bk + log v_b)`` over the global batch, then ``log v_b = -LSE_k(x_bk + log u_k)``, and
    finally ``codes_b = softmax_k(x_bk + log u_k)`` (the last sample normalisation), so every finite row sums to 1.
    The kernel ``x`` is ``scores / epsilon`` minus each column's global max, which the first (prototype)
    normalisation absorbs exactly, as it absorbs the official code's first division by the total. (A per-row
    shift would not be absorbed after finitely many iterations, since the iterations start with the prototypes.)
    """
    distributed = gather and bmd.is_distributed()
    # Shift in score units before dividing by epsilon: every column of x then has max 0, so neither
    # `scores / epsilon` nor a sum of exps can overflow. Out of place: the caller's tensor is never modified.
    x = torch.sub(s, global_column_max(s, gather)).div_(epsilon)
    buf = torch.empty_like(x)  # one [B, K] work buffer, reused by every pass (fresh allocations cost more)
    log_v: Tensor | None = None
    for it in range(iterations):
        # Prototype totals over the (global) batch: a global max per column, then an all-reduced sum of
        # shifted exps. The first time the max is 0 by construction.
        if log_v is None:
            col_max, col = None, torch.exp(x, out=buf).sum(0)
        else:
            col_max = global_column_max(torch.add(x, log_v.unsqueeze(1), out=buf), gather)
            col = buf.sub_(col_max).exp_().sum(0)
        if distributed:
            col = bmd.all_reduce_sum(col)
        log_u = col.log_().neg_() if col_max is None else col.log_().add_(col_max).neg_()
        # Sample totals (local), shifted by each row's max: log v = -LSE over the prototypes. The last time,
        # the normalised rows are the codes (rows sum to 1 up to rounding, like a softmax).
        row = torch.add(x, log_u, out=buf)
        row_max = row.amax(1, keepdim=True)
        row.sub_(row_max).exp_()
        if it == iterations - 1:
            return row.div_(row.sum(1, keepdim=True))
        log_v = row.sum(1).log_().add_(row_max.squeeze(1)).neg_()
    raise AssertionError("unreachable: iterations >= 1 is checked by the callers")


def degenerate_codes_error(name: str, codes: Tensor, epsilon: float, option: str) -> ValueError:
    """The error for non-finite codes: some sample's scores all lie further below their columns' maxima than the
    working dtype holds after dividing by epsilon (its row of logs is all -inf, and the NaN spreads to every
    prototype total)."""
    return ValueError(
        f"Sinkhorn gave non-finite codes for {name} ({codes.dtype}): the scores span more than {codes.dtype} can "
        f"hold after dividing by epsilon={epsilon}. No sample is dropped silently; L2-normalise the features and "
        f"prototypes (scores in [-1, 1]), raise epsilon, or pass {option}=torch.float64"
    )


@torch.no_grad()
def sinkhorn_knopp(
    scores: Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    *,
    dtype: torch.dtype = torch.float32,
    gather: bool = True,
    validate: bool = True,
) -> Tensor:
    """Soft codes of a batch by Sinkhorn-Knopp equal partitioning (SwAV, arXiv:2006.09882, Sec. 3.1).

    Paper: ``Q = diag(u) exp(scores / epsilon) diag(v)`` with prototype totals ``1/K`` and sample totals ``1/B``,
    found by ``iterations`` alternating normalisations (prototypes first, then samples, as in the official
    ``distributed_sinkhorn``), scaled so that each sample's code sums to 1. Codes carry no gradient.

    Library choices (the official result, up to rounding, for every input the official code handles):

    * **Log domain.** The iterations update ``log u`` (size K) and ``log v`` (size B) with log-sum-exp
      normalisations instead of multiplying ``exp(scores / epsilon)``; the codes are the softmax over the
      prototypes of ``scores / epsilon + log u``. Before dividing by ``epsilon`` each column is shifted by its
      global max (the first prototype normalisation absorbs it exactly). So in float32 no sample's codes
      underflow to zero whatever the scale of the scores: each row sums to 1. (The plain algorithm in float32
      zeroed most rows of scores with std 10: 13 of 16 in issue 8.) Cost: two ``exp`` passes over ``[B, K]``
      per iteration, where the plain algorithm needs one in all.
    * **Precision.** The work runs in ``promote_types(scores.dtype, dtype)`` with autocast disabled: float32
      by default, float64 when the scores are float64 or ``dtype=torch.float64``; never bf16/fp16. The codes are
      returned in that dtype.
    * **No silent drop.** A row can only be non-finite when every one of its scores lies further below its
      column's max than the working dtype holds after dividing by ``epsilon`` (``3.4e38 * epsilon``, 1.7e37
      at 0.05, in float32). With ``validate=True`` this raises a ``ValueError`` that names the fix; with
      ``validate=False`` the NaN reaches the caller (and the loss), never a silently smaller value.
    * **Distributed** (``gather=True`` under ``torch.distributed``): each prototype total is a global max
      (one all-reduce of a ``[W, K]`` tensor holding each rank's column maxima) followed by an all-reduced sum
      of shifted exps, both through :mod:`batchmates.distributed`; the scores are never gathered. Each rank gets
      the codes of its own rows, equal to the matching rows of the codes of the global batch computed in one
      process. ``gather=False`` treats the local batch as the whole batch.

    Args:
        scores: ``[B, K]`` prototype scores ``z C^T`` of the samples of this rank.
        epsilon: entropy regularisation (paper default 0.05); smaller is sharper.
        iterations: number of Sinkhorn iterations (paper default 3), at least 1.
        dtype: minimum working precision (float32 or float64).
        gather: all-reduce the prototype totals across ranks (global batch). Identity in one process.
        validate: check that ``scores`` and the codes are finite (one device sync).

    Returns:
        ``[B, K]`` codes, each row summing to 1, columns summing to about ``B_global / K`` over the global batch.
    """
    check_scores(scores, "scores")
    check_sinkhorn_options(epsilon, iterations, dtype)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        codes = log_domain_sinkhorn(scores.detach().to(work_dtype(scores, dtype)), epsilon, iterations, gather)
    if validate:
        flags = torch.stack([torch.isfinite(scores).all(), torch.isfinite(codes).all()])
        if not bool(flags.all()):
            if not bool(flags[0]):
                raise non_finite_error("scores")
            raise degenerate_codes_error("scores", codes, epsilon, "dtype")
    return codes
