"""Intra-batch attention, MIBA and EIBA (IBAFormer, Sun et al. 2023, arXiv:2309.06282).

Transformer attention whose queries also attend to the *other* images of the mini-batch.

What is the paper's and what is ours
------------------------------------
Paper (only its abstract could be read): intra-batch attention lets a sample attend to the other images of
the batch to diversify the context seen in training, for domain generalisation (SegFormer MiT-B5,
GTAV -> Cityscapes/BDD/Mapillary); it comes in two forms named *mean-based* (MIBA) and *element-wise* (EIBA),
and it is integrated with self-attention.

Library choices (our reconstruction from those names; the paper's equations were not available):

* Per head, with ``Q_b, K_b, V_b ∈ R^{N×d}`` of sample b: self-attention ``SA_b = softmax(Q_b K_bᵀ/√d) V_b``;
  MIBA ``softmax(Q_b K̄ᵀ/√d) V̄`` with ``K̄, V̄`` the batch means over all samples including b (per token
  position); EIBA ``(1/B) Σ_j softmax(Q_b K_jᵀ/√d) V_j`` over all j including b.
* q/k/v come from one shared projection (the one SA uses) and, when the batch is used, the block output is
  ``proj(½ (SA + IBA))``; so a batch of one and a batch of identical samples reduce exactly to plain multi-head
  self-attention.
* **Independent eval sees what training saw.** Training keeps, like BatchNorm's running statistics, buffers
  that a checkpoint carries: running means ``K̄_run, V̄_run`` of the batch means (momentum ``momentum``, a
  cumulative average over the first ``1/momentum`` steps), the training batch size ``B_t``, and (EIBA) a bank
  of the keys/values of the last ``bank_size`` training samples. ``eval_mode="independent"`` then computes
  ``proj(½ (SA + IBA_eval))`` per sample, from those buffers only, where ``IBA_eval`` is the expected training
  term given the sample itself (its own weight in a batch of ``B_t`` is ``1/B_t``):

  - ``eval_form="running"``: MIBA against ``K̃_b = K_b/B_t + (1 - 1/B_t) K̄_run`` (and ``Ṽ_b`` likewise);
  - ``eval_form="bank"`` (EIBA only): ``SA_b/B_t + (1 - 1/B_t) · (1/M) Σ_m softmax(Q_b K_mᵀ/√d) V_m`` over the
    M banked training samples: EIBA's average of attentions is not a function of any mean statistic, so its
    exact counterpart is the same average over a fixed set of real training samples;
  - ``eval_form="sa"``: self-attention alone (the previous behaviour: the sample-specific signal is about
    twice what training saw).

  ``"running"`` is the default for both modes. On the domain-shift protocol (digits, ViT with IBA in every
  block, 3 seeds; train clean, test on 5 corruptions × 5 severities) it beat ``"sa"`` by about 3 points
  (MIBA +2.8 ± 1.1, EIBA +3.3 ± 1.7 corrupted top-1); for EIBA ``"bank"`` tied with it (+0.5 clean, -0.3
  corrupted, within the seed spread) at O(M) times the eval cost, so it is an option. On the Fashion-MNIST
  study's claim-6 checkpoints (ViT, IBA in the last two blocks, 5 seeds, severity 3) ``"sa"`` lost 0.5 pp
  clean in both modes and ``"bank"`` was level with ``"running"`` (docs/results.md). A layer without
  statistics (never trained, or loaded from a checkpoint written before they existed, or from a
  self-attention layer's weights) evaluates as self-attention alone, which is how such checkpoints were
  evaluated; ``has_statistics`` tells which.
* Global batch under ``torch.distributed``: MIBA's means are all-reduced sums over the global count; EIBA
  gathers K and V with a gradient-carrying all-gather, so every query attends to every sample of the global
  batch. The running means are of those global means and the bank holds gathered samples, so every rank's
  buffers are identical.
* Kernels (:mod:`batchmates.nn._iba_ops`): SA and MIBA use
  :func:`torch.nn.functional.scaled_dot_product_attention`; EIBA runs in blocks of (query sample, key sample)
  pairs with a per-key-sample softmax, memory O(chunk · heads · N²), optionally recomputed in backward
  (``checkpoint_chunks``). Batch means and the EIBA softmax run in float32 or higher under autocast.
"""

