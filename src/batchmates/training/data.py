"""The data side of a run: a ``LightningDataModule`` with the loaders, the label noise and the :class:`DataInfo`.

Paper: none (library infrastructure).

Library choices:

* The training loader draws the global batch ``cfg.batch_size`` split evenly over the ``devices x num_nodes`` ranks,
  shuffled by ``(seed, epoch)``, and drops the last incomplete batch so batch-relational losses always see full
  batches. Its position is part of the checkpoint (exact mid-epoch resume).
* On a CUDA device, in-memory splits are moved to the device once and the loaders slice batches there (no
  host-to-device copy per step).
* The "validation" loader is the whole test split on every rank, in order (these benchmarks have no separate
  validation split).
* Symmetric label noise (:func:`apply_label_noise`): exactly ``round(fraction·N)`` training labels, chosen by the
  run's seed, each moved to a different class drawn uniformly from the other ``num_classes - 1`` (the usual
  "symmetric" protocol). The evaluation's probes are fitted on the same noisy labels.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import lightning as L
import torch

from batchmates.config import ConfigError, DataInfo, RunConfig

__all__ = ["RunDataModule", "apply_label_noise"]


def apply_label_noise(labels: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """Symmetric label noise: exactly ``round(fraction·N)`` labels, chosen by ``seed``, moved to a different class
    drawn uniformly from the other ``num_classes - 1``."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"label_noise must be in [0, 1), got {fraction}")
    labels = labels.clone()
    n = labels.shape[0]
    k = int(round(fraction * n))
    if k == 0 or num_classes < 2:
        return labels
    g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    idx = torch.randperm(n, generator=g)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=g)
    labels[idx] = (labels[idx] + shift) % num_classes
    return labels


class _PlainIterable:
    """Hides a loader's ``sampler`` from Lightning's evaluation-loader checks (which expect a torch DataLoader
    with ``batch_sampler`` once a ``sampler`` attribute exists); iteration and ``len`` pass through."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __iter__(self):
        return iter(self._loader)

    def __len__(self) -> int:
        return len(self._loader)


class RunDataModule(L.LightningDataModule):
    """Loads ``cfg.data`` once (on first use; or takes it loaded, ``splits``) and serves the run's loaders.

    ``splits`` is the clean dataset (evaluation uses it), ``train_split`` the training split with the run's
    label noise, ``info`` the :class:`DataInfo` a method is built with.
    """

    def __init__(self, cfg: RunConfig, splits: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        self._given = splits  # an already loaded ``cfg.data`` (compare's checks reuse one per dataset)
        self._splits: Any = None
        self._train: Any = None

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        from batchmates.data import load_dataset

        cfg = self.cfg
        splits = self._given
        if splits is None:
            splits = load_dataset(cfg.data, data_dir=cfg.data_dir, download=cfg.download, image_size=cfg.image_size)
        train = splits.train
        if cfg.label_noise > 0:
            if not (hasattr(train, "images") and hasattr(train, "labels")):
                raise ConfigError(f"label_noise is supported for in-memory datasets only; {cfg.data!r} is not one")
            noisy = apply_label_noise(train.labels, cfg.label_noise, int(splits.num_classes), cfg.seed)
            try:
                train = replace(train, labels=noisy)
            except TypeError:
                train = type(train)(train.images, noisy)
        if len(train) < cfg.batch_size:
            raise ConfigError(f"batch_size={cfg.batch_size} is larger than the training set ({len(train)} images) "
                              f"of {cfg.data!r}; use a smaller --batch-size")
        self._splits, self._train = splits, train

    @property
    def splits(self) -> Any:
        """The clean dataset (``DatasetSplits``: ``train``, ``test``, ``num_classes``, ...)."""
        self.setup()
        return self._splits

    @property
    def train_split(self) -> Any:
        self.setup()
        return self._train

    @property
    def info(self) -> DataInfo:
        return DataInfo.from_splits(self.splits)

    @property
    def world_size(self) -> int:
        """Processes sharing the global batch: ``devices`` per node times ``num_nodes``."""
        return int(self.cfg.devices) * int(self.cfg.num_nodes)

    def _extra(self, split: Any) -> dict[str, Any]:
        return {} if hasattr(split, "images") else {"num_workers": self.cfg.num_workers}

    def _on_device(self, split: Any) -> Any:
        """An in-memory split moved to this process's CUDA device when training there (the data then stays on the
        device: no copy per step); anything else unchanged."""
        import torch

        from batchmates.data.datasets import InMemoryImages

        if (not isinstance(split, InMemoryImages) or self.cfg.accelerator not in ("auto", "gpu", "cuda")
                or not torch.cuda.is_available() or split.images.device.type == "cuda"):
            return split
        dev = torch.device("cuda", torch.cuda.current_device())
        cache = self.__dict__.setdefault("_device_splits", {})
        if (id(split), dev) not in cache:
            cache[(id(split), dev)] = type(split)(split.images.to(dev), split.labels.to(dev))
        return cache[(id(split), dev)]

    def train_dataloader(self) -> Any:
        from batchmates.data import make_loader

        cfg, train = self.cfg, self._on_device(self.train_split)
        return make_loader(train, cfg.batch_size // self.world_size, shuffle=True, drop_last=True, seed=cfg.seed,
                           **self._extra(train))

    def val_dataloader(self) -> Any:
        from batchmates.data import make_loader

        cfg, test = self.cfg, self._on_device(self.splits.test)
        extra = {"num_replicas": 1, "rank": 0} if hasattr(test, "images") else self._extra(test)
        loader = make_loader(test, max(cfg.batch_size // self.world_size, 256), shuffle=False, drop_last=False,
                             seed=cfg.seed, **extra)
        return _PlainIterable(loader)
