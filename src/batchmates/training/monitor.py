"""Watch a run learn: kNN accuracy on held-out data, embedding rank (RankMe) and spread, and a collapse warning.

:class:`EmbeddingMonitor` is the trainer's callback for ``--monitor-every N`` (default 1 for methods without a
classifier, whose quality is otherwise only known when training ends). Every N epochs it embeds held-out images
with the method's ``embed`` on the training device and logs, to the progress bar, the logger (TensorBoard/CSV/wandb)
and ``metrics.csv``:

* ``knn_acc``: weighted kNN top-1 (k = 20, T = 0.07, :func:`batchmates.training.evaluate.knn_classify`) of the
  held-out embeddings against the training embeddings, with the training labels the run uses;
* ``rankme``: RankMe (Garrido et al. 2023, arXiv:2210.02885) of the held-out embeddings: ``exp`` of the entropy
  of their normalised singular values, ``p_k = s_k / sum(s) + 1e-7``; from 1 (every embedding on one line) to
  ``min(N, D)``;
* ``feat_std``: the mean per-dimension standard deviation of the L2-normalised embeddings times ``sqrt(D)``
  (about 1 when they spread evenly over the sphere, 0 when they are all the same);
* ``collapse``: 1 in an epoch that warned.

Paper: the weighted kNN monitor follows InstDisc / DINO's protocol (see :mod:`.evaluate`); RankMe is its paper's
definition (the paper shows it tracks downstream accuracy of joint-embedding SSL without labels).

Library choices:

* Training embeddings: at most ``max_train`` (5000) evenly spaced training images; held-out: at most ``max_test``
  (2000) evenly spaced test images. On digits (1347 / 450) that is all of them, so the last epoch's ``knn_acc``
  equals the final evaluation's kNN k=20.
* Collapse warning (a ``RuntimeWarning``) when RankMe falls below ``rank_drop`` (0.5) of the highest value seen in
  this run, or below 1.5 (the embeddings lie on about one direction), or when ``feat_std`` falls below
  ``min_std`` (0.05); not judged on fewer than ``min_samples`` (16) held-out images.
* Unlabelled data: no kNN, only the rank and spread. Under DDP every process measures (same weights, same values).
* Epochs between two checks log NaN, so that every row of ``metrics.csv`` has the monitor's columns.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

__all__ = ["EmbeddingMonitor", "rankme", "feature_spread"]


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe of ``features [N, D]``: ``exp(-sum p_k log p_k)``, ``p_k = s_k / ||s||_1 + eps`` (singular values)."""
    if features.dim() != 2 or features.shape[0] < 1:
        raise ValueError(f"rankme: features must be [N, D] with N >= 1; got {tuple(features.shape)}")
    s = torch.linalg.svdvals(features.double())
    p = s / s.sum().clamp_min(1e-300) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def feature_spread(features: torch.Tensor) -> float:
    """Mean per-dimension std of the L2-normalised ``features [N, D]``, times ``sqrt(D)`` (0: all identical)."""
    z = F.normalize(features.double(), dim=1)
    return float(z.std(dim=0, unbiased=False).mean() * math.sqrt(z.shape[1]))


def _evenly(ds: Any, n: int) -> Any:
    size = len(ds)
    if size <= n:
        return ds
    idx = torch.linspace(0, size - 1, n).round().long()
    if hasattr(ds, "images") and hasattr(ds, "labels"):
        from batchmates.training.evaluate import _Split

        return _Split(ds.images[idx], ds.labels[idx])
    return torch.utils.data.Subset(ds, idx.tolist())


class EmbeddingMonitor(L.Callback):
    """Every ``every`` epochs: kNN accuracy, RankMe and spread of held-out embeddings; warns on collapse."""

    def __init__(self, every: int, *, max_train: int = 5000, max_test: int = 2000, k: int = 20,
                 rank_drop: float = 0.5, min_std: float = 0.05, min_samples: int = 16, batch_size: int = 512) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an int >= 0 (0: off); got {every!r}")
        self.every, self.max_train, self.max_test, self.k = every, max_train, max_test, k
        self.rank_drop, self.min_std, self.min_samples, self.batch_size = rank_drop, min_std, min_samples, batch_size
        self.best_rank = 0.0
        self.last: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"best_rank": self.best_rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_rank = float(state.get("best_rank", 0.0))

    def measure(self, model: Any, train: Any, test: Any, num_classes: int) -> dict[str, float]:
        """The monitor's numbers for ``model`` on a training and a held-out split (see the module docstring)."""
        from batchmates.training.evaluate import extract_features, knn_classify

        te_f, te_y = extract_features(model, _evenly(test, self.max_test), batch_size=self.batch_size)
        out = {"rankme": rankme(te_f), "feat_std": feature_spread(te_f)}
        if num_classes > 0 and bool((te_y >= 0).all()):
            tr_f, tr_y = extract_features(model, _evenly(train, self.max_train), batch_size=self.batch_size)
            keep = tr_y >= 0
            pred = knn_classify(tr_f[keep], tr_y[keep], te_f, k=self.k, num_classes=num_classes)
            out["knn_acc"] = float((pred == te_y).float().mean())
        return out

    def collapse_message(self, stats: dict[str, float], dim: int) -> str | None:
        """Why the embeddings look collapsed (None when they do not); updates the best rank seen."""
        rank, std = stats["rankme"], stats["feat_std"]
        why = []
        if rank < 1.5 or (self.best_rank > 0 and rank < self.rank_drop * self.best_rank):
            why.append(f"RankMe {rank:.2f} of {dim} dimensions (highest so far {max(self.best_rank, rank):.2f})")
        if std < self.min_std:
            why.append(f"normalised feature spread {std:.3f} < {self.min_std}")
        self.best_rank = max(self.best_rank, rank)
        return "; ".join(why) or None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = int(trainer.current_epoch) + 1
        dm = getattr(trainer, "datamodule", None)
        if self.every <= 0 or dm is None or trainer.sanity_checking:
            return
        info = pl_module.info
        if epoch % self.every:  # not measured this epoch: NaN, so that every row of metrics.csv has the columns
            for key in self.last or ("rankme", "feat_std", "knn_acc", "collapse"):
                _log(pl_module, key, math.nan)
            return
        stats = self.measure(pl_module, dm.train_split, dm.splits.test, int(info.num_classes))
        n_held_out = min(len(dm.splits.test), self.max_test)
        msg = (self.collapse_message(stats, int(getattr(pl_module.backbone, "feature_dim", 0)))
               if n_held_out >= self.min_samples else None)
        stats["collapse"] = float(msg is not None)
        if msg and trainer.is_global_zero:
            warnings.warn(f"epoch {epoch}: the embeddings may be collapsing: {msg}. Check the learning rate, "
                          "the augmentation and the method's options (e.g. temperature, epsilon)",
                          RuntimeWarning, stacklevel=2)
        self.last = dict(stats)
        for key, value in stats.items():
            _log(pl_module, key, value)


def _log(pl_module: L.LightningModule, key: str, value: float) -> None:
    pl_module.log(f"monitor/{key}", value, prog_bar=key in ("knn_acc", "rankme"), on_step=False, on_epoch=True,
                  batch_size=1, sync_dist=False)
