"""Exact gradient accumulation for batch-relational losses (GradCache-style cached embeddings).

Plain gradient accumulation computes a contrastive loss per micro-batch, so each anchor sees only the negatives
of its own micro-batch: a different loss from the large batch. :func:`cached_backward` computes the large-batch
loss and its exact parameter gradients while holding the activations of one micro-batch at a time:

1. embed every micro-batch without a graph (``torch.no_grad``);
2. compute the loss once on all embeddings, with a gradient only w.r.t. the embeddings (and the loss's own
   parameters, e.g. SwAV prototypes): memory is that of the loss, linear in N with the chunked SupCon path
   (``SupConLoss(chunk_size=...)``);
3. re-run each micro-batch with a graph and back-propagate its slice of the cached embedding gradient,
   ``torch.autograd.backward(z_micro, grad_micro)``; parameter gradients accumulate in ``.grad``.

Paper: none of the surveyed methods (METHODS.md) prescribes it. The technique is GradCache's (Gao et al. 2021,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", arXiv:2101.06983): the loss gradient
w.r.t. the representations is computed once for the whole batch, then each sub-batch is re-encoded and
back-propagated with its cached representation gradient.

Library choices:

* **Randomness.** The re-forward of a micro-batch replays the random state (CPU and the input's accelerator) its
  first forward started from, so dropout, drop-path and augmentations done inside ``encoder`` draw the same numbers
  twice (``preserve_rng=True``). The result then equals running the micro-batches one after another in a single
  graph; it equals one large forward when ``encoder`` draws no random numbers (no dropout, or ``eval``).
* **BatchNorm** in training mode normalises each micro-batch with its own statistics (as "ghost" BatchNorm), so the
  result equals the large batch only without BatchNorm or with it in eval; running statistics are updated once per
  micro-batch (the no-grad pass restores those of ``norm_modules``; ``freeze_norm_stats=True``).
* **Determinism.** Exactness needs the two forwards of a micro-batch to compute the same embeddings, which
  non-deterministic accelerator kernels break at the level of rounding.
* **DDP.** Pass ``no_sync=model.no_sync`` so that only the last re-forward's backward all-reduces gradients. Under
  ``torch.distributed`` the loss itself relates the global batch as usual (each rank caches its local embeddings).
* Any loss of the embeddings works (SupCon/SimCLR, Barlow Twins, SwAV scores), with ``encoder`` returning one
  tensor or a tuple of tensors whose first dimension is the micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["cached_backward"]


def _as_tuple(z: Any, what: str) -> tuple[Tensor, ...]:
    out = (z,) if isinstance(z, Tensor) else tuple(z) if isinstance(z, (tuple, list)) else None
    if not out or not all(isinstance(t, Tensor) for t in out):
        raise TypeError(f"{what} must return a tensor or a tuple of tensors; got {type(z).__name__}")
    return out


def _split(inputs: Sequence[Tensor], size: int) -> list[tuple[Tensor, ...]]:
    n = inputs[0].shape[0]
    return [tuple(t[i : i + size] for t in inputs) for i in range(0, n, size)]


class _RngState:
    """The CPU random state and that of the accelerator holding ``device`` (restored by :meth:`restore`)."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.device = device
        self.accel = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accel is not None:
            torch.cuda.set_rng_state(self.accel, self.device)


@contextlib.contextmanager
def _norm_stats_restored(modules: Sequence[nn.Module]) -> Iterator[None]:
    norms = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in zip(norms, saved):
                for k, b in bufs.items():
                    getattr(m, k).copy_(b)


