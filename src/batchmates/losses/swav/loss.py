"""SwAV: swapped prediction of online cluster assignments (Caron et al. 2020, arXiv:2006.09882).

Building blocks, each usable on its own:

* :func:`sinkhorn_knopp` - the equal-partition soft codes of a batch (paper, Sec. 3.1 and Alg. 1 / official code).
* :class:`SwAVPrototypes` - the prototype layer ``C`` (a bias-free linear map with unit-norm rows).
* :func:`swav_loss` / :class:`SwAVLoss` - the multi-crop swapped-prediction loss.
* :class:`SwAVQueue` - the optional queue of past embeddings used to stabilise the codes of small batches.

A training step (single process or DDP, unchanged)::

    protos = SwAVPrototypes(dim=128, n_prototypes=3000, freeze_iterations=313)
    queue = SwAVQueue(length=3840, dim=128)               # optional; length a multiple of the global batch
    loss_fn = SwAVLoss()
    z = [projector(backbone(v)) for v in crops]           # high-resolution crops first
    scores = protos(z)                                    # list of [B, K]; input and rows L2-normalised
    queue_scores = queue.scores(protos) if use_queue else None   # None until the queue is full
    loss = loss_fn(scores[:2], scores[2:], queue_scores=queue_scores)
    loss.backward()
    protos.freeze_prototypes_if(step)                     # drops prototype grads for the first iterations
    optimizer.step()
    if use_queue:
        queue.enqueue(z[:2])                              # after the loss, as the official code does

Global-batch semantics (METHODS.md): Sinkhorn's prototype totals are all-reduced across ranks (scores are never
gathered), the loss is the mean over the global batch, and the queue holds the gathered global batch on every
rank, so W ranks with B/W samples each give the value and gradients of one process with all B.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchmates import distributed as bmd

__all__ = ["sinkhorn_knopp", "swav_loss", "SwAVLoss", "SwAVPrototypes", "SwAVQueue"]

ScoreList = Sequence[Tensor]


def _global_max(x: Tensor, gather: bool) -> Tensor:
    """Max of ``x`` over every rank (one all-reduce of a length-W vector; exact). -inf for no elements."""
    m = x.max() if x.numel() else x.new_full((), float("-inf"))
    if gather and bmd.is_distributed():
        slots = x.new_zeros(bmd.world_size())
        slots[bmd.rank()] = m
        m = bmd.all_reduce_sum(slots).max()
    return m


def _work_dtype(x: Tensor, minimum: torch.dtype) -> torch.dtype:
    return torch.promote_types(x.dtype, minimum)


def _check_scores(scores: Tensor, name: str) -> None:
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


def _check_finite(scores: Tensor, name: str) -> None:
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name} contains NaN or inf; check the encoder output and the learning rate")


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

    Library choices (same result as the official code, up to rounding):

    * The global max of ``scores`` is subtracted before ``exp`` (the codes are invariant to a global factor), so
      ``exp(scores / 0.05)`` cannot overflow even for bf16/fp16 or unnormalised scores.
    * The iterations update two scaling vectors (``u`` of size K, ``v`` of size B) with matrix-vector products
      instead of rewriting the ``[B, K]`` matrix twice per iteration; the matrix is materialised once at the end.
    * The work runs in ``promote_types(scores.dtype, dtype)`` with autocast disabled: float32 by default,
      float64 when the scores are float64 or ``dtype=torch.float64`` - never bf16/fp16. The codes are returned
      in that dtype. Scores of L2-normalised features lie in ``[-1, 1]``, so with ``epsilon=0.05`` every entry
      of ``exp`` is at least ``exp(-40)``: exact in float32. For unnormalised scores spanning more than about
      ``87 * epsilon``, entries far below the max underflow to 0 in float32 (codes stay finite, rows sum to 1);
      use ``dtype=torch.float64`` there.
    * Distributed (``gather=True`` under ``torch.distributed``): the prototype totals are all-reduced with
      :func:`batchmates.distributed.all_reduce_sum` and the max with one tiny all-reduce; the scores are never
      gathered. Each rank gets the codes of its own rows, equal to the matching rows of the codes of the
      global batch computed in one process. ``gather=False`` treats the local batch as the whole batch.

    Args:
        scores: ``[B, K]`` prototype scores ``z C^T`` of the samples of this rank.
        epsilon: entropy regularisation (paper default 0.05); smaller is sharper.
        iterations: number of Sinkhorn iterations (paper default 3), at least 1.
        dtype: minimum working precision (float32 or float64).
        gather: all-reduce the prototype totals across ranks (global batch). Identity in one process.
        validate: check that ``scores`` are finite (one device sync).

    Returns:
        ``[B, K]`` codes, each row summing to 1, columns summing to about ``B_global / K`` over the global batch.
    """
    _check_scores(scores, "scores")
    if not (isinstance(epsilon, int | float) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive number (paper default 0.05), got {epsilon!r}")
    if not (isinstance(iterations, int) and iterations >= 1):
        raise ValueError(f"iterations must be an integer >= 1 (paper default 3), got {iterations!r}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if validate:
        _check_finite(scores, "scores")
    work = _work_dtype(scores, dtype)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        s = scores.detach().to(work)
        m = _global_max(s, gather)
        # exp((s - max) / eps) <= 1: no overflow whatever the input dtype or scale. Out of place first, so the
        # caller's tensor is never modified, then in place.
        e = torch.sub(s, m).div_(epsilon).exp_()
        distributed = gather and bmd.is_distributed()
        tiny = torch.finfo(work).tiny
        v = None
        for _ in range(iterations):
            # Prototype totals over the (global) batch, then make each prototype's total 1.
            totals = e.sum(0) if v is None else v @ e
            if distributed:
                totals = bmd.all_reduce_sum(totals)
            u = totals.clamp_min_(tiny).reciprocal_()
            # Sample totals (local), then make each sample's total 1.
            v = (e @ u).clamp_min_(tiny).reciprocal_()
        return e.mul_(u).mul_(v.unsqueeze(1))


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
    higher with autocast disabled; the result is float32 (float64 for float64 scores).

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
        validate: check shapes and finiteness (one device sync).

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
    if not (isinstance(temperature, int | float) and temperature > 0):
        raise ValueError(f"temperature must be a positive number (paper default 0.1), got {temperature!r}")
    crops = high_l + low_l
    for idx, c in enumerate(crops):
        name = f"high[{idx}]" if idx < len(high_l) else f"low[{idx - len(high_l)}]"
        _check_scores(c, name)
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
            _check_scores(qs, f"queue_scores[{idx}]")
            if qs.shape[1] != k:
                raise ValueError(
                    f"queue_scores[{idx}] has {qs.shape[1]} prototype columns but the crops have {k}; score the "
                    "queue with the same prototypes"
                )
    if validate:
        flags = torch.stack([torch.isfinite(c).all() for c in crops])
        if not bool(flags.all()):
            bad = int((~flags).nonzero()[0, 0])
            name = f"high[{bad}]" if bad < len(high_l) else f"low[{bad - len(high_l)}]"
            raise ValueError(f"{name} contains NaN or inf; check the encoder output and the learning rate")
        if queue_l is not None:
            for idx, qs in enumerate(queue_l):
                _check_finite(qs, f"queue_scores[{idx}]")

    distributed = gather and bmd.is_distributed()
    n_high, n_crops = len(high_l), len(crops)
    work = _work_dtype(crops[0], torch.float32)
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
                q = sinkhorn_knopp(
                    s_i, epsilon, sinkhorn_iterations, dtype=sinkhorn_dtype, gather=gather, validate=False
                )
                codes.append(q[q.shape[0] - b :])
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
        if not (isinstance(temperature, int | float) and temperature > 0):
            raise ValueError(f"temperature must be a positive number (paper default 0.1), got {temperature!r}")
        if not (isinstance(epsilon, int | float) and epsilon > 0):
            raise ValueError(f"epsilon must be a positive number (paper default 0.05), got {epsilon!r}")
        if not (isinstance(sinkhorn_iterations, int) and sinkhorn_iterations >= 1):
            raise ValueError(f"sinkhorn_iterations must be an integer >= 1, got {sinkhorn_iterations!r}")
        if sinkhorn_dtype not in (torch.float32, torch.float64):
            raise TypeError(f"sinkhorn_dtype must be torch.float32 or torch.float64, got {sinkhorn_dtype}")
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
