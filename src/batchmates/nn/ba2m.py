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
* ``eval_mode="independent"`` (default): in ``eval()`` a sample's output never depends on its batch mates. How
  the layer replaces the batch is ``eval_form``:

  - ``"running"`` (default): keep the training batches' partition function as BatchNorm keeps its statistics,
    and weight each test sample by its own score against it: ``N·w_i = exp(A_i) / mean_j exp(A_j)`` becomes
    ``exp(A_i - log Z)``, capped at ``N_train`` (as in training), with ``log Z`` a running mean (``score_momentum``
    as BatchNorm's ``momentum``; ``None``: cumulative) of each global training batch's ``log mean_j exp(A_j)``,
    in the buffer ``running_log_z``. ``"raw"`` divides by ``N_train``, ``"residual"`` adds 1. With no tracked
    batch (``z_tracked == 0``: never trained, or a checkpoint older than the buffer) it falls back to
    ``"expected"``, so old checkpoints evaluate as they did; :func:`update_running_scores` fills the buffer from
    training batches, as ``torch.optim.swa_utils.update_bn`` does for BatchNorm.
  - ``"expected"`` (METHODS.md's first choice, the default until the study below): multiply every sample by the
    **expected training factor** of its weight mode: 1 for ``"scaled"``, ``1/N_train`` for ``"raw"``,
    ``1 + 1/N_train`` for ``"residual"``. For ``"scaled"`` that is the identity: the attention is off at test.

  Why ``"running"`` is the default (measured, ``scripts/ba2m_eval_forms.py``, docs/results.md "BA²M's eval
  forms"): on the five Fashion-MNIST study runs it is within 0.06 pp of batch eval on every seed, while
  ``"expected"`` lost 2 pp on one seed of five. Neither form equals a batch of one (METHODS.md's general rule):
  both replace the batch by what training saw, as BatchNorm does.

  ``N_train`` is the global batch size of the last training forward, kept in the buffer ``n_train`` so a
  checkpoint carries it (our trainer drops the last incomplete batch, so it is the configured batch size). A
  layer that never ran in training (``n_train == 0``) uses its batch-size-1 factor. ``eval_mode="batch"`` keeps
  the batch weighting in eval.
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

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from batchmates import distributed
from batchmates.nn._eval_mode import check_eval_mode, finite_check_enabled, uses_batch
from batchmates.nn._sdpa import attention

__all__ = ["BA2M", "WEIGHT_MODES", "SCORE_MODES", "EVAL_FORMS", "batch_softmax_weights", "expected_training_factor",
           "update_running_scores"]

WEIGHT_MODES: tuple[str, ...] = ("scaled", "raw", "residual")
SCORE_MODES: tuple[str, ...] = ("bounded", "literal")
EVAL_FORMS: tuple[str, ...] = ("expected", "running")


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
    w, n_global, _ = _batch_softmax(scores, gather=gather)
    return w, n_global


def _batch_softmax(scores: torch.Tensor, *, gather: bool) -> tuple[torch.Tensor, int, torch.Tensor]:
    # batch_softmax_weights plus the (detached) log-sum-exp of the global scores, for the running partition.
    if scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor [n] of per-sample scores, got shape {tuple(scores.shape)}")
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.to(dtype)
    n = s.shape[0]
    if gather and distributed.is_distributed():
        s_all = distributed.gather(s)
        w = torch.softmax(s_all, dim=0)[distributed.local_slice(n)]
        return w, s_all.shape[0], torch.logsumexp(s_all.detach(), dim=0)
    return torch.softmax(s, dim=0), n, torch.logsumexp(s.detach(), dim=0)


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
        eval_mode: ``"independent"`` (default; in ``eval()`` no sample depends on another, see ``eval_form``) or
            ``"batch"`` (batch weighting in eval).
        score: ``"bounded"`` (default; ``mean(sigmoid(max(...)))``, stable) or ``"literal"`` (the unbounded
            ``mean(max(...))`` of the equations; its batch softmax is nearly one-hot at initialisation).
        eval_form: how independent eval replaces the batch: ``"running"`` (default; each sample's own score
            against the running partition function of the training batches) or ``"expected"`` (the expected
            training factor of ``weight_mode``, the same for every sample); see the module docstring.
        score_momentum: momentum of the running partition function, as BatchNorm's ``momentum`` (``None``: a
            cumulative mean over every tracked batch). The first tracked batch sets it.
        gather: under ``torch.distributed``, weight over the global batch (default) or only the local one.
        min_hidden: lower bound of the hidden width ``max(min_hidden, C // r)``.
        check_finite: raise ``ValueError`` on NaN/Inf input. ``None`` (default): check on CPU only, where it is
            free; on accelerators it would force a host sync per call. ``True``/``False`` force it on/off.
        device, dtype: where to create the parameters (timm passes these to attention layers).
    """

    n_train: torch.Tensor
    running_log_z: torch.Tensor
    z_tracked: torch.Tensor

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        dilation: int = 4,
        weight_mode: str = "scaled",
        eval_mode: str = "independent",
        *,
        score: str = "bounded",
        eval_form: str = "running",
        score_momentum: float | None = 0.1,
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
        if eval_form not in EVAL_FORMS:
            raise ValueError(
                f"BA2M: eval_form must be 'running' (each sample's score against the training batches' running "
                f"partition function; default) or 'expected' (the expected training factor), got {eval_form!r}"
            )
        if score_momentum is not None and not (isinstance(score_momentum, (int, float))
                                               and not isinstance(score_momentum, bool) and 0 < score_momentum <= 1):
            raise ValueError(f"BA2M: score_momentum must be a float in (0, 1] or None (cumulative mean), "
                             f"got {score_momentum!r}")
        self.channels = channels
        self.eval_form = eval_form
        self.score_momentum = None if score_momentum is None else float(score_momentum)
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
        # Running mean of log(mean_j exp(A_j)) over training batches, and how many batches it holds; see eval_form.
        self.register_buffer("running_log_z", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("z_tracked", torch.zeros((), dtype=torch.long, device=device))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A checkpoint written before the running partition existed loads with nothing tracked (eval_form
        # "running" then falls back to "expected", so it evaluates as it did).
        for name in ("running_log_z", "z_tracked"):
            state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, hidden={self.hidden}, weight_mode={self.weight_mode!r}, "
            f"score={self.score!r}, eval_mode={self.eval_mode!r}, eval_form={self.eval_form!r}, gather={self.gather}"
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
        # Token-major and contiguous ([N, 1, HW, 3h]) so the fused kernel (long maps; nn._sdpa) runs without copies.
        qkv = red[:, self.hidden :].flatten(2).transpose(1, 2).contiguous().unsqueeze(1)
        q, k, v = qkv.split(self.hidden, dim=-1)
        y = attention(q, k, v, scale=1.0)  # [N, 1, HW, h]
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
        return _batch_softmax(self._finite_scores(x), gather=self.gather)[0]

    def _finite_scores(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.attention_scores(x)
        if finite_check_enabled(self.check_finite, scores) and not bool(torch.isfinite(scores).all()):
            raise ValueError(
                "BA2M: the per-sample attention scores are not finite (the network diverged inside the layer; "
                "a lower learning rate usually helps). (check_finite=False skips this check.)"
            )
        return scores

    @torch.no_grad()
    def _track_partition(self, log_z: torch.Tensor) -> None:
        # running_log_z <- lerp(running_log_z, log_z, m) as tensor maths (no host sync); the first batch sets it.
        seen = self.z_tracked.to(torch.float32)
        if self.score_momentum is None:
            m = 1.0 / (seen + 1.0)
        else:
            m = torch.where(seen > 0, torch.full_like(seen, self.score_momentum), torch.ones_like(seen))
        self.running_log_z.lerp_(log_z.to(self.running_log_z.dtype), m)
        self.z_tracked.add_(1)

    def expected_factor(self) -> float:
        """The factor independent eval multiplies by: the mean training factor of ``weight_mode`` at ``n_train``."""
        return expected_training_factor(self.weight_mode, int(self.n_train))

    def _expected_factor_tensor(self) -> torch.Tensor:
        # expected_factor() as tensor maths on n_train's device: no host sync in eval (n_train = 0 gives 1/1).
        inv_n = 1.0 / self.n_train.clamp(min=1).to(torch.float64)
        return {"scaled": torch.ones_like(inv_n), "raw": inv_n, "residual": 1.0 + inv_n}[self.weight_mode]

    def _independent_scales(self, x: torch.Tensor) -> torch.Tensor:
        # Independent eval's factor [N] (float32+) under eval_form; no sample depends on another.
        expected = self._expected_factor_tensor()
        if self.eval_form == "expected":
            self._check_input(x)
            return expected.expand(x.shape[0])
        scores = self._finite_scores(x)
        n_train = self.n_train.clamp(min=1).to(scores.dtype)
        # N·w_i against the training batches, capped at N_train: no training batch could give a sample more
        rel = torch.minimum(torch.exp(scores - self.running_log_z.to(scores.dtype)), n_train)
        inv_n = 1.0 / n_train
        running = {"scaled": rel, "raw": rel * inv_n, "residual": 1.0 + rel * inv_n}[self.weight_mode]
        return torch.where(self.z_tracked > 0, running, expected.to(running.dtype))

    def sample_scales(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample factor ``s_i`` that :meth:`forward` multiplies ``x_i`` by, ``[N]``."""
        if not uses_batch(self, self.eval_mode):
            return self._independent_scales(x).to(x.dtype)
        w, n_global, lse = _batch_softmax(self._finite_scores(x), gather=self.gather)
        if self.training:
            self.n_train.fill_(n_global)
            self._track_partition(lse - math.log(n_global))
        if self.weight_mode == "scaled":
            return w * n_global
        if self.weight_mode == "raw":
            return w
        return 1.0 + w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not uses_batch(self, self.eval_mode) and self.eval_form == "expected":
            self._check_input(x)
            return x if self.weight_mode == "scaled" else x * self._expected_factor_tensor().to(x.dtype)
        s = self.sample_scales(x)
        return x * s.to(x.dtype).view(-1, 1, 1, 1)


@torch.no_grad()
def update_running_scores(model: nn.Module, batches: Iterable[Any], *, max_batches: int | None = None) -> int:
    """Recompute the running partition function of every :class:`BA2M` in ``model`` from training batches.

    For a model trained before ``running_log_z`` existed (or to re-estimate it with the final weights), as
    ``torch.optim.swa_utils.update_bn`` does for BatchNorm: each BA²M layer's partition is reset and set to the
    cumulative mean over ``batches``, computed in training mode as training computed it. Every other buffer
    (BatchNorm statistics, ``n_train``) and every module's train/eval flag are restored afterwards, so nothing else
    changes. ``batches`` yields input tensors or tuples/lists whose first element is the input; ``max_batches``
    stops early. Returns the number of batches used. Under ``torch.distributed`` call it on every rank.
    """
    layers = [m for m in model.modules() if isinstance(m, BA2M)]
    if not layers:
        raise ValueError("update_running_scores: model has no BA2M layer")
    keep = {name: buf.clone() for name, buf in model.named_buffers()}
    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.score_momentum for m in layers}
    device = next(iter(keep.values())).device
    used = 0
    try:
        for m in layers:
            m.z_tracked.zero_()
            m.score_momentum = None  # cumulative mean
        model.train()
        for batch in batches:
            if max_batches is not None and used >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
            used += 1
    finally:  # restore everything but the new partitions (all of it when nothing ran)
        tracked = {m: (m.running_log_z.clone(), m.z_tracked.clone()) for m in layers} if used else {}
        for name, buf in model.named_buffers():
            buf.copy_(keep[name])
        for m in layers:
            if m in tracked:
                m.running_log_z.copy_(tracked[m][0])
                m.z_tracked.copy_(tracked[m][1])
            m.score_momentum = momenta[m]
        for mod, flag in flags.items():
            mod.training = flag
    if used == 0:
        raise ValueError("update_running_scores: batches yielded nothing; pass an iterable of training batches")
    return used
