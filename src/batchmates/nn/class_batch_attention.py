"""Class Batch Attention (CBA), the batch-relational core of the Batch Transformer.

Her et al., "Batch Transformer: Look for Attention in Batch", 2024, arXiv:2407.04218.

Paper facts
-----------
* Inputs are class-specific queries and keys ``q, k ∈ R^{B×K×E}`` and a value ``v ∈ R^{B×K}`` (in the paper
  the main classifier's logits). For every class (channel) ``k`` independently
  ``S_k = (q_k / sqrt(K)) k_kᵀ ∈ R^{B×B}``, ``A_k = softmax over the batch of S_k`` and
  ``cba[:, k] = A_k v[:, k]``; the block also outputs ``bt = cba + v``.
* The scale is ``1/sqrt(K)`` with ``K`` the number of channels (classes), *not* ``1/sqrt(E)`` as in ordinary
  dot-product attention. It is kept as the default (``scale="sqrt_k"``).

Library choices
---------------
* The softmax runs over the key axis (each sample attends to every sample of the batch, itself included), so
  every ``cba[b, k]`` is a convex combination of the column ``v[:, k]``: it lies in ``[min_j v_jk, max_j v_jk]``,
  batch size 1 gives ``cba == v`` exactly, and identical samples give ``cba == v``.
* ``scale="sqrt_e"`` (ordinary attention scaling) or any positive float (a multiplier of ``q kᵀ``) are options.
* "The batch" is the global batch: under ``torch.distributed`` the module gathers ``k`` and ``v`` from every rank
  with :func:`batchmates.distributed.gather` (gradient-carrying); ``q`` stays local and the outputs are this
  rank's rows. ``gather=False`` relates only the local batch.
* ``eval_mode="independent"`` (default) in ``eval()`` returns the batch-size-1 result ``cba = v`` (so
  ``bt = 2v``): a sample's prediction never depends on its test-time batch mates. ``"batch"`` keeps the attention.
* Scores, softmax and the weighted sum run in float32 or higher even under autocast; the outputs are returned in
  that dtype (float32 for half-precision inputs), which is what a cross-entropy on logits wants anyway.
* ``backend="einsum"`` (default) handles all classes with one batched matmul (no Python loop over classes);
  it materialises the ``[K, B_q, B_k]`` scores, so memory is ``O(K·B_q·B_k)``. ``backend="sdpa"`` runs the same
  maths through ``torch.nn.functional.scaled_dot_product_attention`` with the classes as heads (``v`` padded with
  zero columns to ``E`` so the fused kernels apply), which never materialises the scores on CUDA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchmates import distributed
from batchmates._checks import ensure_finite
from batchmates.nn._eval_mode import check_eval_mode, uses_batch

__all__ = ["ClassBatchAttention", "class_batch_attention", "resolve_cba_scale"]

ScaleSpec = str | float
BACKENDS = ("einsum", "sdpa")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_cba_scale(scale: ScaleSpec, num_classes: int, embed_dim: int) -> float:
    """The multiplier applied to ``q kᵀ``: ``"sqrt_k"`` → ``1/sqrt(K)`` (paper), ``"sqrt_e"`` → ``1/sqrt(E)``,
    or a positive finite float used as is."""
    if isinstance(scale, str):
        if scale == "sqrt_k":
            return 1.0 / math.sqrt(num_classes)
        if scale == "sqrt_e":
            return 1.0 / math.sqrt(embed_dim)
        raise ValueError(
            f"scale must be 'sqrt_k' (the paper's 1/sqrt(K)), 'sqrt_e' (1/sqrt(E)) or a positive float, got {scale!r}"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be 'sqrt_k', 'sqrt_e' or a positive float, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite multiplier of q·kᵀ, got {scale!r}")
    return float(scale)


def _check_scale_spec(scale: ScaleSpec) -> ScaleSpec:
    resolve_cba_scale(scale, 1, 1)  # validates strings/floats without needing the shapes
    return scale


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_tensor(name: str, x: object, ndim: int, layout: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape {layout}, got dtype {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {tuple(x.shape)}")
    return x


def _check_finite(check_finite: bool | None, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        ensure_finite(
            t,
            check_finite,
            f"{name} contains NaN or Inf values; check the layers that produce it (or the learning rate); "
            "check_finite=False skips this check",
        )


def _check_qkv(q: object, k: object, v: object, *, same_batch: bool) -> tuple[Tensor, Tensor, Tensor]:
    q = _check_tensor("q", q, 3, "[B, K, E]")
    k = _check_tensor("k", k, 3, "[B, K, E]")
    v = _check_tensor("v", v, 2, "[B, K]")
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(
            f"q and k must agree in classes K and tokens E (dims 1 and 2): q is {tuple(q.shape)}, k is {tuple(k.shape)}"
        )
    if same_batch and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if v.shape != (k.shape[0], k.shape[1]):
        raise ValueError(
            f"v must have shape [B, K] = {(k.shape[0], k.shape[1])} to match k {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    if q.shape[0] == 0 or k.shape[0] == 0:
        raise ValueError("the batch is empty: q, k and v need at least one sample")
    if q.shape[1] == 0 or q.shape[2] == 0:
        raise ValueError(f"q and k need at least one class and one token, got shape {tuple(q.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    return q, k, v


def class_batch_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: ScaleSpec = "sqrt_k",
    *,
    check_finite: bool | None = None,
    backend: str = "einsum",
) -> Tensor:
    """Functional Class Batch Attention (arXiv:2407.04218): ``cba[b, c] = Σ_j softmax_j(s·q_bc·k_jc) v[j, c]``.

    Args:
        q: queries ``[B_q, K, E]`` (one ``E``-dim query per sample and class).
        k: keys ``[B_k, K, E]``; ``B_k`` may differ from ``B_q`` (e.g. keys gathered from every rank).
        v: values ``[B_k, K]`` (the main classifier's logits in the paper), rows aligned with ``k``.
        scale: ``"sqrt_k"`` (paper: ``1/sqrt(K)``), ``"sqrt_e"`` (``1/sqrt(E)``) or a positive float multiplier.
        check_finite: raise ``ValueError`` on NaN/Inf inputs. ``None`` (default): check on CPU only; on
            accelerators the check would cost a host-device sync. ``True``/``False`` force it.
        backend: ``"einsum"`` (batched matmul, ``O(K·B_q·B_k)`` memory) or ``"sdpa"`` (fused attention kernels).

    Returns:
        ``cba`` of shape ``[B_q, K]`` in float32 or higher. The Batch Transformer output is ``bt = cba + v`` for
        the query rows (see :class:`ClassBatchAttention`).
    """
    q, k, v = _check_qkv(q, k, v, same_batch=False)
    _check_backend(backend)
    _check_finite(check_finite, q=q, k=k, v=v)
    s = resolve_cba_scale(scale, q.shape[1], q.shape[2])
    dtype = _compute_dtype(q, k, v)
    with torch.autocast(device_type=q.device.type, enabled=False):
        qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
        if backend == "sdpa":
            return _sdpa(qf, kf, vf, s)
        # One batched matmul over the K classes: scores[c, b, j] = s * <q[b, c], k[j, c]>.
        scores = torch.einsum("bce,jce->cbj", qf * s, kf)
        attn = F.softmax(scores, dim=-1)  # over the batch (key) axis, per class and query
        return torch.einsum("cbj,jc->bc", attn, vf)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """CBA through fused attention: classes are heads, each value a 1-dim vector padded with zeros to ``E``."""
    n_tok = q.shape[2]
    qh = q.transpose(0, 1).unsqueeze(0).contiguous()  # [1, K, B_q, E]
    kh = k.transpose(0, 1).unsqueeze(0).contiguous()  # [1, K, B_k, E]
    vh = F.pad(v.t().unsqueeze(-1), (0, n_tok - 1)).unsqueeze(0).contiguous()  # [1, K, B_k, E], column 0 = v
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    return out[0, :, :, 0].t()


class ClassBatchAttention(nn.Module):
    """Class Batch Attention of the Batch Transformer (Her et al. 2024, arXiv:2407.04218).

    ``forward(q, k, v)`` with ``q, k: [B, K, E]`` and ``v: [B, K]`` returns ``(cba, bt)``, both ``[B, K]``, with
    ``cba[:, c] = softmax_batch((q_c / sqrt(K)) k_cᵀ) v[:, c]`` per class ``c`` and ``bt = cba + v`` (paper).
    See the module docstring for what is the paper's and what is the library's.

    Args:
        eval_mode: ``"independent"`` (default): in ``eval()`` return the batch-size-1 result ``cba = v``;
            ``"batch"``: keep attending over the batch in ``eval()``. Training always uses the batch.
        scale: ``"sqrt_k"`` (paper's ``1/sqrt(K)``), ``"sqrt_e"`` or a positive float multiplier of ``q kᵀ``.
        gather: under ``torch.distributed``, attend over the global batch (keys and values gathered from every
            rank with an exact gradient). ``False`` attends over the local batch only.
        check_finite: raise ``ValueError`` on NaN/Inf inputs. ``None`` (default): check on CPU only, where it is
            cheap; on accelerators it would cost a host-device sync per call (and a ``torch.compile`` graph
            break). ``True``/``False`` force it.
        backend: ``"einsum"`` (default) or ``"sdpa"``; see the module docstring.
    """

    def __init__(
        self,
        eval_mode: str = "independent",
        *,
        scale: ScaleSpec = "sqrt_k",
        gather: bool = True,
        check_finite: bool | None = None,
        backend: str = "einsum",
    ) -> None:
        super().__init__()
        self.eval_mode = check_eval_mode(eval_mode)
        self.scale = _check_scale_spec(scale)
        self.gather = bool(gather)
        self.check_finite = None if check_finite is None else bool(check_finite)
        self.backend = _check_backend(backend)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        q, k, v = _check_qkv(q, k, v, same_batch=True)
        _check_finite(self.check_finite, q=q, k=k, v=v)
        dtype = _compute_dtype(q, k, v)
        if not uses_batch(self, self.eval_mode):
            # Batch-size-1 behaviour: softmax over a single key is exactly 1, so cba = v.
            cba = v.to(dtype).clone()
            return cba, cba + v.to(dtype)
        if self.gather and distributed.is_distributed():
            k_all, v_all = distributed.gather(k), distributed.gather(v)
        else:
            k_all, v_all = k, v
        cba = class_batch_attention(q, k_all, v_all, self.scale, check_finite=False, backend=self.backend)
        return cba, cba + v.to(cba.dtype)

    def extra_repr(self) -> str:
        return f"eval_mode={self.eval_mode!r}, scale={self.scale!r}, gather={self.gather}, backend={self.backend!r}"
