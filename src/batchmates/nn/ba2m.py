"""BA²M, the batch aware attention module (Cheng et al. 2021, arXiv:2103.15099).

BA²M scores how "complex" each sample's feature map is, compares the scores across the mini-batch with a
softmax, and rescales every sample's features by its share. It sits where SE/CBAM sit: on the residual branch
of a residual block, before the sum (``create_attn_layer("ba2m", channels)`` in a batchmates backbone).

What is the paper's and what is ours
------------------------------------
Paper (METHODS.md section 1):

* channel branch ``A_C``: global average pool -> FC(C -> C/r) -> BN -> ReLU -> FC(C/r -> C), shape C x 1 x 1;
* local spatial branch ``A_LS``: 1x1 conv (C -> C/r) -> 3x3 conv with dilation d -> 1x1 conv (-> 1) -> BN,
  shape 1 x H x W;
* global spatial branch ``A_GS``: a non-local block (embedded Gaussian, Wang et al. 2018) whose f, g, h are 1x1
  convs to C/r channels, reduced to 1 x H x W;
* sample attention ``A_i = mean(max(A_C, A_LS, A_GS))`` (broadcast to C x H x W, element-wise max, mean over all
  elements): one scalar per sample;
* batch weights ``w = softmax over the batch of A`` and output ``x_i * s(w_i)``; defaults r = 16, d = 4.

Library choices:

* ``weight_mode``: ``"scaled"`` (default) ``s = N * w_i`` so the mean weight is 1 and N = 1 is the identity;
  ``"raw"`` ``s = w_i`` as the equations read; ``"residual"`` ``s = 1 + w_i``.
* The batch softmax runs in float32 whatever the autocast dtype; under ``torch.distributed`` it is over the
  *global* batch (the per-sample scalars are gathered with a gradient-carrying all-gather, each rank keeps its
  slice of the weights, and ``"scaled"`` uses the global N).
* ReLU after the two reducing convolutions of the local spatial branch (as in BAM, Park et al. 2018, on which
  this branch is modelled); without it the branch would be a single linear map.
* The non-local branch maps its C/r-channel output to one channel with a 1x1 conv; its softmax has no
  1/sqrt(d) scale (embedded Gaussian, as in Wang et al.).
* Batch of one in training: the BatchNorm layers normalise with batch statistics as usual, except when a
  channel has a single value (N = 1 in the channel branch, or N = 1 with a 1x1 map in the local branch), where
  they use their running statistics instead of raising (and leave them untouched). See :class:`_SafeBatchNorm1d`.
* ``eval_mode="independent"`` (default): in ``eval()`` ``s = 1``, i.e. the layer is the identity and a
  sample's output never depends on its batch mates. ``eval_mode="batch"`` keeps the batch weighting in eval.
* Hidden width ``max(min_hidden, C // r)`` (``min_hidden=4``) so narrow layers keep a usable bottleneck.

Under DDP the BatchNorm layers inside the branches use per-rank statistics like every other BatchNorm of the
backbone; convert the model with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for global statistics. The
batch weighting itself is always global.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchmates import distributed
from batchmates.models.layers import register_attn_layer
from batchmates.nn._eval_mode import check_eval_mode, finite_check_enabled, uses_batch

__all__ = ["BA2M", "WEIGHT_MODES", "batch_softmax_weights"]

WEIGHT_MODES: tuple[str, ...] = ("scaled", "raw", "residual")


class _SafeBatchNormMixin:
    """BatchNorm that falls back to running statistics when a channel has a single value in training.

    PyTorch's BatchNorm raises ``Expected more than 1 value per channel when training`` on such input. Batch
    statistics of one value are degenerate anyway (the normalised output would be 0), so the library choice is
    to normalise with the running statistics (as in eval) and not update them.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - BatchNorm's own argument name
        if self.training and input.numel() // max(input.shape[1], 1) <= 1:  # type: ignore[attr-defined]
            return F.batch_norm(
                input,
                self.running_mean,  # type: ignore[attr-defined]
                self.running_var,  # type: ignore[attr-defined]
                self.weight,  # type: ignore[attr-defined]
                self.bias,  # type: ignore[attr-defined]
                False,
                0.0,
                self.eps,  # type: ignore[attr-defined]
            )
        return super().forward(input)  # type: ignore[misc]


