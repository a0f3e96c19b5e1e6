"""BatchFormer: a transformer encoder layer across the batch axis (Hou et al., CVPR 2022, arXiv:2203.01522).

During training the samples of the mini-batch attend to each other, so each feature is refined with what its
batch mates look like (the paper's aim: sample relationships for long-tailed and data-scarce recognition).

How a method uses it (paper)
----------------------------
The classifier is *shared* between the features before and after the layer::

    feats = backbone(x)                                  # [B, D]
    if training:
        both, y2 = batchformer.augment(feats, y)         # cat([feats, batchformer(feats)]), cat([y, y])
        loss = F.cross_entropy(classifier(both), y2)
    else:
        logits = classifier(feats)                       # the layer is dropped at test time

Because the classifier must also classify the pre-layer features, it stays valid without the layer, and test
predictions never depend on the other test images. :meth:`BatchFormer.augment` returns the doubled batch while
the batch is used and ``(x, labels)`` unchanged in independent eval.

What is the paper's and what is ours
------------------------------------
Paper: one standard transformer encoder layer (multi-head self-attention + feed-forward, residuals, LayerNorm,
post-norm) applied to the batch as a sequence of B tokens; official defaults 4 heads, feed-forward width = D,
dropout 0.5; the shared classifier; the layer removed at inference.

Library choices:

* ``dropout=0.0`` by default (the official 0.5 is one keyword away); ``norm_first`` switches to pre-norm.
* ``eval_mode="independent"`` (default): in ``eval()`` every sample attends only to itself, which equals the
  layer's batch-size-1 behaviour (softmax over one key is 1), so the output of a sample never depends on its
  batch mates. (The *method* drops the layer at test time altogether; this mode makes the module itself safe
  to call in eval.) ``eval_mode="batch"`` keeps attention across the test batch.
* Under ``torch.distributed`` the batch is the global batch: the inputs are gathered with a gradient-carrying
  all-gather and this rank's samples (queries) attend to all of them (keys/values); the feed-forward part runs
  only on this rank's samples.
* The attention (a softmax over the batch) runs in float32 (float64 for float64 input) even under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchmates import distributed
from batchmates.nn._eval_mode import check_eval_mode, finite_check_enabled, uses_batch
from batchmates.nn._sdpa import attention

__all__ = ["BatchFormer"]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class BatchFormer(nn.Module):
    """Transformer encoder layer over the batch axis (BatchFormer, arXiv:2203.01522): ``[B, D] -> [B, D]``.

    Args:
        dim: D, the feature width (divisible by ``num_heads``).
        num_heads: attention heads (paper: 4).
        eval_mode: ``"independent"`` (default; each sample attends only to itself in eval) or ``"batch"``.
        dim_feedforward: hidden width of the feed-forward part (``None``: D, as in the official code).
        dropout: dropout on attention weights, after attention and in/after the feed-forward part.
        gather: relate the global batch under ``torch.distributed`` (default) or only the local one.
        norm_first: pre-norm instead of the paper's post-norm.
        activation: ``"relu"`` (paper) or ``"gelu"``.
        check_finite: raise ``ValueError`` on NaN/Inf input. ``None`` (default): check on CPU only, where it is
            free; on accelerators it would force a host sync per call. ``True``/``False`` force it on/off.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        eval_mode: str = "independent",
        *,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
        gather: bool = True,
        norm_first: bool = False,
        activation: str = "relu",
        check_finite: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1 or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"dim and num_heads must be positive ints, got dim={dim!r}, num_heads={num_heads!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        ff = dim if dim_feedforward is None else dim_feedforward
        if not isinstance(ff, int) or ff < 1:
            raise ValueError(f"dim_feedforward must be a positive int or None, got {dim_feedforward!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.eval_mode = check_eval_mode(eval_mode)
        self.dropout = dropout
        self.gather = gather
        self.norm_first = norm_first
        self.activation = activation
        self.check_finite = check_finite
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.linear1 = nn.Linear(dim, ff)
        self.linear2 = nn.Linear(ff, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, eval_mode={self.eval_mode!r}, dropout={self.dropout}, "
            f"norm_first={self.norm_first}, gather={self.gather}"
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"BatchFormer: x must be a torch.Tensor [B, D], got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(
                f"BatchFormer: x must be a batch of feature vectors [B, D] (pool/flatten feature maps first), "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.dim:
            raise ValueError(f"BatchFormer: x has width {x.shape[1]} but the layer was built for dim={self.dim}")
        if x.shape[0] == 0:
            raise ValueError("BatchFormer: x is an empty batch (B = 0)")
        if not x.is_floating_point():
            raise TypeError(f"BatchFormer: x must be a floating-point tensor, got {x.dtype}")
        if finite_check_enabled(self.check_finite, x) and not bool(torch.isfinite(x).all()):
            raise ValueError("BatchFormer: x contains NaN/Inf values (pass check_finite=False to skip)")

    def _attention(self, xq: torch.Tensor, xkv: torch.Tensor, across_batch: bool) -> torch.Tensor:
        """Multi-head attention of queries ``xq`` [B, D] over keys/values ``xkv`` [B', D] (the batch axis)."""
        d = self.dim
        w, b = self.in_proj.weight, self.in_proj.bias
        q = F.linear(xq, w[:d], b[:d])
        k = F.linear(xkv, w[d : 2 * d], b[d : 2 * d])
        v = F.linear(xkv, w[2 * d :], b[2 * d :])
        h, hd = self.num_heads, self.head_dim
        if across_batch:  # one sequence of B tokens: [1, h, B, hd]
            q, k, v = (t.view(1, -1, h, hd).transpose(1, 2) for t in (q, k, v))
        else:  # B sequences of one token each: [B, h, 1, hd]
            q, k, v = (t.view(-1, h, 1, hd) for t in (q, k, v))
        out_dtype = q.dtype
        acc = torch.float64 if out_dtype == torch.float64 else torch.float32
        p = self.dropout if self.training else 0.0
        with torch.autocast(device_type=xq.device.type, enabled=False):
            o = attention(q.to(acc), k.to(acc), v.to(acc), dropout_p=p)
        o = o.to(out_dtype)
        o = o.transpose(1, 2).reshape(-1, d) if across_batch else o.reshape(-1, d)
        return self.out_proj(o)

    def _feedforward(self, x: torch.Tensor) -> torch.Tensor:
        act = _ACTIVATIONS[self.activation]
        return F.dropout(self.linear2(F.dropout(act(self.linear1(x)), self.dropout, self.training)), self.dropout,
                         self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        across = uses_batch(self, self.eval_mode)
        keys = x
        if across and self.gather and distributed.is_distributed():
            keys = distributed.gather(x)
        drop = lambda t: F.dropout(t, self.dropout, self.training)
        if self.norm_first:
            kn = self.norm1(keys) if keys is not x else None
            xn = self.norm1(x)
            h = x + drop(self._attention(xn, xn if kn is None else kn, across))
            return h + self._feedforward(self.norm2(h))
        h = self.norm1(x + drop(self._attention(x, keys, across)))
        return self.norm2(h + self._feedforward(h))

    def augment(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shared-classifier batch: ``(cat([x, self(x)]), cat([labels, labels]))`` while the batch is used.

        In independent eval the layer is dropped (as the paper does at test time) and ``(x, labels)`` come back
        unchanged, so a classifier applied to the result predicts from the pre-layer features.
        """
        if labels is not None and (labels.dim() == 0 or labels.shape[0] != x.shape[0]):
            raise ValueError(
                f"BatchFormer.augment: labels must have one entry per sample (dim 0 = {x.shape[0]}), "
                f"got shape {tuple(labels.shape)}"
            )
        if not uses_batch(self, self.eval_mode):
            self._check_input(x)
            return x, labels
        out = torch.cat([x, self(x)], dim=0)
        return out, (None if labels is None else torch.cat([labels, labels], dim=0))
