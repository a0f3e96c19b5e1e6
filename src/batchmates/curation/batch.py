"""Batch-level curation: one Gaussian FRD per two-view batch, then keep, re-augment or skip the batch.

Paper (The Bad Batches, Göksu & Pugeault 2024, arXiv:2403.19579; only the abstract and secondary reviews could be
read): the backbone and the projection head map each augmented image to a latent space; the Gaussian Fréchet
distance ``‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})`` between the two augmented batches' feature distributions
scores the batch, and a threshold τ_FRD separates good batches from bad ones. The value of τ_FRD and what is
done with a bad batch were not recoverable.

Library choices:

* Score: the sum, over the scored feature spaces (e.g. backbone and projector outputs), of the Gaussian FRD
  between the two views' features of the *global* batch (:func:`batch_frd`, float64, ``eps * I`` added to both
  covariances when the batch is not larger than the dimension). Summing per-space distances is the FRD of the
  concatenated features with the cross-space covariances left out.
* Threshold: absolute (``threshold``: batches scoring above it are bad, from the first batch on) or a running
  quantile (``quantile=q``: a batch is bad when its score is above the ``ceil(q * n)``-th smallest of the last
  ``window`` first-draw batch scores; during the first ``warmup`` batches every batch is kept and only
  recorded). Only a batch's first draw is recorded, so the window estimates the distribution of random
  augmentations and about ``1 - q`` of the batches are bad.
* Policy: ``"skip"`` (a bad batch is not trained on) or ``"reaugment"`` (its views are drawn again, up to
  ``max_resample`` times, each new draw compared with the threshold fixed at the batch's first draw; still bad
  after that, it is skipped). What a skipped step means for the optimiser is the caller's business
  (:mod:`batchmates.methods.curation` documents the training-loop side).

Two parts, kept apart as in :mod:`batchmates.curation.curator`: :func:`global_batch_frd` is the only code that
talks to ``torch.distributed`` (it gathers every rank's features without gradient and makes rank 0's value
everyone's, so every rank takes the same decision); :class:`BatchCurator` is the plain decision and its state
(``state_dict`` / ``load_state_dict``, saved in checkpoints so a resumed run decides exactly as an uninterrupted
one).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import torch

from batchmates import distributed as bdist
from batchmates.curation.frechet import gaussian_frechet_distance

__all__ = ["BatchCurator", "batch_frd", "global_batch_frd"]

BatchPolicy = Literal["skip", "reaugment"]
Decision = Literal["accept", "retry", "skip"]
Spaces = Sequence[tuple[torch.Tensor, torch.Tensor]]


def _check_spaces(spaces: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if not isinstance(spaces, (list, tuple)) or not spaces:
        raise ValueError("spaces must be a non-empty list of (features_view1, features_view2) pairs, one per space")
    out = []
    for i, pair in enumerate(spaces):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ValueError(f"spaces[{i}] must be a (features_view1, features_view2) pair, got {type(pair).__name__}")
        f1, f2 = pair
        for name, f in (("features_view1", f1), ("features_view2", f2)):
            if not isinstance(f, torch.Tensor):
                raise TypeError(f"spaces[{i}] {name} must be a torch.Tensor [B, D], got {type(f).__name__}")
        if f1.shape[0] != f2.shape[0]:
            raise ValueError(f"spaces[{i}]: the two views must hold the same samples, got {f1.shape[0]} and "
                             f"{f2.shape[0]} rows")
        out.append((f1.detach().flatten(1), f2.detach().flatten(1)))
    return out


def batch_frd(spaces: Spaces, *, eps: float = 1e-6) -> torch.Tensor:
    """Sum over ``spaces`` of :func:`gaussian_frechet_distance` between the two views' features (local maths).

    Args:
        spaces: ``[(f1, f2), ...]``, one pair per feature space, ``f1`` / ``f2`` of shape ``[B, D_s]`` (the two
            views of the same ``B`` samples; ``B >= 2``).
        eps: the regularisation of :func:`gaussian_frechet_distance`.

    Returns a float64 scalar (no gradient).
    """
    pairs = _check_spaces(spaces)
    return torch.stack([gaussian_frechet_distance(f1, f2, eps=eps) for f1, f2 in pairs]).sum()


def global_batch_frd(spaces: Spaces, *, eps: float = 1e-6) -> float:
    """:func:`batch_frd` of the *global* batch, identical on every rank.

    Under ``torch.distributed`` every rank's features of each space are gathered (no gradient; ranks may hold
    different counts), every rank evaluates :func:`batch_frd` on the same global features, and rank 0's value is
    returned everywhere (an all-reduce of rank 0's value with zeros), so a decision taken on it can never differ
    between ranks by round-off. In one process it is :func:`batch_frd`. Must be called on every rank.
    """
    pairs = _check_spaces(spaces)
    gathered = [(bdist.gather(f1), bdist.gather(f2)) for f1, f2 in pairs]
    score = batch_frd(gathered, eps=eps)
    if bdist.is_distributed():
        score = bdist.all_reduce_sum(score if bdist.rank() == 0 else torch.zeros_like(score))
    return float(score)


class BatchCurator:
    """Decides, from a batch's score, whether to train on it, draw its views again, or skip it.

    Args:
        policy: ``"skip"`` or ``"reaugment"`` (see the module docstring).
        threshold: absolute τ: a batch scoring above it is bad.
        quantile: ``q`` in (0, 1]: a batch is bad when it scores above the ``ceil(q * n)``-th smallest of the last
            ``n <= window`` recorded batch scores. Exactly one of ``threshold`` / ``quantile``.
        window: how many past first-draw scores the running quantile uses (>= 1). Short by default: scores of an
            encoder that is being trained drift (the online SimCLR batch FRD fell about 10x over 4 digits epochs),
            and a long window would then compare new batches with stale scores and skip almost none.
        warmup: with ``quantile``, batches kept unconditionally (their scores recorded) before the rule applies
            (>= 1, at most ``window``).
        max_resample: ``"reaugment"``: new draws of a bad batch's views before it is skipped (>= 1).

    Call :meth:`decide` once per draw of a batch (``attempt=0`` for the first). ``last_stats`` holds the
    decision of the latest batch; the totals are part of :meth:`state_dict`.
    """

    def __init__(
        self,
        policy: BatchPolicy = "skip",
        *,
        threshold: float | None = None,
        quantile: float | None = None,
        window: int = 32,
        warmup: int = 8,
        max_resample: int = 1,
    ) -> None:
        if policy not in ("skip", "reaugment"):
            raise ValueError(f"policy must be 'skip' or 'reaugment' (what to do with a bad batch), got {policy!r}")
        if (threshold is None) == (quantile is None):
            raise ValueError("BatchCurator needs exactly one of threshold=... (absolute τ) or quantile=... (running "
                             "quantile of past batch scores)")
        if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        if quantile is not None and not (isinstance(quantile, (int, float)) and 0 < quantile <= 1):
            raise ValueError(f"quantile must be in (0, 1] (fraction of batches kept), got {quantile!r}")
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"window must be an int >= 1 (past batch scores kept), got {window!r}")
        if not (isinstance(warmup, int) and 1 <= warmup <= window):
            raise ValueError(f"warmup must be an int in [1, window={window}] (batches recorded before the quantile "
                             f"rule applies), got {warmup!r}")
        if not (isinstance(max_resample, int) and max_resample >= 1):
            raise ValueError(f"max_resample must be an int >= 1 (new draws of a bad batch), got {max_resample!r}")
        self.policy: BatchPolicy = policy
        self.threshold = None if threshold is None else float(threshold)
        self.quantile = None if quantile is None else float(quantile)
        self.window = window
        self.warmup = warmup
        self.max_resample = max_resample
        self._scores: deque[float] = deque(maxlen=window)
        self._batch_threshold: float | None = None
        self.batches = 0
        self.skipped = 0
        self.redraws = 0
        self.last_stats: dict[str, Any] = {}

    def current_threshold(self) -> float | None:
        """The threshold a new batch would be compared with (None: keep it, the quantile warm-up is running)."""
        if self.threshold is not None:
            return self.threshold
        n = len(self._scores)
        if n < self.warmup:
            return None
        k = min(n, max(1, math.ceil(self.quantile * n - 1e-9)))
        return sorted(self._scores)[k - 1]

    def decide(self, score: float, *, attempt: int = 0) -> Decision:
        """``"accept"``, ``"retry"`` (draw the views again) or ``"skip"`` for draw ``attempt`` of the batch.

        ``attempt=0`` starts a new batch: it fixes the batch's threshold from the past scores, then records
        ``score``. Later attempts are compared with that same threshold and not recorded.
        """
        score = float(score)
        if not math.isfinite(score):
            raise ValueError(f"the batch score is {score}; check the features (NaN/Inf) and the extractor")
        if not (isinstance(attempt, int) and 0 <= attempt <= (self.max_resample if self.policy == "reaugment" else 0)):
            raise ValueError(f"attempt must be 0 (first draw) or, for policy='reaugment', at most "
                             f"max_resample={self.max_resample}; got {attempt!r}")
        if attempt == 0:
            self._batch_threshold = self.current_threshold()
            self._scores.append(score)
            self.batches += 1
            self.last_stats = {"score": score, "first_score": score}
        thr = self._batch_threshold
        if thr is None or score <= thr:
            decision: Decision = "accept"
        elif self.policy == "reaugment" and attempt < self.max_resample:
            decision = "retry"
            self.redraws += 1
        else:
            decision = "skip"
            self.skipped += 1
        self.last_stats.update(score=score, threshold=thr, decision=decision, draws=attempt + 1,
                               skipped=int(decision == "skip"), fraction_skipped_total=self.skipped / self.batches)
        return decision

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to decide as the uninterrupted one (plain Python values)."""
        return {"scores": list(self._scores), "batches": self.batches, "skipped": self.skipped,
                "redraws": self.redraws, "window": self.window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "scores" not in state:
            raise ValueError("state must be a dict from BatchCurator.state_dict() (it has no 'scores')")
        scores = [float(s) for s in state["scores"]]
        self._scores = deque(scores[-self.window :], maxlen=self.window)
        self.batches = int(state.get("batches", len(scores)))
        self.skipped = int(state.get("skipped", 0))
        self.redraws = int(state.get("redraws", 0))

    def __repr__(self) -> str:
        rule = f"threshold={self.threshold}" if self.threshold is not None else (
            f"quantile={self.quantile}, window={self.window}, warmup={self.warmup}")
        return f"BatchCurator(policy={self.policy!r}, {rule}, max_resample={self.max_resample})"