def cached_backward(
    encoder: Callable[..., Any],
    inputs: Tensor | Sequence[Tensor],
    loss_fn: Callable[..., Tensor],
    *,
    micro_batch_size: int,
    loss_args: Sequence[Any] = (),
    preserve_rng: bool = True,
    freeze_norm_stats: bool = True,
    norm_modules: Sequence[nn.Module] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> Tensor:
    """Back-propagate ``loss_fn(*encoder(all inputs), *loss_args)`` exactly, one micro-batch of activations at a time.

    Args:
        encoder: maps one micro-batch ``encoder(*chunk)`` to embeddings (a tensor or tuple of tensors, first
            dimension the micro-batch), e.g. ``lambda v1, v2: torch.stack([net(v1), net(v2)], 1)`` for SupCon.
        inputs: a tensor or tuple of tensors whose first dimension is the batch N (e.g. the two views).
        loss_fn: the loss of all embeddings: ``loss_fn(*embeddings, *loss_args) -> scalar`` (e.g. a
            :class:`~batchmates.losses.SupConLoss` with ``chunk_size`` for memory linear in N).
        micro_batch_size: samples per micro-batch (the last one may be smaller).
        loss_args: extra whole-batch arguments of the loss (e.g. ``(labels,)``), not split.
        preserve_rng, freeze_norm_stats, no_sync: see the module docstring.
        norm_modules: the modules whose BatchNorm running statistics the no-grad pass must leave alone (default:
            ``encoder`` when it is a module; pass ``[net]`` when ``encoder`` is a function of ``net``).

    Returns:
        The loss value (detached). Parameter gradients are accumulated into ``.grad`` as ``loss.backward()``
        would, for the encoder's parameters and for parameters inside ``loss_fn``.
    """
    tensors = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if not tensors or not all(isinstance(t, Tensor) and t.dim() >= 1 for t in tensors):
        raise TypeError("inputs must be a tensor or a tuple of tensors with a batch dimension first")
    if any(t.shape[0] != tensors[0].shape[0] for t in tensors) or tensors[0].shape[0] == 0:
        raise ValueError(f"inputs must share a non-empty batch dimension; got {[tuple(t.shape) for t in tensors]}")
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be a positive int; got {micro_batch_size!r}")
    chunks = _split(tensors, micro_batch_size)
    if norm_modules is None:
        norm_modules = [encoder] if isinstance(encoder, nn.Module) else []

    # 1. embeddings without a graph, remembering the random state each micro-batch started from
    states, cached = [], []
    stats = _norm_stats_restored(list(norm_modules)) if freeze_norm_stats else contextlib.nullcontext()
    with torch.no_grad(), stats:
        for chunk in chunks:
            states.append(_RngState(chunk[0].device) if preserve_rng else None)
            cached.append(tuple(z.detach() for z in _as_tuple(encoder(*chunk), "encoder")))
    n_out = len(cached[0])
    if any(len(c) != n_out for c in cached):
        raise ValueError("encoder returned a different number of tensors for different micro-batches")

    # 2. the loss on all embeddings, with gradients w.r.t. them (and the loss's own parameters)
    full = [torch.cat([c[i] for c in cached]).requires_grad_(True) for i in range(n_out)]
    loss = loss_fn(*full, *loss_args)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("loss_fn must return a scalar tensor (use reduction='mean')")
    loss.backward()
    grads = [z.grad if z.grad is not None else torch.zeros_like(z) for z in full]
    sizes = [c[0].shape[0] for c in cached]

    # 3. re-forward each micro-batch with a graph and push its slice of the cached gradient through it
    after = _RngState(chunks[-1][0].device) if preserve_rng else None
    offset = 0
    for k, (chunk, state, m) in enumerate(zip(chunks, states, sizes)):
        if state is not None:
            state.restore()
        sync = no_sync() if no_sync is not None and k < len(chunks) - 1 else contextlib.nullcontext()
        with sync:
            outs = _as_tuple(encoder(*chunk), "encoder")
            torch.autograd.backward(list(outs), [g[offset : offset + m] for g in grads])
        offset += m
    if after is not None:
        after.restore()  # the random stream continues as after one pass over the micro-batches
    return loss.detach()
