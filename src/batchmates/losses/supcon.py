"""Supervised Contrastive loss (SupCon) and its label-free special case SimCLR / NT-Xent.

Paper: Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020, arXiv:2004.11362 (the ``L_out`` form,
eq. 2), as released in the official code (HobbitLong/SupContrast). NT-Xent: Chen et al., "A Simple Framework for
Contrastive Learning of Visual Representations", arXiv:2002.05709.

For features ``z`` of shape ``[N, V, D]`` (``V`` views of ``N`` samples), the anchors ``A`` are all ``V·N``
views (``contrast_mode="all"``) or the first view of each sample (``"one"``); the contrast set is all ``V·N``
views. With ``s_ij = z_i·z_j / τ`` and ``P(i)`` the views sharing ``i``'s label (``i`` itself excluded)::

    ℓ_i = -(τ / τ_base) · 1/|P(i)| · Σ_{p∈P(i)} [ s_ip − log Σ_{j≠i} exp(s_ij) ]        (paper, eq. 2)
    L   = mean_i ℓ_i                                                                      (paper / official)

No labels and no mask gives SimCLR (the positive of a view is the other views of the same sample).

Paper / official code:
    the formula above, defaults ``τ = τ_base = 0.07``, self-pairs excluded from positives and denominator,
    ``contrast_mode`` "all"/"one", an explicit (possibly asymmetric or weighted) ``[N, N]`` mask as an
    alternative to labels, and an anchor without positive contributing 0 while still counting in the mean
    (official behaviour since SupContrast PR #142).
Library choices:
    * ``normalize=True`` by default: features are L2-normalised inside (the paper normalises in the model;
      re-normalising unit vectors changes neither the value nor the gradient w.r.t. the model's pre-normalised
      output, so this default is safe and protects users who forget it).
    * ``reduction="mean_positive"`` (mean over anchors that have a positive) and ``"none"`` (per-anchor values
      ``[V, N_local]``, view-major; ``[1, N_local]`` for ``contrast_mode="one"``).
    * The positive term is computed from per-class sums of the contrast features (``Σ_{p∈P(i)} s_ip =
      z_i·(S_{y_i} − z_i)/τ``), so no ``[VN, VN]`` mask or float mask is ever built; the denominator is one
      log-sum-exp per anchor in a custom autograd function that keeps a single ``[VN, VN]`` buffer (dense) or
      streams ``chunk × chunk`` blocks and recomputes them in backward (chunked: peak memory linear in N).
    * Everything runs in float32 or higher, with autocast disabled inside (bf16/fp16 inputs are upcast;
      ``exp(1/0.05)`` would overflow fp16). The loss is returned in that compute dtype.
    * Global batch under ``torch.distributed`` (``gather=True``): each rank's anchors are contrasted with the
      gathered global set, and the reduction is made global with :func:`batchmates.distributed.all_reduce_sum`,
      so every rank returns the same loss and DDP-averaged gradients equal single-process gradients.
    * A single view of a single sample (no contrast sample other than itself) and SimCLR with one view
      (no positive at all) raise ``ValueError`` instead of returning NaN or a silent 0.
    * Value checks (NaN/inf features or mask, negative mask entries) run on the CPU only by default
      (``check_finite=None``): on an accelerator each would cost a host-device sync per call and a
      ``torch.compile`` graph break.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchmates import distributed as bdist
from batchmates._checks import ensure_finite, finite_check_enabled
from batchmates.losses._kernels import ExclusiveLogSumExp as _ExclusiveLogSumExp
from batchmates.losses._kernels import no_autocast as _no_autocast

__all__ = ["supcon_loss", "SupConLoss", "NTXentLoss"]

Reduction = Literal["mean", "mean_positive", "none"]
_REDUCTIONS = ("mean", "mean_positive", "none")
_DEFAULT_BLOCK = 4096


def _check_positive_float(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite positive number, got {value}")
    return float(value)


def _check_modes(contrast_mode: str, reduction: str) -> None:
    if contrast_mode not in ("all", "one"):
        raise ValueError(f"contrast_mode must be 'all' or 'one', got {contrast_mode!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _validate(
    features: Tensor,
    labels: Tensor | None,
    mask: Tensor | None,
    contrast_mode: str,
    reduction: str,
    chunk_size: int | None,
    chunk_threshold: int | None,
    check_finite: bool | None,
) -> None:
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor of shape [N, V, D], got {type(features).__name__}")
    if features.ndim != 3:
        raise ValueError(
            f"features must have shape [N, V, D] (samples, views, dim), got {tuple(features.shape)}; "
            "for a single view use features.unsqueeze(1), for two views torch.stack([z0, z1], dim=1)"
        )
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got dtype {features.dtype}")
    # Under torch.distributed a rank may hold no sample (e.g. curation dropped all of its pairs): the global batch
    # is what must be non-empty, which supcon_loss checks after the gather.
    min_rows = 0 if bdist.is_distributed() else 1
    if features.shape[0] < min_rows or min(features.shape[1:]) < 1:
        raise ValueError(f"features must be non-empty in every dimension, got shape {tuple(features.shape)}")
    check_values = finite_check_enabled(check_finite, features)
    if check_values:
        ensure_finite(
            features,
            True,
            "features contain NaN or inf; check the model output (e.g. the learning rate or AMP scaler); "
            "check_finite=False skips this check",
        )
    _check_modes(contrast_mode, reduction)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")
    if chunk_threshold is not None and (
        isinstance(chunk_threshold, bool) or not isinstance(chunk_threshold, int) or chunk_threshold < 1
    ):
        raise ValueError(f"chunk_threshold must be a positive int or None (never chunk), got {chunk_threshold!r}")
    if labels is not None and mask is not None:
        raise ValueError("pass either labels or mask, not both (a mask [N, N] already encodes the positives)")
    n = features.shape[0]
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor of shape [N], got {type(labels).__name__}")
        if labels.ndim != 1 or labels.shape[0] != n:
            raise ValueError(
                f"labels must have shape [N] = [{n}] to match features [N, V, D], got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"labels must be an integer (class index) tensor, got dtype {labels.dtype}")
        if labels.device != features.device:
            raise ValueError(f"labels are on {labels.device} but features on {features.device}; move them together")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor of shape [N, N], got {type(mask).__name__}")
        if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
            raise ValueError(f"mask must be a square [N, N] matrix, got shape {tuple(mask.shape)}")
        if mask.device != features.device:
            raise ValueError(f"mask is on {mask.device} but features on {features.device}; move them together")
        if check_values and mask.is_floating_point():
            ensure_finite(mask, True, "mask contains NaN or inf; it must hold 0/1 (or non-negative finite weights)")
        if check_values and bool((mask < 0).any()):
            raise ValueError("mask must be non-negative (1 = positive pair, 0 = not)")


def supcon_loss(
    features: Tensor,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    contrast_mode: Literal["all", "one"] = "all",
    normalize: bool = True,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
    chunk_threshold: int | None = 16384,
    gather: bool = True,
    check_finite: bool | None = None,
) -> Tensor:
    """Supervised contrastive loss ``L_out`` (Khosla et al. 2020, arXiv:2004.11362, eq. 2); SimCLR without labels.

    Args:
        features: ``[N, V, D]`` embeddings, ``V`` views per sample (this rank's share of the batch).
        labels: ``[N]`` integer class labels. Positives of an anchor are all other views with the same label.
        mask: ``[N, N]`` explicit positive mask (0/1 or non-negative weights, may be asymmetric; the official
            ``mask`` argument). Under ``torch.distributed`` with ``gather=True`` it must be the GLOBAL mask
            ``[N_global, N_global]`` over the gathered batch in rank order (identical on every rank); this rank's
            rows are taken from it. Mutually exclusive with ``labels``. Neither: SimCLR (same-sample views).
        temperature: ``τ`` (paper default 0.07; the paper's recipe uses 0.1).
        base_temperature: ``τ_base``; the loss is scaled by ``τ/τ_base`` (official code).
        contrast_mode: ``"all"`` (every view is an anchor) or ``"one"`` (only view 0 is).
        normalize: L2-normalise features along ``D`` inside (library default True; harmless for unit input).
        reduction: ``"mean"`` over all anchors, anchors without positives counting 0 (official); ``"mean_positive"``
            over anchors with at least one positive (0 if none has); ``"none"``: per-anchor losses of this rank's
            anchors, shape ``[V, N]`` view-major (row ``v`` = anchors of view ``v``), ``[1, N]`` for ``"one"``.
        chunk_size: force the chunked (memory-linear) path with blocks of this many rows; ``None`` = automatic.
        chunk_threshold: with ``chunk_size=None`` the chunked path (blocks of 4096) is used when the global contrast
            set has more than this many rows (``V·N_global``); ``None`` = always dense.
        gather: under ``torch.distributed``, contrast against the global batch and reduce globally (default).
            ``False`` = explicit opt-out: each rank uses its local batch only.
        check_finite: check the values of ``features`` and ``mask`` (NaN/inf, negative mask entries).
            ``None`` (default): on the CPU only, so no host-device sync (and no ``torch.compile`` graph break)
            on accelerators; ``True``/``False`` force it (library choice, as the layers of :mod:`batchmates.nn`).

    Returns:
        A scalar (``"mean"``/``"mean_positive"``, identical on every rank) or per-anchor values (``"none"``), in
        float32 for half-precision input, else in the input dtype.

    Raises:
        ValueError/TypeError: bad shapes, dtypes, non-finite values, both labels and mask, a contrast set holding
        only the anchor itself (one view of one sample), or SimCLR mode with a single view (no positive exists).
    """
    temperature = _check_positive_float("temperature", temperature)
    base_temperature = _check_positive_float("base_temperature", base_temperature)
    _validate(features, labels, mask, contrast_mode, reduction, chunk_size, chunk_threshold, check_finite)

    n_local, n_views, _ = features.shape
    if labels is None and mask is None and n_views < 2:
        raise ValueError(
            "SimCLR mode (no labels, no mask) needs at least 2 views per sample: with V=1 no anchor has a positive. "
            "Pass features [N, 2, D] or give labels."
        )
    device = features.device
    distributed = gather and bdist.is_distributed()
    compute_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32

    with _no_autocast(device):
        feats = features.to(compute_dtype)
        if normalize:
            feats = F.normalize(feats, dim=-1)

        if distributed:
            feats_all = bdist.gather(feats)
            start = bdist.local_slice(n_local).start
        else:
            feats_all = feats
            start = 0
        n_global = feats_all.shape[0]
        if n_global * n_views < 2:
            raise ValueError(
                "SupCon needs at least 2 views in the (global) batch: got 1 sample with 1 view, so the anchor has "
                "nothing to contrast with. Use >= 2 views or >= 2 samples."
            )

        # Anchors (this rank's views) and the global contrast set, both view-major: contrast row v*N_global + n.
        contrast = feats_all.transpose(0, 1).reshape(n_views * n_global, feats.shape[-1])
        if contrast_mode == "all":
            anchors = contrast if not distributed else feats.transpose(0, 1).reshape(n_views * n_local, feats.shape[-1])
            n_anchor_views = n_views
        else:
            anchors = feats[:, 0]
            n_anchor_views = 1
        self_col = torch.arange(n_local, device=device) + start
        if n_anchor_views > 1:
            self_col = (torch.arange(n_anchor_views, device=device).unsqueeze(1) * n_global + self_col).reshape(-1)

        # Positive term of anchor (v, n): pos_vec = Σ_p w_np z_p over all views of the positives of sample n, minus
        # the anchor itself (weight w_nn); n_pos = Σ_p w_np·V - w_nn. Built from per-class / masked sums of
        # the per-sample view sums, never from a [VN, VN] mask.
        if mask is not None:
            if mask.shape[0] != n_global:
                raise ValueError(
                    f"mask has shape {tuple(mask.shape)} but the {'global ' if distributed else ''}batch has "
                    f"{n_global} samples; under torch.distributed pass the global [N_global, N_global] mask "
                    "(same on every rank, rows in rank order) or pass labels instead"
                )
            m = mask[start : start + n_local].to(compute_dtype)
            w_self = m.diagonal(offset=start).unsqueeze(1)  # [N_local, 1]
            sample_pos = m @ feats_all.sum(dim=1)
            n_pos = m.sum(dim=1) * n_views - w_self.squeeze(1)
        elif labels is not None:
            labels_all = (bdist.gather(labels) if distributed else labels).long()
            # Class ids without a host sync: the position of each label's first occurrence in sorted order.
            class_id = torch.searchsorted(torch.sort(labels_all).values, labels_all)
            fsum = feats_all.sum(dim=1)
            class_sum = torch.zeros_like(fsum).index_add_(0, class_id, fsum)
            class_count = torch.zeros(n_global, dtype=compute_dtype, device=device).index_add_(
                0, class_id, torch.ones(n_global, dtype=compute_dtype, device=device)
            )
            mine = class_id[start : start + n_local]
            sample_pos = class_sum[mine]
            n_pos = class_count[mine] * n_views - 1
            w_self = None
        else:  # SimCLR: the positives of a view are the other views of its own sample
            sample_pos = feats.sum(dim=1)
            n_pos = torch.full((n_local,), float(n_views - 1), dtype=compute_dtype, device=device)
            w_self = None

        anchors_v = anchors.reshape(n_anchor_views, n_local, feats.shape[-1])
        pos_vec = sample_pos - (anchors_v if w_self is None else w_self * anchors_v)
        pos_dot = (anchors_v * pos_vec).sum(dim=-1)  # [Va, N_local] = τ · Σ_p w_ip s_ip

        if chunk_size is not None:
            block = chunk_size
        elif chunk_threshold is not None and contrast.shape[0] > chunk_threshold:
            block = _DEFAULT_BLOCK
        else:
            block = None
        lse = _ExclusiveLogSumExp.apply(anchors, contrast, self_col, 1.0 / temperature, block)
        lse = lse.view(n_anchor_views, n_local)

        # Official: loss_i = -(τ/τ_b) Σ_p w_ip (s_ip - lse_i) / n_pos_i, with n_pos < 1e-6 replaced by 1 (loss 0).
        has_pos = n_pos >= 1e-6
        inv_denom = 1.0 / torch.where(has_pos, n_pos, torch.ones_like(n_pos))
        coef_lse = (temperature / base_temperature) * (n_pos * inv_denom)  # 1 (or 0 without positive) for 0/1 masks
        coef_pos = inv_denom / base_temperature
        per_anchor = lse * coef_lse - pos_dot * coef_pos

        if reduction == "none":
            return per_anchor
        total = per_anchor.sum()
        if reduction == "mean":
            if distributed:
                total = bdist.all_reduce_sum(total)
            return total / (n_anchor_views * n_global)
        # mean_positive
        count = has_pos.sum().to(compute_dtype) * n_anchor_views
        if distributed:
            total = bdist.all_reduce_sum(total)
            count = bdist.all_reduce_sum(count)
        return total / count.clamp_min(1.0)


class _SupConModule(nn.Module):
    """The keyword-only options shared by :class:`SupConLoss` and :class:`NTXentLoss` (see :func:`supcon_loss`)."""

    def __init__(
        self,
        *,
        normalize: bool = True,
        reduction: Reduction = "mean",
        chunk_size: int | None = None,
        chunk_threshold: int | None = 16384,
        gather: bool = True,
        check_finite: bool | None = None,
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.chunk_threshold = chunk_threshold
        self.gather = gather
        self.check_finite = check_finite

    def _options(self) -> dict:
        return dict(
            normalize=self.normalize,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
            chunk_threshold=self.chunk_threshold,
            gather=self.gather,
            check_finite=self.check_finite,
        )


class SupConLoss(_SupConModule):
    """Supervised contrastive loss (Khosla et al. 2020, arXiv:2004.11362); see :func:`supcon_loss`.

    ``SupConLoss(temperature=0.07, base_temperature=0.07, contrast_mode="all")(features, labels=None, mask=None)``
    with ``features [N, V, D]``. Keyword-only options ``normalize``, ``reduction``, ``chunk_size``,
    ``chunk_threshold``, ``gather`` and ``check_finite`` are documented on :func:`supcon_loss`.

    Example::

        loss_fn = SupConLoss(temperature=0.1)
        loss = loss_fn(torch.stack([proj(v1), proj(v2)], dim=1), labels)
    """

    def __init__(
        self,
        temperature: float = 0.07,
        base_temperature: float = 0.07,
        contrast_mode: Literal["all", "one"] = "all",
        *,
        normalize: bool = True,
        reduction: Reduction = "mean",
        chunk_size: int | None = None,
        chunk_threshold: int | None = 16384,
        gather: bool = True,
        check_finite: bool | None = None,
    ) -> None:
        super().__init__(
            normalize=normalize, reduction=reduction, chunk_size=chunk_size, chunk_threshold=chunk_threshold,
            gather=gather, check_finite=check_finite,
        )  # fmt: skip
        self.temperature = _check_positive_float("temperature", temperature)
        self.base_temperature = _check_positive_float("base_temperature", base_temperature)
        _check_modes(contrast_mode, reduction)
        self.contrast_mode = contrast_mode

    def forward(self, features: Tensor, labels: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return supcon_loss(
            features,
            labels,
            mask,
            temperature=self.temperature,
            base_temperature=self.base_temperature,
            contrast_mode=self.contrast_mode,
            **self._options(),
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
            f"contrast_mode={self.contrast_mode!r}, reduction={self.reduction!r}, gather={self.gather}"
        )


class NTXentLoss(_SupConModule):
    """SimCLR's NT-Xent loss (Chen et al. 2020, arXiv:2002.05709) as SupCon without labels, two views.

    ``NTXentLoss(temperature=0.5)(z0, z1)`` with ``z0, z1 [N, D]`` (lightly-style call) equals
    :func:`supcon_loss` on ``stack([z0, z1], 1)`` with ``base_temperature=temperature``: the mean over the ``2N``
    anchors of the cross-entropy of finding the other view among the ``2N - 1`` others. Features are
    L2-normalised inside by default. ``reduction="none"`` returns ``[2, N]`` (row 0: anchors from ``z0``).
    Keyword-only options as :class:`SupConLoss` (``normalize``, ``reduction``, ``chunk_size``, ``chunk_threshold``,
    ``gather``, ``check_finite``), documented on :func:`supcon_loss`.
    """

    def __init__(self, temperature: float = 0.5, **options: Any) -> None:
        super().__init__(**options)
        self.temperature = _check_positive_float("temperature", temperature)
        _check_modes("all", self.reduction)

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        for name, z in (("z0", z0), ("z1", z1)):
            if not isinstance(z, Tensor) or z.ndim != 2:
                shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
                raise ValueError(f"{name} must be a [N, D] tensor of embeddings, got {shape}")
        if z0.shape != z1.shape:
            raise ValueError(f"z0 and z1 must have the same shape [N, D], got {tuple(z0.shape)} and {tuple(z1.shape)}")
        return supcon_loss(
            torch.stack([z0, z1], dim=1),
            temperature=self.temperature,
            base_temperature=self.temperature,
            contrast_mode="all",
            **self._options(),
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, gather={self.gather}"
