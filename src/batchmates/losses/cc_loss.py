"""CC-Loss, the channel correlation loss (Song et al. 2020, arXiv:2010.05469).

An SE-style module gives each training sample a channel-attention vector ``a_i`` in ``(0, 1)^C``; CC-Loss pulls
the vectors of same-class samples together and pushes different classes apart, and is added to cross-entropy:
``L = CE + lambda * L_cc``. Training-only: at inference every sample is processed on its own.

Library form (METHODS.md Sec. 7): ``d_ij = ||a_i - a_j||^2 / C`` and

* ``"difference"`` (default): ``L_cc = mean_{same class, i != j} d_ij - mean_{different class} d_ij``. For
  gates in ``(0, 1)`` every ``d_ij`` lies in ``[0, 1)``, so ``L_cc`` lies in ``(-1, 1)``: bounded below too
  (gates that saturate to exactly 0 or 1 in floating point reach the closed bounds ``[-1, 1]``);
* ``"ratio"``: ``intra / (inter + eps)`` (scale-free; when the batch has no different-class pair the
  denominator is absent and the loss is ``intra`` alone);
* ``"margin"``: ``intra + relu(margin - inter)`` - a hinge on the inter-class term, which stops pushing
  classes apart once their mean distance reaches ``margin`` (``d`` lies in ``[0, 1]``).

A missing pair type (a batch with one class, or with all classes distinct) contributes 0 - never NaN.

Cost: O(B*C). With per-class sums ``s_c = sum_{i in c} a_i``, ``q_c = sum_{i in c} ||a_i||^2`` and counts
``n_c``, ``sum_{i,j in c} ||a_i - a_j||^2 = 2 n_c q_c - 2 ||s_c||^2`` (the ``i = j`` terms are zero), and the same
identity on the whole batch gives the total; inter = total - intra. No B x B matrix is formed. Under
``torch.distributed`` the ``[num_classes, C + 2]`` per-class statistics are all-reduced (one
:func:`batchmates.distributed.all_reduce_sum`), which is exact and cheap: the loss is the global-batch loss on
every rank.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from batchmates import distributed as bmd
from batchmates._checks import finite_check_enabled

__all__ = ["cc_loss", "CCLoss"]

Form = Literal["difference", "ratio", "margin"]
_FORMS = ("difference", "ratio", "margin")


def _global_max_label(labels: Tensor, gather: bool) -> int:
    m = labels.max() if labels.numel() else labels.new_full((), -1)
    if gather and bmd.is_distributed():
        slots = torch.zeros(bmd.world_size(), dtype=torch.long, device=labels.device)
        slots[bmd.rank()] = m
        m = bmd.all_reduce_sum(slots).max()
    return int(m)


def _check_options(form: str, margin: float, eps: float) -> None:
    if form not in _FORMS:
        raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
    if not (isinstance(margin, int | float) and margin >= 0):
        raise ValueError(f"margin must be a non-negative number, got {margin!r}")
    if not (isinstance(eps, int | float) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def _values_checked(check_finite: bool | None, validate: bool | None, attention: Tensor) -> bool:
    if validate is not None:
        if check_finite is not None and bool(check_finite) != bool(validate):
            raise ValueError(f"check_finite={check_finite} and validate={validate} disagree; pass only check_finite")
        check_finite = validate
    return finite_check_enabled(check_finite, attention)


def _validate(attention: Tensor, labels: Tensor, form: str, margin: float, eps: float, check_values: bool) -> None:
    if not isinstance(attention, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("attention and labels must be torch.Tensors ([N, C] floats and [N] integer class ids)")
    _check_options(form, margin, eps)
    if not attention.is_floating_point():
        raise TypeError(f"attention must be a floating-point tensor, got dtype {attention.dtype}")
    if attention.dim() != 2:
        raise ValueError(
            f"attention must have shape [N, C] (one channel-attention vector per sample), got shape "
            f"{tuple(attention.shape)}; squeeze SE outputs of shape [N, C, 1, 1] with .flatten(1)"
        )
    if attention.shape[1] == 0:
        raise ValueError("attention has no channels (C = 0)")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class ids, got dtype {labels.dtype}; use .long()")
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape [N], got shape {tuple(labels.shape)}")
    if labels.shape[0] != attention.shape[0]:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but attention has {attention.shape[0]} rows; pass one label per "
            "sample"
        )
    if check_values and attention.numel():
        a = attention.detach()
        bad = ~(torch.isfinite(a) & (a >= 0) & (a <= 1))
        lab_bad = (labels < 0).any()
        flags = torch.stack([bad.any(), lab_bad]).tolist()
        if flags[0]:
            raise ValueError(
                "attention values must lie in (0, 1) (e.g. sigmoid outputs of an SE module) and be finite; got "
                f"values in [{a.min().item():.4g}, {a.max().item():.4g}]"
                + (" with NaN/inf" if not bool(torch.isfinite(a).all()) else "")
            )
        if flags[1]:
            raise ValueError(f"labels must be non-negative class ids, got min {int(labels.min())}")


def cc_loss(
    attention: Tensor,
    labels: Tensor,
    form: Form = "difference",
    *,
    margin: float = 0.1,
    eps: float = 1e-6,
    num_classes: int | None = None,
    gather: bool = True,
    check_finite: bool | None = None,
    validate: bool | None = None,
) -> Tensor:
    """The channel-correlation term ``L_cc`` of CC-Loss (arXiv:2010.05469); see the module docstring.

    Paper: same-class attention vectors close, different-class vectors far, measured by squared Euclidean
    distance over the batch. Library: the normalisation ``d_ij = ||a_i - a_j||^2 / C``, the mean-over-pairs
    reduction, the three ``form`` options, the O(B*C) per-class-sum computation and the global-batch semantics.

    Args:
        attention: ``[N, C]`` channel-attention vectors in ``(0, 1)`` (closed ``[0, 1]`` accepted: sigmoids
            saturate in floating point).
        labels: ``[N]`` integer class ids ``>= 0``.
        form: ``"difference"`` (default), ``"ratio"`` or ``"margin"``.
        margin: hinge margin of ``form="margin"`` (on the mean inter-class ``d``, which lies in ``[0, 1]``).
        eps: added to the denominator of ``form="ratio"``.
        num_classes: number of classes; default ``1 + max label`` over the global batch (one host sync: give it
            to avoid that, e.g. under ``torch.compile``).
        gather: global-batch semantics under ``torch.distributed`` (per-class sums all-reduced).
        check_finite: check values (attention finite and in ``[0, 1]``, labels in ``[0, num_classes)``; one host
            sync). ``None`` (default): on the CPU only, so no host-device sync (and no ``torch.compile`` graph
            break) on accelerators; ``True``/``False`` force it (library choice, as the layers of
            :mod:`batchmates.nn`).
        validate: the former name of ``check_finite`` (kept for compatibility).

    Returns:
        Scalar in float32, or float64 for float64 input (computed with autocast disabled).
    """
    check_values = _values_checked(check_finite, validate, attention)
    _validate(attention, labels, form, margin, eps, check_values)
    distributed = gather and bmd.is_distributed()
    if num_classes is None:
        k = max(_global_max_label(labels, gather) + 1, 1)  # the class count comes from the data: one sync
    else:
        if not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if check_values and (max_label := _global_max_label(labels, gather)) >= num_classes:
            raise ValueError(f"labels contain class id {max_label} but num_classes={num_classes}")
        k = num_classes
    n_local, c = attention.shape
    work = torch.promote_types(attention.dtype, torch.float32)
    with torch.autocast(device_type=attention.device.type, enabled=False):
        # Distances are translation invariant; centring (0, 1) values at 0.5 shrinks the terms that cancel in
        # 2 n q - 2 ||s||^2 and so its rounding error.
        x = attention.to(work) - 0.5
        stats = torch.cat([x, (x * x).sum(1, keepdim=True), torch.ones_like(x[:, :1])], dim=1)  # [N, C + 2]
        per_class = torch.zeros(k, c + 2, dtype=work, device=x.device).index_add(0, labels.to(x.device), stats)
        if distributed:
            per_class = bmd.all_reduce_sum(per_class)
        s, q, n = per_class[:, :c], per_class[:, c], per_class[:, c + 1].detach()
        s_tot, q_tot, n_tot = s.sum(0), q.sum(), n.sum()
        intra_sum = 2 * (n * q).sum() - 2 * (s * s).sum()
        total_sum = 2 * n_tot * q_tot - 2 * (s_tot * s_tot).sum()
        inter_sum = total_sum - intra_sum
        intra_pairs = (n * n).sum() - n_tot  # ordered pairs i != j of one class
        inter_pairs = n_tot * n_tot - (n * n).sum()
        zero = x.new_zeros(())
        intra = torch.where(intra_pairs > 0, intra_sum / (c * intra_pairs.clamp_min(1)), zero).clamp_min(0)
        inter = torch.where(inter_pairs > 0, inter_sum / (c * inter_pairs.clamp_min(1)), zero).clamp_min(0)
        if form == "difference":
            return intra - inter
        if form == "ratio":
            return torch.where(inter_pairs > 0, intra / (inter + eps), intra)
        return intra + torch.where(inter_pairs > 0, torch.relu(margin - inter), zero)


class CCLoss(nn.Module):
    """CC-Loss term ``L_cc`` (Song et al. 2020, arXiv:2010.05469); module form of :func:`cc_loss`.

    ``CCLoss(form="difference", *, margin=0.1, eps=1e-6, num_classes=None, gather=True, check_finite=None)``
    called on ``(attention, labels)`` with ``attention [N, C]`` in ``(0, 1)`` and ``labels [N]``; returns the
    scalar ``L_cc`` to be added to the cross-entropy with a weight ``lambda`` (library form; see the module
    docstring).
    """

    def __init__(
        self,
        form: Form = "difference",
        *,
        margin: float = 0.1,
        eps: float = 1e-6,
        num_classes: int | None = None,
        gather: bool = True,
        check_finite: bool | None = None,
        validate: bool | None = None,
    ) -> None:
        super().__init__()
        _check_options(form, margin, eps)
        self.form = form
        self.margin = float(margin)
        self.eps = float(eps)
        self.num_classes = num_classes
        self.gather = gather
        self.check_finite = check_finite
        self.validate = validate

    def forward(self, attention: Tensor, labels: Tensor) -> Tensor:
        return cc_loss(
            attention,
            labels,
            self.form,
            margin=self.margin,
            eps=self.eps,
            num_classes=self.num_classes,
            gather=self.gather,
            check_finite=self.check_finite,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        return f"form={self.form!r}, margin={self.margin}, gather={self.gather}"