from __future__ import annotations

import torch
from torch import nn

from batchmates import distributed
from batchmates.nn._eval_mode import check_eval_mode, finite_check_enabled, uses_batch
from batchmates.nn._iba_ops import (
    IBA_MODES,
    acc_dtype,
    attend_to_means,
    batch_means,
    check_mode,
    element_batch_attention,
    intra_batch_attention,
    mean_batch_attention,
)
from batchmates.nn._sdpa import attention

__all__ = [
    "IntraBatchAttention",
    "intra_batch_attention",
    "mean_batch_attention",
    "element_batch_attention",
    "IBA_MODES",
    "EVAL_FORMS",
]

EVAL_FORMS: tuple[str, ...] = ("running", "bank", "sa")
_STAT_TENSORS = ("running_k", "running_v", "bank_k", "bank_v")  # shapes known after the first training batch
_STAT_COUNTS = ("num_batches_tracked", "train_batch_size")


def _check_eval_form(form: str, mode: str) -> str:
    if form not in EVAL_FORMS:
        raise ValueError(
            f"eval_form must be 'running' (default: running batch means), 'bank' (EIBA: a bank of training "
            f"keys/values) or 'sa' (self-attention alone); got {form!r}"
        )
    if form == "bank" and mode != "element":
        raise ValueError(
            "eval_form='bank' needs mode='element' (EIBA fills the bank from the keys/values it gathers); use "
            "eval_form='running' with mode='mean'"
        )
    return form


