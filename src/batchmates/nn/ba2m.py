"""BA²M, the batch aware attention module (Cheng et al. 2021, arXiv:2103.15099).

BA²M scores how "complex" each sample's feature map is, compares the scores across the mini-batch with a
softmax, and rescales every sample's features by its share.

What is the paper's and what is ours
------------------------------------
Paper (from a transcription of its equations; METHODS.md section 1), for ``x ∈ R^{N×C×H×W}``:

* channel branch ``A_C = BN(FC_1(FC_0(GAP(x))))``, shape C x 1 x 1, BatchNorm the **last** operation;
* local spatial branch ``A_LS = BN(g_2^{1×1}(g_1^{3×3, dilation d}(g_0^{1×1}(x))))``, shape 1 x H x W;
* global spatial branch ``A_GS = softmax(f(x) g(x)ᵀ) h(x)``, a non-local block;
* sample attention ``A_i = mean(max(A_C, A_LS, A_GS))`` (broadcast, element-wise max, mean): one scalar per sample;
* batch weights ``w_i = exp(A_i) / Σ_j exp(A_j)`` (no temperature, no factor N), multiplying sample i's features.

The paper does not state where BA²M sits in a block, r and d, any sigmoid on the maps, or what happens at test
time; everything below is ours.

Library choices:

* ``score="bounded"`` (default): ``A_i = mean(sigmoid(max(A_C, A_LS, A_GS)))``, the fused map bounded before the
  mean as BAM/CBAM bound theirs, so ``A_i ∈ (0, 1)`` and two samples' weights differ by at most a factor e.
  ``score="literal"`` is the unbounded ``mean(max(...))`` of the equations: at initialisation the non-local
  branch's per-sample means already spread by 1–5 across a batch (small maps average few positions), so the
  batch softmax is nearly one-hot, one sample per layer is multiplied by about N from the first step and the
  first gradient norm is more than 10x that of the same network without attention (asserted on our CNN and
  ResNet backbones in tests/test_ba2m.py). Use it to study the equations, not to train.
* ``weight_mode``: ``"scaled"`` (default) ``s_i = N·w_i``, so the mean factor is 1 and N = 1 is the identity;
  ``"raw"`` ``s_i = w_i`` as the equations read (mean factor 1/N: the next layer's input shrinks N-fold);
  ``"residual"`` ``s_i = 1 + w_i``.
* ``eval_mode="independent"`` (default): in ``eval()`` a sample's output never depends on its batch mates; the
  layer multiplies by the **expected training factor** of its weight mode, so eval sees what training saw on
  average: 1 for ``"scaled"``, ``1/N_train`` for ``"raw"``, ``1 + 1/N_train`` for ``"residual"``. ``N_train`` is the
  global batch size of the last training forward, kept in the buffer ``n_train`` so a checkpoint carries it (our
  trainer drops the last incomplete batch, so it is the configured batch size). A layer that never ran in
  training (``n_train == 0``) uses its batch-size-1 factor. ``eval_mode="batch"`` keeps the batch weighting in eval.
* Channel branch: FC_0 (C -> C/r), ReLU, FC_1 (C/r -> C), BN(C). The ReLU between the two FCs is ours (as in
  BAM's MLP, Park et al. 2018); without it the two FCs would be one linear map.
* Local spatial branch: ReLU after g_0 and g_1 (as in BAM, on which this branch is modelled), BN(1) last.
* Non-local branch (embedded Gaussian, Wang et al. 2018): f, g, h are 1x1 convs to C/r channels, the softmax
  has no 1/sqrt(d) scale, and a 1x1 conv reduces its C/r-channel output to one channel (1 x H x W).
* Hidden width ``max(min_hidden, C // r)`` (``min_hidden=4``) so narrow layers keep a usable bottleneck;
  defaults r = 16, d = 4.
* The batch softmax runs in float32 whatever the autocast dtype (float64 for float64 input); under
  ``torch.distributed`` it is over the *global* batch (the per-sample scalars are gathered with a
  gradient-carrying all-gather, each rank keeps its slice of the weights, and ``"scaled"`` uses the global N).
* Batch of one in training: the BatchNorm layers normalise with batch statistics as usual, except when a
  channel has a single value (N = 1 in the channel branch, or N = 1 with a 1x1 map in the local branch), where
  they use their running statistics instead of raising (and leave them untouched). See :class:`_SafeBatchNorm1d`.
* Input is validated (shape, dtype and, where ``check_finite`` is on, finiteness) *before* any BatchNorm runs,
  so a rejected input leaves the running statistics untouched.
* Placement (where the backbone puts the layer) is the backbone's choice: batchmates backbones put it on the
  residual branch of each residual block, before the sum (where SE/CBAM sit), or once per stage.

Under DDP the BatchNorm layers inside the branches use per-rank statistics like every other BatchNorm of the
backbone; convert the model with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for global statistics. The
batch weighting itself is always global.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchmates import distributed
from batchmates.nn._eval_mode import check_eval_mode, finite_check_enabled, uses_batch

__all__ = ["BA2M", "WEIGHT_MODES", "SCORE_MODES", "batch_softmax_weights", "expected_training_factor"]

WEIGHT_MODES: tuple[str, ...] = ("scaled", "raw", "residual")
SCORE_MODES: tuple[str, ...] = ("bounded", "literal")


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


def expected_training_factor(weight_mode: str, n_train: int) -> float:
    """The mean factor ``E[s_i]`` a sample was multiplied by in training, for a global training batch of ``n_train``.

    ``"scaled"``: 1; ``"raw"``: ``1/n_train``; ``"residual"``: ``1 + 1/n_train``. ``n_train < 1`` (never trained)
    gives the batch-size-1 factor (1, 1, 2).
    """
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
    inv_n = 1.0 / n_train if n_train >= 1 else 1.0
    return {"scaled": 1.0, "raw": inv_n, "residual": 1.0 + inv_n}[weight_mode]


class BA2M(nn.Module):
    """Batch aware attention module (Cheng et al. 2021, arXiv:2103.15099): ``[N, C, H, W] -> [N, C, H, W]``.

    Each sample gets one scalar score ``A_i`` from three attention branches; the scores are compared across
    the (global) batch with a float32 softmax and each sample is rescaled by its weight. See the module
    docstring for which parts are the paper's and which are library choices.

    Args:
        channels: C, the number of input channels.
        reduction: r, the channel reduction of the three branches (ours: 16; the paper does not state it).
        dilation: d, the dilation of the local spatial branch's 3x3 conv (ours: 4).
        weight_mode: ``"scaled"`` (``x * N * w``; default), ``"raw"`` (``x * w``, the equations) or
            ``"residual"`` (``x * (1 + w)``).
        eval_mode: ``"independent"`` (default; in ``eval()`` multiply by the expected training factor of
            ``weight_mode``) or ``"batch"`` (batch weighting in eval).
        score: ``"bounded"`` (default; ``mean(sigmoid(max(...)))``, stable) or ``"literal"`` (the unbounded
            ``mean(max(...))`` of the equations; its batch softmax is nearly one-hot at initialisation).
        gather: under ``torch.distributed``, weight over the global batch (default) or only the local one.
        min_hidden: lower bound of the hidden width ``max(min_hidden, C // r)``.
        check_finite: raise ``ValueError`` on NaN/Inf input. ``None`` (default): check on CPU only, where it is
            free; on accelerators it would force a host sync per call. ``True``/``False`` force it on/off.
        device, dtype: where to create the parameters (timm passes these to attention layers).
    """

    n_train: torch.Tensor

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        dilation: int = 4,
        weight_mode: str = "scaled",
        eval_mode: str = "independent",
        *,
        score: str = "bounded",
        gather: bool = True,
        min_hidden: int = 4,
        check_finite: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, val in (("channels", channels), ("reduction", reduction), ("dilation", dilation)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"BA2M: {name} must be a positive int, got {val!r}")
        if weight_mode not in WEIGHT_MODES:
            raise ValueError(f"BA2M: weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
        if score not in SCORE_MODES:
            raise ValueError(
                f"BA2M: score must be 'bounded' (mean of sigmoid(max), stable; default) or 'literal' (the paper's "
                f"unbounded mean(max)), got {score!r}"
            )
        self.channels = channels
        self.weight_mode = weight_mode
        self.eval_mode = check_eval_mode(eval_mode)
        self.score = score
        self.gather = gather
        self.check_finite = check_finite
        hidden = max(min_hidden, channels // reduction)
        self.hidden = hidden
        kw = {"device": device, "dtype": dtype}

        # Channel branch A_C: GAP -> FC_0 -> ReLU -> FC_1 -> BN (BN last, as the paper's equation).
        self.channel_fc1 = nn.Linear(channels, hidden, **kw)
        self.channel_fc2 = nn.Linear(hidden, channels, **kw)
        self.channel_bn = _SafeBatchNorm1d(channels, **kw)

        # The four 1x1 convs that read x (A_LS's g_0 and the non-local f, g, h) as one conv with 4 C/r
        # outputs, in that order: the same maths, but x is read once.
        self.reduce = nn.Conv2d(channels, 4 * hidden, 1, **kw)

        # Local spatial branch A_LS: (g_0 in self.reduce) -> dilated 3x3 g_1 -> 1x1 g_2 (-> 1 channel) -> BN.
        self.local_dilated = nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation, **kw)
        self.local_out = nn.Conv2d(hidden, 1, 1, **kw)
        self.local_bn = _SafeBatchNorm2d(1, **kw)

        # Global spatial branch A_GS: non-local block (f, g, h in self.reduce), reduced to one channel.
        self.nl_out = nn.Conv2d(hidden, 1, 1, **kw)

        # Global training batch size of the last training forward (0: never trained); see expected_factor().
        self.register_buffer("n_train", torch.zeros((), dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden={self.hidden}, weight_mode={self.weight_mode!r}, "
            f"score={self.score!r}, eval_mode={self.eval_mode!r}, gather={self.gather}"
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
        if finite_check_enabled(self.check_finite, x) and not bool(torch.isfinite(x).all()):
            raise ValueError(
                "BA2M: x is not finite (NaN/Inf values: the input or an earlier layer diverged; a lower learning rate "
                "usually helps). Nothing was updated. (check_finite=False skips this check.)"
            )

    def attention_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample attention representation ``A_i``: ``[N]`` in float32+ (see ``score``)."""
        self._check_input(x)
        n, c, h, w = x.shape
        # A_C: [N, C, 1, 1]
        a_c = self.channel_bn(self.channel_fc2(F.relu(self.channel_fc1(x.mean(dim=(2, 3))))))
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
        a = a.to(acc)
        if self.score == "bounded":
            a = torch.sigmoid(a)
        return a.mean(dim=(1, 2, 3))

    def sample_weights(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's batch-softmax weights ``w`` ``[N]`` (float32+); positive, summing to 1 over the global batch."""
        return self._weights(x)[0]

    def _weights(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        scores = self.attention_scores(x)
        if finite_check_enabled(self.check_finite, scores) and not bool(torch.isfinite(scores).all()):
            raise ValueError(
                "BA2M: the per-sample attention scores are not finite (the network diverged inside the layer; "
                "a lower learning rate usually helps). (check_finite=False skips this check.)"
            )
        return batch_softmax_weights(scores, gather=self.gather)

    def expected_factor(self) -> float:
        """The factor independent eval multiplies by: the mean training factor of ``weight_mode`` at ``n_train``."""
        return expected_training_factor(self.weight_mode, int(self.n_train))

    def _expected_factor_tensor(self) -> torch.Tensor:
        # expected_factor() as tensor maths on n_train's device: no host sync in eval (n_train = 0 gives 1/1).
        inv_n = 1.0 / self.n_train.clamp(min=1).to(torch.float64)
        return {"scaled": torch.ones_like(inv_n), "raw": inv_n, "residual": 1.0 + inv_n}[self.weight_mode]

    def sample_scales(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample factor ``s_i`` that :meth:`forward` multiplies ``x_i`` by, ``[N]``."""
        if not uses_batch(self, self.eval_mode):
            self._check_input(x)
            return self._expected_factor_tensor().to(x.dtype).expand(x.shape[0])
        w, n_global = self._weights(x)
        if self.training:
            self.n_train.fill_(n_global)
        if self.weight_mode == "scaled":
            return w * n_global
        if self.weight_mode == "raw":
            return w
        return 1.0 + w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not uses_batch(self, self.eval_mode):
            self._check_input(x)
            return x if self.weight_mode == "scaled" else x * self._expected_factor_tensor().to(x.dtype)
        s = self.sample_scales(x)
        return x * s.to(x.dtype).view(-1, 1, 1, 1)
