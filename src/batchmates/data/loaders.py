"""Batch loaders: in-memory slicing for small sets, torch DataLoader workers for large ones.

:class:`InMemoryBatchLoader` slices whole batches out of an :class:`~batchmates.data.datasets.InMemoryImages`
with one index per batch (no per-sample ``__getitem__``, no workers, no collation). The order of an epoch is a
permutation drawn from a ``torch.Generator`` seeded by ``(seed, epoch)`` only, so it is identical across
processes and runs, and independent of the global RNG (which the trainer uses for augmentation).

Resumable (library contract with Lightning 2.x): Lightning saves ``state_dict()`` of every train loader that
defines ``state_dict``/``load_state_dict`` in its checkpoints and restores it before the first ``iter()`` of a
resumed fit (``FitLoop.setup_data``). Lightning does not prefetch from loaders that have a ``len``, so the
recorded "batches already yielded" is exactly the number of batches trained on, and the resumed epoch
continues with the next batch. Lightning also calls ``loader.sampler.set_epoch(epoch)`` at every epoch start.

The images may live on the training device (``InMemoryImages(images.cuda(), labels.cuda())``): the batches are
then sliced there, with no host-to-device copy per step (the trainer does this on a GPU, see
:mod:`batchmates.training.data`).

Distributed: each rank takes the strided share ``perm[rank::world]`` of the (padded or trimmed) epoch
permutation and cuts it into batches of ``batch_size`` (a per-rank batch size, as with a torch DataLoader and
``DistributedSampler``). With the strided split, the union of the ranks' k-th batches is exactly the k-th
batch of one process with batch size ``batch_size × world`` whenever the permutation needs no padding, so a
W-rank run sees the same global batches as the single-process run it is compared with.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from batchmates import distributed as bm_dist
from batchmates.data.datasets import InMemoryImages

__all__ = ["EpochPermutationSampler", "InMemoryBatchLoader", "make_loader", "epoch_generator"]

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, epoch) pairs over the 63-bit seed space


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded deterministically from ``(seed, epoch)``."""
    g = torch.Generator()
    g.manual_seed((int(seed) * _MIX + int(epoch)) % (2**63))
    return g


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