class IntraBatchAttention(nn.Module):
    """Multi-head attention with intra-batch attention (IBAFormer, arXiv:2309.06282): ``[B, N, D] -> [B, N, D]``.

    A drop-in token mixer (the attention sub-layer of a transformer block). With ``qkv`` the shared projection,
    per head ``SA_b = softmax(Q_b K_bᵀ/√d) V_b`` and ``IBA`` is MIBA (``mode="mean"``) or EIBA
    (``mode="element"``); the output is ``proj(½(SA + IBA))`` when the batch is used (training, or eval with
    ``eval_mode="batch"``) and ``proj(½(SA + IBA_eval))`` from training statistics in independent eval. The
    formulas are our reconstruction; see the module docstring for the paper/library split.

    Args:
        dim: D, the token width (divisible by ``num_heads``).
        num_heads: number of heads.
        mode: ``"mean"`` (MIBA, default) or ``"element"`` (EIBA); aliases ``"miba"``, ``"eiba"``.
        eval_mode: ``"independent"`` (default) or ``"batch"``.
        eval_form: independent-eval form: ``"running"`` (default), ``"bank"`` (EIBA only) or ``"sa"``.
        momentum: weight of the newest batch in the running means, in (0, 1] (as BatchNorm's).
        bank_size: training samples whose keys/values EIBA keeps for ``eval_form="bank"``.
        chunk_size: EIBA query-key sample pairs per chunk (``None``: automatic from a memory budget).
        gather: relate the global batch under ``torch.distributed`` (default) or only the local one.
        qkv_bias: bias in the shared q/k/v projection.
        checkpoint_chunks: recompute EIBA chunks in backward so that stored memory is bounded by the chunk.
        check_finite: raise ``ValueError`` on NaN/Inf input. ``None`` (default): check on CPU only, where it is
            free; on accelerators it would force a host sync per call. ``True``/``False`` force it on/off.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        mode: str = "mean",
        eval_mode: str = "independent",
        *,
        eval_form: str = "running",
        momentum: float = 0.1,
        bank_size: int = 64,
        chunk_size: int | None = None,
        gather: bool = True,
        qkv_bias: bool = True,
        checkpoint_chunks: bool = True,
        check_finite: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1 or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"dim and num_heads must be positive ints, got dim={dim!r}, num_heads={num_heads!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be a number in (0, 1] (weight of the newest batch), got {momentum!r}")
        if isinstance(bank_size, bool) or not isinstance(bank_size, int) or bank_size < 1:
            raise ValueError(f"bank_size must be a positive int (training samples kept for EIBA), got {bank_size!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.mode = check_mode(mode)
        self.eval_mode = check_eval_mode(eval_mode)
        self.eval_form = _check_eval_form(eval_form, self.mode)
        self.momentum = float(momentum)
        self.bank_size = bank_size
        self.chunk_size = chunk_size
        self.gather = gather
        self.checkpoint_chunks = checkpoint_chunks
        self.check_finite = check_finite
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        for name in _STAT_TENSORS:
            self.register_buffer(name, torch.zeros(0))
        for name in _STAT_COUNTS:
            self.register_buffer(name, torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, mode={self.mode!r}, eval_mode={self.eval_mode!r}, "
            f"eval_form={self.eval_form!r}, momentum={self.momentum}, bank_size={self.bank_size}, "
            f"chunk_size={self.chunk_size}, gather={self.gather}"
        )

    @property
    def has_statistics(self) -> bool:
        """Whether training statistics exist (at least one training batch since construction or loading)."""
        return self.running_k.numel() > 0

    def reset_running_stats(self) -> None:
        """Forget the training statistics (independent eval is then self-attention alone until trained)."""
        for name in _STAT_TENSORS:
            getattr(self, name).resize_(0)
        for name in _STAT_COUNTS:
            getattr(self, name).zero_()

    # ------------------------------------------------------------------ statistics
    @staticmethod
    def _store(buf: torch.Tensor, value: torch.Tensor, what: str) -> bool:
        """Size an empty buffer like ``value`` and copy it in (True), or check its shape matches (False)."""
        if buf.numel() == 0:
            buf.resize_(value.shape).copy_(value)
            return True
        if buf.shape[-3:] != value.shape[-3:]:
            raise ValueError(
                f"IntraBatchAttention: {what} were collected for [heads, tokens, head_dim] = {list(buf.shape[-3:])} "
                f"but this batch has {list(value.shape[-3:])}; the token count must stay fixed (call "
                "reset_running_stats() to start over)"
            )
        return False

    @torch.no_grad()
    def _track(self, k_bar: torch.Tensor, v_bar: torch.Tensor, count: int, k_all: torch.Tensor | None,
               v_all: torch.Tensor | None) -> None:
        self.num_batches_tracked.add_(1)
        self.train_batch_size.fill_(count)
        for buf, new in ((self.running_k, k_bar[0]), (self.running_v, v_bar[0])):
            new = new.detach().to(buf.dtype)
            if not self._store(buf, new, "running means"):
                weight = (1.0 / self.num_batches_tracked.to(buf.dtype)).clamp(min=self.momentum)
                buf.lerp_(new, weight)
        if k_all is None or v_all is None:
            return
        for buf, new in ((self.bank_k, k_all), (self.bank_v, v_all)):
            new = new.detach()[-self.bank_size :].to(buf.dtype)
            if not self._store(buf, new, "banked keys/values"):
                kept = torch.cat([buf, new])[-self.bank_size :]
                if kept.shape != buf.shape:  # the bank is still filling up; once full its shape is fixed
                    buf.resize_(kept.shape)
                buf.copy_(kept)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A checkpoint without statistics (written before they existed, or a self-attention layer's weights)
        # loads as "no statistics": independent eval is then self-attention alone, which is what such a
        # checkpoint was evaluated with when it was written.
        for n in (*_STAT_TENSORS, *_STAT_COUNTS):
            if prefix + n not in state_dict:
                state_dict[prefix + n] = torch.zeros(0) if n in _STAT_TENSORS else torch.zeros((), dtype=torch.long)
        for n in _STAT_TENSORS:  # statistics are sized by the data: take the checkpoint's shape
            own, saved = getattr(self, n), state_dict[prefix + n]
            if isinstance(saved, torch.Tensor) and own.shape != saved.shape:
                own.resize_(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"IntraBatchAttention: x must be a torch.Tensor [B, N, D], got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"IntraBatchAttention: x must be a token map [B, N, D], got shape {tuple(x.shape)}")
        if x.shape[2] != self.dim:
            raise ValueError(
                f"IntraBatchAttention: x has token width {x.shape[2]} but the layer was built for dim={self.dim}"
            )
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"IntraBatchAttention: x must hold at least one sample and token, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"IntraBatchAttention: x must be a floating-point tensor, got {x.dtype}")
        if finite_check_enabled(self.check_finite, x) and not bool(torch.isfinite(x).all()):
            raise ValueError("IntraBatchAttention: x contains NaN/Inf values (pass check_finite=False to skip)")

    def _batch_term(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The IBA term over the (global) batch; in training it also updates the statistics."""
        if self.mode == "mean":
            k_bar, v_bar, count = batch_means(k, v, gather=self.gather)
            if self.training:
                self._track(k_bar, v_bar, count, None, None)
            return attend_to_means(q, k_bar, v_bar)
        if self.gather and distributed.is_distributed():
            k, v = distributed.gather(k), distributed.gather(v)
        if self.training:
            acc = acc_dtype(k)
            self._track(k.mean(0, keepdim=True, dtype=acc), v.mean(0, keepdim=True, dtype=acc), k.shape[0], k, v)
        return element_batch_attention(q, k, v, chunk_size=self.chunk_size, checkpoint_chunks=self.checkpoint_chunks)

    def _eval_term(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sa: torch.Tensor) -> torch.Tensor | None:
        """``IBA_eval`` from the training statistics only (None: self-attention alone)."""
        form = _check_eval_form(self.eval_form, self.mode)  # the attributes may have been changed since __init__
        if form == "sa" or not self.has_statistics:
            return None
        if self.running_k.shape[1] != q.shape[2]:
            raise ValueError(
                f"IntraBatchAttention: the running statistics are for {self.running_k.shape[1]} tokens but x has "
                f"{q.shape[2]}; evaluate at the training resolution (or eval_form='sa')"
            )
        acc = acc_dtype(q)
        own = 1.0 / self.train_batch_size.clamp(min=1).to(acc)  # weight of the sample itself in a training batch
        if form == "running":
            k_t = torch.lerp(self.running_k.to(acc).unsqueeze(0), k.to(acc), own)
            v_t = torch.lerp(self.running_v.to(acc).unsqueeze(0), v.to(acc), own)
            return attend_to_means(q, k_t, v_t)
        if self.bank_k.numel() == 0:
            raise ValueError(
                "IntraBatchAttention: eval_form='bank' needs the key/value bank that training with mode='element' "
                "fills, and this layer has none; use eval_form='running' or 'sa'"
            )
        bank = element_batch_attention(q, self.bank_k.to(q.dtype), self.bank_v.to(q.dtype),
                                       chunk_size=self.chunk_size, checkpoint_chunks=False)
        return torch.lerp(bank.to(acc), sa.to(acc), own).to(q.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, h, N, d] each
        out = attention(q, k, v)
        iba = self._batch_term(q, k, v) if uses_batch(self, self.eval_mode) else self._eval_term(q, k, v, out)
        if iba is not None:
            out = torch.lerp(out, iba.to(out.dtype), 0.5)  # ½(SA + IBA) in one kernel; exactly SA when IBA == SA
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dim))

