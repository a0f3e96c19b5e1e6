"""Per-pair curation of two-view batches (The Bad Batches, Göksu & Pugeault 2024, arXiv:2403.19579).

Paper: random augmentations create unrepresentative positive pairs (false positives/negatives); data is scored
with the Fréchet ResNet Distance and only representative data is trained on. Library choices: scoring *pairs*
(the reviews' reading scores whole batches, see :mod:`batchmates.curation.batch`), the three policies below,
the quantile rule, the ``min_keep`` guard, the reweighting formula and the distributed semantics.

Policies (``Curator(scorer, policy=...)``):

* ``"drop"``: pairs whose score exceeds ``threshold`` (an absolute value) or the batch ``quantile`` are marked
  ``keep=False``; the caller removes them with :func:`apply_curation` before the loss.
* ``"reweight"``: nothing is dropped; each pair gets a weight ``w = N * softmax(-z / temperature)`` over the
  global batch of ``N`` pairs, where ``z`` are the scores standardised over the global batch (``normalize=True``,
  so ``temperature`` is scale-free) or the raw scores. Weights are positive with mean exactly 1 over the global
  batch, so a weighted mean of per-pair losses keeps the scale of the unweighted one.
* ``"resample"``: bad pairs (same rule as ``"drop"``, threshold fixed from the first scoring) get fresh views
  from the caller's ``resample_fn(indices) -> (x1_new, x2_new)`` and are re-scored, up to ``max_resample``
  rounds; pairs still bad afterwards are dropped. The (partly) resampled views come back in
  ``CurationResult.views`` and must be the ones fed to the encoder.

Distributed semantics (library choice, keeps the global-batch loss exact): scores are computed locally; the
scores of all ranks are gathered (no gradient, uneven sizes allowed) and every decision (quantile threshold,
``min_keep``, softmax weights, whether another resampling round is needed) is taken on the global vector, so
every rank applies the same rule as one process holding the whole batch. Dropping is done by the caller by
indexing its features; the losses' gradient-carrying ``batchmates.distributed.gather`` accepts uneven sizes, so
the loss over the kept pairs of the global batch is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from batchmates import distributed as bdist

__all__ = ["Curator", "CurationResult", "apply_curation", "weighted_mean"]

Policy = Literal["drop", "reweight", "resample"]
ResampleFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class CurationResult:
    """What the curator decided for this rank's pairs.

    Attributes:
        keep: bool ``[B]``, False for pairs to leave out of the loss.
        weights: float ``[B]`` per-pair loss weights (``"reweight"``), else None.
        scores: ``[B]`` final scores (after resampling, for ``"resample"``); higher = less representative.
        stats: global statistics of this step (python numbers, identical on every rank).
        views: ``(x1, x2)`` after resampling (``"resample"`` policy), else None.
    """

    keep: torch.Tensor
    weights: torch.Tensor | None
    scores: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)
    views: tuple[torch.Tensor, torch.Tensor] | None = None


class Curator:
    """Scores the pairs of a two-view batch and decides which to train on (see the module docstring).

    Args:
        scorer: an :class:`~batchmates.curation.FRDScorer` (anything with ``score_pairs(x1, x2) -> [B]``), a
            callable ``(x1, x2) -> [B]`` scores, or None when the caller computes the scores itself and passes
            them to :meth:`select_scores` (e.g. from the features of its training forward).
        policy: ``"drop"``, ``"reweight"`` or ``"resample"``.
        threshold: drop/resample pairs with ``score > threshold``.
        quantile: ``q`` in (0, 1]: keep the ``ceil(q * N)`` lowest-scoring pairs of the global batch of ``N``
            pairs (threshold = that order statistic; pairs tied with it are kept), so about ``1 - q`` are dropped.
            Exactly one of ``threshold`` / ``quantile`` is required for ``"drop"`` and ``"resample"``; neither is
            used by ``"reweight"``.
        temperature: softmax temperature of ``"reweight"`` (> 0; larger = flatter weights).
        max_resample: resampling rounds of ``"resample"`` (>= 1).
        min_keep: never keep fewer than ``min(min_keep, N)`` pairs of the global batch: if the rule would drop
            more, the ``min_keep`` lowest-scoring pairs are kept (``stats["min_keep_applied"]`` is then 1). The
            default 2 keeps a contrastive loss defined (it needs one positive and one negative pair).
        normalize: standardise scores over the global batch before the ``"reweight"`` softmax.
        resample_fn: default ``resample_fn`` for :meth:`select`.

    After each :meth:`select`, ``curator.last_stats`` holds the step's statistics (``fraction_dropped``,
    ``mean_score``, ...) and running totals over all steps (``fraction_dropped_total``, ``steps``) for logging.
    """

    def __init__(
        self,
        scorer: Any,
        policy: Policy = "drop",
        *,
        threshold: float | None = None,
        quantile: float | None = None,
        temperature: float = 1.0,
        max_resample: int = 1,
        min_keep: int = 2,
        normalize: bool = True,
        resample_fn: ResampleFn | None = None,
    ) -> None:
        self._score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
        if hasattr(scorer, "score_pairs"):
            self._score = scorer.score_pairs
        elif callable(scorer) or scorer is None:
            self._score = scorer
        else:
            raise TypeError("scorer must have a score_pairs(x1, x2) method (e.g. FRDScorer), be a callable, or be "
                            "None (then pass precomputed scores to select_scores)")
        if policy not in ("drop", "reweight", "resample"):
            raise ValueError(f"policy must be 'drop', 'reweight' or 'resample', got {policy!r}")
        if policy == "reweight":
            if threshold is not None or quantile is not None:
                raise ValueError("policy='reweight' uses temperature, not threshold/quantile; remove them")
        elif (threshold is None) == (quantile is None):
            raise ValueError(f"policy={policy!r} needs exactly one of threshold=... or quantile=...")
        if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        if quantile is not None and not (isinstance(quantile, (int, float)) and 0 < quantile <= 1):
            raise ValueError(f"quantile must be in (0, 1] (fraction of pairs kept), got {quantile!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if not (isinstance(max_resample, int) and max_resample >= 1):
            raise ValueError(f"max_resample must be an int >= 1, got {max_resample!r}")
        if not (isinstance(min_keep, int) and min_keep >= 0):
            raise ValueError(f"min_keep must be an int >= 0, got {min_keep!r}")
        self.scorer = scorer
        self.policy: Policy = policy
        self.threshold = threshold
        self.quantile = quantile
        self.temperature = float(temperature)
        self.max_resample = max_resample
        self.min_keep = min_keep
        self.normalize = normalize
        self.resample_fn = resample_fn
        self.last_stats: dict[str, Any] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        """Forget the running totals (e.g. at the start of an epoch)."""
        self._steps = 0
        self._pairs_total = 0
        self._dropped_total = 0

    # ------------------------------------------------------------------ rules on the global score vector
    def _threshold(self, g: torch.Tensor) -> float:
        if self.threshold is not None:
            return float(self.threshold)
        n = g.numel()
        k = min(n, max(1, math.ceil(self.quantile * n - 1e-9)))
        return float(torch.sort(g).values[k - 1])

    def _apply_min_keep(self, g: torch.Tensor, bad: torch.Tensor) -> tuple[torch.Tensor, bool]:
        need = min(self.min_keep, g.numel())
        if int((~bad).sum()) >= need:
            return bad, False
        bad = torch.ones_like(bad)
        bad[torch.sort(g, stable=True).indices[:need]] = False
        return bad, True

    def _local_scores(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        if self._score is None:
            raise ValueError("this Curator has no scorer (scorer=None): pass the scores to select_scores(scores)")
        return self._check_scores(self._score(x1, x2), x1.shape[0])

    @staticmethod
    def _check_scores(s: object, n: int) -> torch.Tensor:
        if not isinstance(s, torch.Tensor) or s.shape != (n,):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"the scorer must return one score per pair, shape [{n}], got {got}")
        s = s.detach()
        if not bool(torch.isfinite(s).all()):
            raise ValueError("the scorer returned NaN/Inf scores; check the inputs and the extractor")
        return s

    # ------------------------------------------------------------------ main entry
    @torch.no_grad()
    def select_scores(self, scores: torch.Tensor) -> CurationResult:
        """Apply the ``"drop"`` or ``"reweight"`` policy to this rank's precomputed per-pair ``scores [B]``.

        For callers that score the features their training forward already computed (no extra forward). Must be
        called on every rank. ``"resample"`` needs the views: use :meth:`select`.
        """
        if self.policy == "resample":
            raise ValueError("policy='resample' needs the views and a resample_fn: call select(x1, x2, ...) instead "
                             "of select_scores")
        if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"scores must be a 1-D tensor [B] with one score per pair of this rank, got {got}")
        scores = self._check_scores(scores, scores.shape[0])
        return self._decide(scores, None, None, None)

    @torch.no_grad()
    def select(self, x1: torch.Tensor, x2: torch.Tensor, *, resample_fn: ResampleFn | None = None) -> CurationResult:
        """Score this rank's pairs ``(x1[i], x2[i])`` and apply the policy over the global batch.

        Must be called on every rank (it gathers the scores). ``resample_fn(indices)`` (``"resample"`` only)
        receives a long tensor of this rank's bad pair indices and returns fresh views ``(x1_new, x2_new)`` of
        exactly those samples, shaped like ``x1[indices]`` / ``x2[indices]``.
        """
        for name, x in (("x1", x1), ("x2", x2)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor batch, got {type(x).__name__}")
        if x1.dim() < 1 or x1.shape[0] != x2.shape[0]:
            raise ValueError(
                f"x1 and x2 must be the two views of the same samples (same batch size), got shapes "
                f"{tuple(x1.shape)} and {tuple(x2.shape)}"
            )
        resample_fn = resample_fn if resample_fn is not None else self.resample_fn
        if self.policy == "resample" and resample_fn is None:
            raise ValueError("policy='resample' needs resample_fn=... (in Curator(...) or select(...))")
        return self._decide(self._local_scores(x1, x2), x1, x2, resample_fn)

    def _decide(
        self, scores: torch.Tensor, x1: torch.Tensor | None, x2: torch.Tensor | None, resample_fn: ResampleFn | None
    ) -> CurationResult:
        n_local = scores.shape[0]
        g = bdist.gather(scores.to(torch.float64))
        sl = bdist.local_slice(n_local)
        n = g.numel()
        stats: dict[str, Any] = {"num_pairs": n, "mean_score_before": float(g.mean()) if n else float("nan")}
        weights = None
        views = None
        min_keep_applied = False
        thr: float | None = None

        if self.policy == "reweight":
            z = g
            if self.normalize and n > 1:
                z = (g - g.mean()) / g.std(unbiased=False).clamp_min(1e-12)
            w = torch.softmax(-z / self.temperature, dim=0) * n
            weights = w[sl].to(torch.float32)
            bad = torch.zeros(n, dtype=torch.bool, device=g.device)
            stats.update(weight_min=float(w.min()), weight_max=float(w.max()))
        else:
            thr = self._threshold(g)
            bad = g > thr
            if self.policy == "resample":
                rounds, resampled = 0, 0
                while rounds < self.max_resample and bool(bad.any()):
                    idx = bad[sl].nonzero().flatten()
                    if idx.numel():
                        new1, new2 = resample_fn(idx)
                        if views is None:
                            x1, x2 = x1.clone(), x2.clone()
                            views = (x1, x2)
                        for name, old, new in (("x1", x1, new1), ("x2", x2, new2)):
                            if not isinstance(new, torch.Tensor) or new.shape != old[idx].shape:
                                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                                raise ValueError(
                                    f"resample_fn must return fresh {name} views shaped {tuple(old[idx].shape)} "
                                    f"for the {idx.numel()} requested pairs, got {got}"
                                )
                        x1[idx] = new1.to(x1.dtype)
                        x2[idx] = new2.to(x2.dtype)
                        scores = scores.clone()
                        scores[idx] = self._local_scores(new1, new2).to(scores.dtype)
                    resampled += int(bad.sum())
                    g = bdist.gather(scores.to(torch.float64))
                    bad = g > thr
                    rounds += 1
                if views is None:
                    views = (x1, x2)
                stats.update(resampled=resampled, resample_rounds=rounds)
            bad, min_keep_applied = self._apply_min_keep(g, bad)
            stats["threshold"] = thr

        keep = ~bad[sl]
        n_drop = int(bad.sum())
        stats.update(
            num_dropped=n_drop,
            fraction_dropped=n_drop / n if n else 0.0,
            mean_score=float(g.mean()) if n else float("nan"),
            max_score=float(g.max()) if n else float("nan"),
            mean_score_kept=float(g[~bad].mean()) if n - n_drop else float("nan"),
            min_keep_applied=int(min_keep_applied),
        )
        self._steps += 1
        self._pairs_total += n
        self._dropped_total += n_drop
        stats.update(
            steps=self._steps,
            fraction_dropped_total=self._dropped_total / self._pairs_total if self._pairs_total else 0.0,
        )
        self.last_stats = stats
        return CurationResult(keep=keep, weights=weights, scores=scores, stats=stats, views=views)


def apply_curation(
    z1: torch.Tensor, z2: torch.Tensor, result: CurationResult
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keep only the selected pairs of this rank's features: ``(z1[keep], z2[keep], weights[keep] or None)``.

    Indexing keeps the autograd graph, so dropped pairs simply contribute no term (and zero gradient) to the
    loss; under DDP ranks may end up with different counts, which ``batchmates.distributed.gather`` supports.
    """
    if not isinstance(result, CurationResult):
        raise TypeError(f"result must be a CurationResult from Curator.select, got {type(result).__name__}")
    keep = result.keep
    for name, z in (("z1", z1), ("z2", z2)):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() < 1 or z.shape[0] != keep.numel():
            raise ValueError(
                f"{name} has {z.shape[0] if z.dim() else 0} rows but the curation result covers {keep.numel()} "
                "pairs; pass this rank's features of the batch given to Curator.select"
            )
    keep = keep.to(z1.device)
    weights = None if result.weights is None else result.weights.to(z1.device)[keep]
    return z1[keep], z2[keep.to(z2.device)], weights


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Global (weighted) mean of per-pair losses, exact under ``torch.distributed`` (library helper).

    Args:
        losses: this rank's per-pair losses ``[..., n]`` with the pairs on the last dimension, e.g. the
            ``[V, N_local]`` per-anchor output of ``SupConLoss(reduction="none")`` on the kept pairs.
        weights: ``[n]`` per-pair weights (the third output of :func:`apply_curation`), or None for a plain
            mean.

    Returns ``Σ w_i l_i / Σ w_i`` over every element of the global batch (each pair's weight repeated over the
    leading dimensions); numerator and denominator are summed over ranks with the gradient-exact
    :func:`batchmates.distributed.all_reduce_sum`, so every rank returns the same value and DDP-averaged
    gradients are exact. With the curator's mean-1 weights this is the mean of ``w * l``.
    """
    if not isinstance(losses, torch.Tensor) or losses.dim() < 1:
        raise ValueError("losses must be a tensor [..., n] of per-pair losses (pairs on the last dimension)")
    n = losses.shape[-1]
    if weights is None:
        w = losses.new_ones(n)
    else:
        if not isinstance(weights, torch.Tensor) or weights.shape != (n,):
            got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise ValueError(f"weights must have shape [{n}] (one per pair on the last dim of losses), got {got}")
        w = weights.detach().to(device=losses.device, dtype=losses.dtype)
    w = w.expand_as(losses)
    num = bdist.all_reduce_sum((losses * w).sum())
    den = bdist.all_reduce_sum(w.sum())
    if float(den) <= 0:
        raise ValueError("the global sum of the weights is 0 (no pair kept on any rank?); nothing to average")
    return num / den