class EpochPermutationSampler(Sampler[int]):
    """Indices of this rank for one epoch: a ``(seed, epoch)``-seeded permutation, split across ranks.

    ``num_replicas``/``rank`` default to :mod:`batchmates.distributed` at iteration time (1 and 0 outside
    ``torch.distributed``); pass ``num_replicas=1, rank=0`` to give every rank the whole set. ``even`` makes
    the shares equal: ``"pad"`` repeats the start of the permutation (like ``DistributedSampler``),
    ``"drop"`` drops the tail.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        even: str = "pad",
    ) -> None:
        self.num_samples = _check_int("num_samples", num_samples, 1)
        if even not in ("pad", "drop"):
            raise ValueError(f"even must be 'pad' or 'drop'; got {even!r}")
        if num_replicas is not None:
            _check_int("num_replicas", num_replicas, 1)
        if rank is not None:
            _check_int("rank", rank, 0)
        if num_replicas is not None and rank is not None and rank >= num_replicas:
            raise ValueError(f"rank must be < num_replicas; got rank={rank}, num_replicas={num_replicas}")
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self._num_replicas = num_replicas
        self._rank = rank
        self.even = even
        self.epoch = 0

    @property
    def num_replicas(self) -> int:
        return self._num_replicas if self._num_replicas is not None else bm_dist.world_size()

    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else bm_dist.rank()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_int("epoch", epoch, 0)

    def per_rank(self) -> int:
        w = self.num_replicas
        return -(-self.num_samples // w) if self.even == "pad" else self.num_samples // w

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's indices (int64) for ``epoch`` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        n, w, r = self.num_samples, self.num_replicas, self.rank
        if r >= w:
            raise ValueError(f"rank {r} is not < num_replicas {w}")
        perm = torch.randperm(n, generator=epoch_generator(self.seed, epoch)) if self.shuffle else torch.arange(n)
        total = self.per_rank() * w
        if total > n:
            reps = -(-total // n)
            perm = perm.repeat(reps)[:total]
        else:
            perm = perm[:total]
        return perm[r::w]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.per_rank()


class InMemoryBatchLoader:
    """Iterate ``(uint8 images [B, C, H, W], int64 labels [B])`` batches sliced from in-memory tensors.

    Args:
        dataset: the :class:`InMemoryImages` to draw from.
        batch_size: samples per batch on this rank.
        shuffle: permute each epoch (seeded by ``(seed, epoch)``); False keeps dataset order.
        drop_last: drop this rank's last incomplete batch.
        seed: the permutation seed.
        num_replicas, rank, even: rank split, see :class:`EpochPermutationSampler`.

    ``set_epoch(e)`` selects the epoch's permutation (Lightning calls ``sampler.set_epoch``, which is the
    same). Without explicit calls, a new ``iter()`` after a completed pass moves on to the next epoch; a new
    ``iter()`` after an abandoned pass restarts the same epoch.
    ``state_dict()`` records ``(epoch, batches already yielded)``; after ``load_state_dict`` the next
    ``iter()`` resumes that epoch with the next batch.
    """

    def __init__(
        self,
        dataset: InMemoryImages,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        even: str = "pad",
    ) -> None:
        if not isinstance(dataset, InMemoryImages):
            raise TypeError(
                f"InMemoryBatchLoader needs an InMemoryImages dataset; got {type(dataset).__name__} "
                "(use make_loader, which returns a torch DataLoader for other datasets)"
            )
        self.dataset = dataset
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.drop_last = bool(drop_last)
        self.sampler = _LoaderSampler(
            self, len(dataset), shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank, even=even
        )
        self._yielded = 0  # batches of the current epoch handed out so far
        self._resume_from = 0  # batches to skip at the next iter() (set by load_state_dict)
        self._pinned = False  # set_epoch() was called: the next iter() starts that epoch (no auto-advance)

    # ------------------------------------------------------------------ epochs
    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def seed(self) -> int:
        return self.sampler.seed

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s permutation from the next ``iter()`` on (a no-op when already at ``epoch``)."""
        self.sampler.set_epoch(epoch)

    def _on_set_epoch(self, old: int, new: int) -> None:
        if new == old and self._resume_from:  # Lightning re-announces the epoch being resumed: keep the position
            return
        self._yielded = 0
        self._resume_from = 0
        self._pinned = True

    def __len__(self) -> int:
        n = self.sampler.per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._iterate()

    def _iterate(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A generator: its body (and so the choice of epoch) runs at the first next(), after Lightning's
        # set_epoch call that follows iter() when a fit starts or resumes.
        n_batches = len(self)
        if self._resume_from:
            start, self._resume_from = self._resume_from, 0
        else:
            if not self._pinned and self._yielded >= n_batches and self._yielded > 0:  # last pass done: next epoch
                self.sampler.epoch += 1
            start = 0
        self._pinned = False
        self._yielded = start
        idx = self.sampler.indices()
        images, labels = self.dataset.images, self.dataset.labels
        if images.device != idx.device:  # a set held on the training device: index it there (no copies per batch)
            idx = idx.to(images.device)
        for b in range(start, n_batches):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            self._yielded = b + 1
            yield images.index_select(0, sel), labels.index_select(0, sel)

    # ------------------------------------------------------------------ resumable state
    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches_yielded", ...}``: enough to continue this epoch exactly where it stopped."""
        return {
            "epoch": self.epoch,
            "batches_yielded": self._yielded,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_samples": len(self.dataset),
            "num_replicas": self.sampler.num_replicas,
            "shuffle": self.sampler.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next ``iter()`` yields the remaining batches of that epoch."""
        for key in ("seed", "batch_size", "num_samples", "num_replicas", "shuffle"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(
                    f"cannot resume this loader: the checkpoint was made with {key}={state[key]!r} but this "
                    f"loader has {key}={mine!r}; resume with the same data settings (or start a new run)"
                )
        epoch, done = int(state["epoch"]), int(state["batches_yielded"])
        if done >= len(self) and done > 0:  # saved at the end of an epoch: continue with the next one
            epoch, done = epoch + 1, 0
        self.sampler.epoch = epoch
        self._yielded = done
        self._resume_from = done
        self._pinned = True

    def __repr__(self) -> str:
        return (
            f"InMemoryBatchLoader(n={len(self.dataset)}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.sampler.shuffle}, seed={self.seed}, epoch={self.epoch})"
        )


class _LoaderSampler(EpochPermutationSampler):
    """The loader's sampler: ``set_epoch`` also resets the loader's position when the epoch changes."""

    def __init__(self, loader: InMemoryBatchLoader, num_samples: int, **kw: Any) -> None:
        super().__init__(num_samples, **kw)
        self._loader = loader

    def set_epoch(self, epoch: int) -> None:
        old = self.epoch
        super().set_epoch(epoch)
        self._loader._on_set_epoch(old, self.epoch)


def _stack_collate(batch: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([b[0] for b in batch])
    labels = torch.as_tensor([int(b[1]) for b in batch], dtype=torch.int64)
    return images, labels


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    drop_last: bool = False,
    seed: int = 0,
    num_workers: int | None = None,
    persistent_workers: bool = True,
    pin_memory: bool = False,
    **kwargs: Any,
) -> InMemoryBatchLoader | DataLoader:
    """The right loader for ``dataset``: :class:`InMemoryBatchLoader` for in-memory sets, else a DataLoader.

    The DataLoader path decodes in ``num_workers`` worker processes (default: ``min(4, cpu count)``, kept
    alive between epochs) and collates uint8 images into ``[B, C, H, W]``; its shuffle order comes from a
    generator seeded with ``seed``. Extra ``kwargs`` go to :class:`InMemoryBatchLoader` (``num_replicas``,
    ``rank``, ``even``) or to ``DataLoader``.
    """
    if isinstance(dataset, InMemoryImages):
        return InMemoryBatchLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, **kwargs)
    import os

    _check_int("batch_size", batch_size, 1)
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    g = torch.Generator()
    g.manual_seed(int(seed))
    if num_workers == 0 and persistent_workers:
        persistent_workers = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=num_workers,
            persistent_workers=persistent_workers,
            pin_memory=pin_memory,
            collate_fn=kwargs.pop("collate_fn", _stack_collate),
            generator=g,
            **kwargs,
        )