class _SafeBatchNorm1d(_SafeBatchNormMixin, nn.BatchNorm1d):
    pass


class _SafeBatchNorm2d(_SafeBatchNormMixin, nn.BatchNorm2d):
    pass


def batch_softmax_weights(scores: torch.Tensor, *, gather: bool = True) -> tuple[torch.Tensor, int]:
    """Softmax of per-sample scores over the (global) batch, in float32 or higher.

    Args:
        scores: ``[n]`` this rank's per-sample scores.
        gather: relate the global batch under ``torch.distributed`` (gradient-carrying all-gather); with
            ``False`` only the local batch is used.

    Returns:
        ``(w, n_global)``: this rank's slice ``[n]`` of the global softmax weights (float32, or float64 for
        float64 scores) and the global batch size.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor [n] of per-sample scores, got shape {tuple(scores.shape)}")
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.to(dtype)
    n = s.shape[0]
    if gather and distributed.is_distributed():
        s_all = distributed.gather(s)
        w = torch.softmax(s_all, dim=0)[distributed.local_slice(n)]
        return w, s_all.shape[0]
    return torch.softmax(s, dim=0), n


@register_attn_layer("ba2m")
class BA2M(nn.Module):
    """Batch aware attention module (Cheng et al. 2021, arXiv:2103.15099): ``[N, C, H, W] -> [N, C, H, W]``.

    Each sample gets one scalar score ``A_i`` from three attention branches; the scores are compared across
    the (global) batch with a float32 softmax and each sample is rescaled by its weight. See the module
    docstring for which parts are the paper's and which are library choices.

    Args:
        channels: C, the number of input channels.
        reduction: r, the channel reduction of the three branches (paper: 16).
        dilation: d, the dilation of the local spatial branch's 3x3 conv (paper: 4).
        weight_mode: ``"scaled"`` (``x * N * w``; default), ``"raw"`` (``x * w``) or ``"residual"``
            (``x * (1 + w)``).
        eval_mode: ``"independent"`` (default; identity in ``eval()``) or ``"batch"`` (batch weighting in eval).
        gather: under ``torch.distributed``, weight over the global batch (default) or only the local one.
        min_hidden: lower bound of the hidden width ``max(min_hidden, C // r)``.
        check_finite: raise ``ValueError`` on NaN/Inf input. ``None`` (default): check on CPU only, where it is
            free; on accelerators it would force a host sync per call. ``True``/``False`` force it on/off.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        dilation: int = 4,
        weight_mode: str = "scaled",
        eval_mode: str = "independent",
        *,
        gather: bool = True,
        min_hidden: int = 4,
        check_finite: bool | None = None,
    ) -> None:
        super().__init__()
        for name, val in (("channels", channels), ("reduction", reduction), ("dilation", dilation)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"BA2M: {name} must be a positive int, got {val!r}")
        if weight_mode not in WEIGHT_MODES:
            raise ValueError(f"BA2M: weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
        self.channels = channels
        self.weight_mode = weight_mode
        self.eval_mode = check_eval_mode(eval_mode)
        self.gather = gather
        self.check_finite = check_finite
        hidden = max(min_hidden, channels // reduction)
        self.hidden = hidden

        # Channel branch A_C: GAP -> FC -> BN -> ReLU -> FC.
        self.channel_fc1 = nn.Linear(channels, hidden)
        self.channel_bn = _SafeBatchNorm1d(hidden)
        self.channel_fc2 = nn.Linear(hidden, channels)

        # The four 1x1 convs that read x (A_LS's reduction and the non-local f, g, h) as one conv with 4 C/r
        # outputs, in that order: the same maths, but x is read once.
        self.reduce = nn.Conv2d(channels, 4 * hidden, 1)

        # Local spatial branch A_LS: (1x1, in self.reduce) -> dilated 3x3 -> 1x1 (-> 1 channel) -> BN.
        self.local_dilated = nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation)
        self.local_out = nn.Conv2d(hidden, 1, 1)
        self.local_bn = _SafeBatchNorm2d(1)

        # Global spatial branch A_GS: non-local block (embedded Gaussian; f, g, h in self.reduce), reduced to one
        # channel.
        self.nl_out = nn.Conv2d(hidden, 1, 1)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden={self.hidden}, weight_mode={self.weight_mode!r}, "
            f"eval_mode={self.eval_mode!r}, gather={self.gather}"
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"BA2M: x must be a torch.Tensor [N, C, H, W], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"BA2M: x must be a 4-D feature map [N, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise ValueError(
                f"BA2M: x has {x.shape[1]} channels but the layer was built for channels={self.channels}; "
                f"build BA2M({x.shape[1]}) for this feature map"
            )
        if x.shape[0] == 0:
            raise ValueError("BA2M: x is an empty batch (N = 0)")
        if not x.is_floating_point():
            raise TypeError(f"BA2M: x must be a floating-point tensor, got {x.dtype}")

    def attention_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample attention representation ``A_i = mean(max(A_C, A_LS, A_GS))``: ``[N]`` in float32+."""
        self._check_input(x)
        n, c, h, w = x.shape
        # A_C: [N, C, 1, 1]
        a_c = self.channel_fc2(F.relu(self.channel_bn(self.channel_fc1(x.mean(dim=(2, 3))))))
        a_c = a_c.view(n, c, 1, 1)
        # A_LS: [N, 1, H, W]
        red = self.reduce(x)  # [N, 4h, H, W]: local | theta | phi | g
        loc = red[:, : self.hidden]
        a_ls = self.local_bn(self.local_out(F.relu(self.local_dilated(F.relu(loc)))))
        # A_GS: [N, 1, H, W]; softmax(theta^T phi) over positions, no scaling (embedded Gaussian).
        # Token-major and contiguous ([N, 1, HW, 3h]) so SDPA can use its fused memory-efficient kernel.
        qkv = red[:, self.hidden :].flatten(2).transpose(1, 2).contiguous().unsqueeze(1)
        q, k, v = qkv.split(self.hidden, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # [N, 1, HW, h]
        y = y.squeeze(1).transpose(1, 2).reshape(n, self.hidden, h, w)
        a_gs = self.nl_out(y)
        # max over the three (broadcast to C x H x W), mean over all elements -> one scalar per sample.
        a = torch.maximum(a_c, torch.maximum(a_ls, a_gs))  # spatial max first: one broadcast max, not two
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        return a.to(acc).mean(dim=(1, 2, 3))

    def sample_weights(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's batch-softmax weights ``w`` ``[N]`` (float32+); positive, summing to 1 over the global batch."""
        return self._weights(x)[0]

    def _weights(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        scores = self.attention_scores(x)
        if finite_check_enabled(self.check_finite, scores) and not bool(torch.isfinite(scores).all()):
            raise ValueError(
                "BA2M: the per-sample attention scores are not finite; the input x contains NaN/Inf values "
                "(or the network diverged). (check_finite=False skips this check.)"
            )
        return batch_softmax_weights(scores, gather=self.gather)

    def sample_scales(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample factor ``s_i`` that :meth:`forward` multiplies ``x_i`` by, ``[N]``."""
        if not uses_batch(self, self.eval_mode):
            self._check_input(x)
            return x.new_ones(x.shape[0])
        w, n_global = self._weights(x)
        if self.weight_mode == "scaled":
            return w * n_global
        if self.weight_mode == "raw":
            return w
        return 1.0 + w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not uses_batch(self, self.eval_mode):
            self._check_input(x)
            return x
        s = self.sample_scales(x)
        return x * s.to(x.dtype).view(-1, 1, 1, 1)
