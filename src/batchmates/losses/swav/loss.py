"""The SwAV multi-crop swapped-prediction loss (Caron et al. 2020, arXiv:2006.09882, Eq. 1-3).

Paper: for each assignment crop, Sinkhorn codes (no gradient) are predicted by the softmax (temperature 0.1) of
every other crop's prototype scores; the cross-entropies are averaged over the pairs. An optional queue of past
embeddings enlarges the batch seen by Sinkhorn (Sec. 4).

Library choices: one softmax per crop with an analytic in-place gradient (:class:`_SoftTargetCE`); float32 or
higher under autocast; the global-batch mean under ``torch.distributed``; one device sync for all checks, codes
included (no sample is ever dropped silently). Details in :func:`swav_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from batchmates import distributed as bmd

from ._common import ScoreList, check_scores, non_finite_error, work_dtype
from .sinkhorn import check_sinkhorn_options, degenerate_codes_error, log_domain_sinkhorn

__all__ = ["swav_loss", "SwAVLoss"]


class _SoftTargetCE(torch.autograd.Function):
    """``-sum_b <w_b, log_softmax(s_b / tau)>`` for a constant weight ``w``, with an analytic backward.

    The gradient ``(softmax(s / tau) * rowsum(w) - w) / tau`` is formed in place from the saved log-probabilities
    (one ``[B, K]`` buffer, three passes); autograd through ``log_softmax`` and a product allocates several.
    """

    @staticmethod
    def forward(ctx, s: Tensor, w: Tensor, w_rowsum: Tensor, tau: float) -> Tensor:  # type: ignore[override]
        logp = torch.log_softmax(s.detach().to(w.dtype) / tau, dim=1)
        ctx.save_for_backward(logp, w, w_rowsum)
        ctx.tau = tau
        ctx.in_dtype = s.dtype
        return -torch.dot(w.reshape(-1), logp.reshape(-1))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        logp, w, w_rowsum = ctx.saved_tensors
        scale = grad.to(w.dtype) / ctx.tau
        g = logp.exp().mul_((w_rowsum * scale).unsqueeze(1)).addcmul_(w, -scale)
        return g.to(ctx.in_dtype), None, None, None


def _as_crops(crops: Tensor | ScoreList, name: str) -> list[Tensor]:
    if isinstance(crops, Tensor):
        if crops.dim() == 3:
            return list(crops.unbind(0))
        raise ValueError(
            f"{name} must be a list of [B, K] score tensors (one per crop) or a stacked [V, B, K] tensor, "
            f"got a tensor of shape {tuple(crops.shape)}"
        )
    if not isinstance(crops, Sequence):
        raise TypeError(f"{name} must be a list of [B, K] score tensors, got {type(crops).__name__}")
    return list(crops)


def _check_options(temperature: float, epsilon: float, iterations: int, sinkhorn_dtype: torch.dtype) -> None:
    if not (isinstance(temperature, int | float) and temperature > 0):
        raise ValueError(f"temperature must be a positive number (paper default 0.1), got {temperature!r}")
    check_sinkhorn_options(epsilon, iterations, sinkhorn_dtype, prefix="sinkhorn_")


def _check_finite_all(
    high: list[Tensor], low: list[Tensor], queue: list[Tensor] | None, codes: list[Tensor], epsilon: float
) -> None:
    """One device sync: every input finite, then every code row finite (else the error names the tensor)."""
    named = [(f"high[{i}]", c) for i, c in enumerate(high)] + [(f"low[{i}]", c) for i, c in enumerate(low)]
    named += [(f"queue_scores[{i}]", c) for i, c in enumerate(queue or [])]
    flags = torch.stack([torch.isfinite(c).all() for _, c in named] + [torch.isfinite(q).all() for q in codes])
    if bool(flags.all()):
        return
    bad = int((~flags).nonzero()[0, 0])
    if bad < len(named):
        raise non_finite_error(named[bad][0])
    i = bad - len(named)
    raise degenerate_codes_error(f"high[{i}]", codes[i], epsilon, "sinkhorn_dtype")


def swav_loss(
    high: Tensor | ScoreList,
    low: Tensor | ScoreList = (),
    queue_scores: Tensor | ScoreList | None = None,
    *,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    sinkhorn_dtype: torch.dtype = torch.float32,
    gather: bool = True,
    queue_is_replicated: bool = True,
    validate: bool = True,
) -> Tensor:
    """Multi-crop swapped-prediction loss of SwAV (arXiv:2006.09882, Eq. 1-3).

    Paper: for each assignment crop ``i`` (the high-resolution crops), codes ``q_i = sinkhorn(scores_i)``
    (no gradient); for every other crop ``v`` (other high crops and all low crops) the cross-entropy
    ``-sum_k q_ik log softmax(scores_v / temperature)_k``, averaged over the batch, over the ``V - 1`` other crops
    and over the assignment crops - the normalisation of the official ``main_swav.py`` and of lightly.

    Queue (paper, Sec. 4 / official code): when ``queue_scores`` is given, the scores of the queued embeddings
    for assignment crop ``i`` are prepended to ``scores_i`` before Sinkhorn and the codes of the current batch
    are the last ``B`` rows. Sinkhorn is permutation-equivariant, so prepending or appending is the same.

    Library choices: each crop's softmax is computed once (not once per pair): the loss is
    ``-sum_v <W_v, log_softmax(scores_v / T)>`` with the no-grad weight ``W_v = sum_{i != v} q_i``, evaluated by
    a small autograd function with an analytic, in-place gradient; softmaxes and Sinkhorn run in float32 or
    higher with autocast disabled; the result is float32 (float64 for float64 scores). Sinkhorn is the
    log-domain form of :func:`sinkhorn_knopp`, so every sample's codes sum to 1 whatever the scale of the scores,
    and every sample counts in the loss: a non-finite code (scores spanning more than the working dtype holds)
    raises a ``ValueError`` with ``validate=True`` and gives a NaN loss with ``validate=False``, never a smaller
    finite loss.

    Distributed (``gather=True``): Sinkhorn totals are all-reduced (scores are not gathered) and the loss is the
    mean over the global batch, identical on every rank, so DDP's gradient averaging gives the exact global
    gradient. The queue is the same on every rank (:class:`SwAVQueue` stores the gathered global batch); with
    ``queue_is_replicated=True`` each rank feeds only its ``1/W`` share of the queue rows to Sinkhorn so that the
    queue counts once in the global totals. Pass ``queue_is_replicated=False`` if each rank holds its own queue.

    Args:
        high: assignment crops, a list of ``[B, K]`` scores (default: the 2 high-resolution crops).
        low: the other crops, a list of ``[B, K]`` scores (may be empty).
        queue_scores: optional, one ``[L, K]`` score tensor per assignment crop (or stacked ``[n_high, L, K]``).
        temperature: softmax temperature of the predictions (paper default 0.1).
        epsilon, sinkhorn_iterations, sinkhorn_dtype: see :func:`sinkhorn_knopp`.
        gather: global-batch semantics under ``torch.distributed`` (opt out with False).
        queue_is_replicated: see above.
        validate: check that the scores and the codes are finite (one device sync for all of them).

    Returns:
        Scalar loss.
    """
    high_l = _as_crops(high, "high")
    low_l = _as_crops(low, "low")
    if len(high_l) == 0:
        raise ValueError("high must contain at least one assignment crop's scores")
    if len(high_l) + len(low_l) < 2:
        raise ValueError(
            "SwAV needs at least 2 crops in total (the codes of one crop are predicted from another); "
            f"got {len(high_l)} high and {len(low_l)} low"
        )
    _check_options(temperature, epsilon, sinkhorn_iterations, sinkhorn_dtype)
    crops = high_l + low_l
    for idx, c in enumerate(crops):
        name = f"high[{idx}]" if idx < len(high_l) else f"low[{idx - len(high_l)}]"
        check_scores(c, name)
        if c.shape != crops[0].shape:
            raise ValueError(
                f"every crop must have the same [B, K] scores shape; high[0] has {tuple(crops[0].shape)} but "
                f"{name} has {tuple(c.shape)} (all crops come from the same B images and K prototypes)"
            )
    b, k = crops[0].shape
    queue_l: list[Tensor] | None = None
    if queue_scores is not None:
        queue_l = _as_crops(queue_scores, "queue_scores")
        if len(queue_l) != len(high_l):
            raise ValueError(
                f"queue_scores must hold one [L, K] tensor per assignment crop ({len(high_l)}), got {len(queue_l)}"
            )
        for idx, qs in enumerate(queue_l):
            check_scores(qs, f"queue_scores[{idx}]")
            if qs.shape[1] != k:
                raise ValueError(
                    f"queue_scores[{idx}] has {qs.shape[1]} prototype columns but the crops have {k}; score the "
                    "queue with the same prototypes"
                )
    distributed = gather and bmd.is_distributed()
    n_high, n_crops = len(high_l), len(crops)
    work = work_dtype(crops[0], torch.float32)
    with torch.autocast(device_type=crops[0].device.type, enabled=False):
        # Codes (no grad) folded into one weight per crop, W_v = sum_{i != v} q_i over assignment crops i, so
        # that loss_sum = -sum_v <W_v, log_softmax(s_v / T)>: one softmax per crop instead of one per pair.
        with torch.no_grad():
            codes = []
            for i, s_i in enumerate(high_l):
                s_i = s_i.detach()
                if queue_l is not None:
                    qs = queue_l[i].detach()
                    if distributed and queue_is_replicated:
                        qs = torch.tensor_split(qs, bmd.world_size())[bmd.rank()]
                    dt = torch.promote_types(qs.dtype, s_i.dtype)
                    s_i = torch.cat([qs.to(dt), s_i.to(dt)])
                s_i = s_i.to(work_dtype(s_i, sinkhorn_dtype))
                q = log_domain_sinkhorn(s_i, epsilon, sinkhorn_iterations, gather)
                codes.append(q[q.shape[0] - b :])
            if validate:  # after Sinkhorn, so that inputs and codes cost one device sync together
                _check_finite_all(high_l, low_l, queue_l, codes, epsilon)
            codes = [q.to(work) for q in codes]
            q_total = codes[0] if n_high == 1 else torch.stack(codes).sum(0)
            total_rowsum = q_total.sum(1)
        loss_sum = crops[0].new_zeros((), dtype=work)
        for v, s_v in enumerate(crops):
            if v < n_high:
                with torch.no_grad():
                    w_v = q_total - codes[v]
                loss_sum = loss_sum + _SoftTargetCE.apply(s_v, w_v, w_v.sum(1), temperature)
            else:
                loss_sum = loss_sum + _SoftTargetCE.apply(s_v, q_total, total_rowsum, temperature)
        norm = n_high * (n_crops - 1)
        if distributed:
            n_global = bmd.global_count(b, crops[0].device)
            return bmd.all_reduce_sum(loss_sum / (norm * n_global))
        return loss_sum / (norm * b)


class SwAVLoss(nn.Module):
    """SwAV multi-crop swapped-prediction loss (arXiv:2006.09882); module form of :func:`swav_loss`.

    ``SwAVLoss(temperature=0.1, epsilon=0.05, sinkhorn_iterations=3)(high, low=(), queue_scores=None)`` where
    ``high`` is the list of ``[B, K]`` prototype scores of the assignment crops (the 2 high-resolution crops by
    default in SwAV) and ``low`` those of the other crops. Paper defaults: temperature 0.1, epsilon 0.05, 3
    iterations. Keyword-only options (library): ``sinkhorn_dtype`` (float32 or float64), ``gather`` (global batch
    under ``torch.distributed``), ``queue_is_replicated``, ``validate``; see :func:`swav_loss`.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        *,
        sinkhorn_dtype: torch.dtype = torch.float32,
        gather: bool = True,
        queue_is_replicated: bool = True,
        validate: bool = True,
    ) -> None:
        super().__init__()
        _check_options(temperature, epsilon, sinkhorn_iterations, sinkhorn_dtype)
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)
        self.sinkhorn_iterations = sinkhorn_iterations
        self.sinkhorn_dtype = sinkhorn_dtype
        self.gather = gather
        self.queue_is_replicated = queue_is_replicated
        self.validate = validate

    def forward(
        self,
        high: Tensor | ScoreList,
        low: Tensor | ScoreList = (),
        queue_scores: Tensor | ScoreList | None = None,
    ) -> Tensor:
        return swav_loss(
            high,
            low,
            queue_scores,
            temperature=self.temperature,
            epsilon=self.epsilon,
            sinkhorn_iterations=self.sinkhorn_iterations,
            sinkhorn_dtype=self.sinkhorn_dtype,
            gather=self.gather,
            queue_is_replicated=self.queue_is_replicated,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, epsilon={self.epsilon}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}, gather={self.gather}"
        )
