"""The trainer's pieces chosen by run settings: the logger, ``torch.compile``, the monitor, the data of the API.

Paper: none (library infrastructure).

Library choices:

* ``--logger``: ``tensorboard`` (``DIR/tb/``, the default), ``csv`` (Lightning's ``CSVLogger``, ``DIR/logs/``) or
  ``wandb`` (``WandbLogger``, project ``batchmates``, run name = the run directory's name; wandb's own settings
  such as ``WANDB_MODE=offline`` apply). wandb is optional: asking for it without the package is a
  :class:`ConfigError` before anything runs. ``metrics.csv`` / ``metrics.json`` are written whatever the logger.
* ``--compile``: the backbone is compiled in place (``nn.Module.compile``), so checkpoint keys do not change and a
  compiled run's checkpoint loads into an uncompiled model.
* ``--monitor-every -1`` (the default) means every epoch for a method without a classifier (SSL: no quality signal
  otherwise until training ends) and off for one with a classifier (its validation accuracy is logged anyway).
* ``train(cfg, train_dataset=..., test_dataset=...)`` turns a user's datasets into splits named ``custom:NAME``
  (:func:`batchmates.data.datasets.custom.splits_from_datasets`), ``NAME`` from the dataset's ``name`` attribute or
  its class.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from batchmates.config import ConfigError, RunConfig

__all__ = ["check_logger", "make_logger", "compile_backbone", "monitor_every", "user_splits", "LOGGER_DIRS"]

#: Where each logger writes inside the run directory.
LOGGER_DIRS = {"tensorboard": "tb", "csv": "logs", "wandb": "wandb"}


def check_logger(cfg: RunConfig) -> None:
    """Refuse ``logger=wandb`` without the wandb package (before any run starts)."""
    if cfg.logger == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logger=wandb needs the wandb package: pip install wandb (or use --logger tensorboard or "
                          "--logger csv)")


def make_logger(cfg: RunConfig) -> Any:
    """The Lightning logger of ``cfg.logger`` writing under ``cfg.out``."""
    check_logger(cfg)
    if cfg.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=cfg.out, name=LOGGER_DIRS["csv"], version="")
    if cfg.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(save_dir=cfg.out, name=os.path.basename(os.path.normpath(cfg.out)), project="batchmates")
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=cfg.out, name=LOGGER_DIRS["tensorboard"], version="", default_hp_metric=False)


def compile_backbone(model: Any) -> Any:
    """``torch.compile`` the method's backbone in place (state-dict keys unchanged); returns ``model``."""
    model.backbone.compile()
    return model


def monitor_every(cfg: RunConfig, model: Any) -> int:
    """Epochs between two monitor checks (0: off); ``-1`` resolves by whether the method has a classifier."""
    every = int(getattr(cfg, "monitor_every", -1))
    if every >= 0:
        return every
    return 0 if bool(getattr(model, "has_classifier", False)) else 1


def user_splits(cfg: RunConfig, train_dataset: Any, test_dataset: Any) -> Any:
    """The user's datasets as ``DatasetSplits`` (``None`` when no dataset is given)."""
    if train_dataset is None:
        if test_dataset is not None:
            raise ConfigError("test_dataset needs train_dataset too: train(cfg, train_dataset=..., test_dataset=...)")
        return None
    from batchmates.data.datasets.common import DatasetSplits
    from batchmates.data.datasets.custom import splits_from_datasets

    if isinstance(train_dataset, DatasetSplits):
        return train_dataset
    name = getattr(train_dataset, "name", None)
    name = name if isinstance(name, str) and name else type(train_dataset).__name__
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower())
    return splits_from_datasets(train_dataset, test_dataset, name=name, image_size=cfg.image_size)
