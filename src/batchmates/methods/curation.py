"""Representative batch curation for two-view pretraining methods (The Bad Batches, Göksu & Pugeault 2024,
arXiv:2403.19579), shared by ``simclr``, ``supcon`` and ``barlow``.

This module wires :mod:`batchmates.curation` into a :class:`~batchmates.methods.base.Method` through
:class:`CurationMixin` and the :data:`CURATION_OPTIONS` a method adds to its ``options``
(``--curate frd-batch --opt curate_policy=reaugment``; ``--curate X`` is ``--opt curate=X``).

Paper (abstract and secondary reviews only; see ``docs/curation.md``): augmented views are scored with the
Fréchet ResNet Distance (FRD) and only representative data is trained on; the reviews describe one Gaussian FRD
between the two augmented batches' feature distributions (backbone and projection head) against a threshold
τ_FRD. Not recovered: the value of τ_FRD and the role of the paper's Huber loss.

Library choices:

* ``curate``: ``"frd-batch"`` (the reviews' reading: one Gaussian FRD per global batch, policies ``skip`` /
  ``reaugment``), ``"frd-pairwise"`` (per pair: the discrete Fréchet distance, FRD's original definition) or
  ``"pair-sq-l2"`` (per pair: squared L2 distance, not FRD); per-pair kinds use the policies ``drop`` /
  ``reweight`` / ``resample`` of :class:`~batchmates.curation.Curator`. ``"frd-gaussian"`` (the old name of the
  per-pair squared L2 distance) is refused with a message naming both replacements: mapping it silently to
  either would change what an old config does.
* ``curate_extractor="online"`` (default) scores the features the training forward already computes (backbone
  and/or projector outputs of both views, detached; ``curate_features``): no extra forward, so BatchNorm is in
  training mode (batch statistics) as in the step itself. Exception: ``resample`` needs scores of fresh views
  before the training forward, so it runs the backbone once more, under ``no_grad`` and in eval mode.
  ``resnet18:PATH`` / ``resnet50:PATH`` (torchvision weights file; FRD's original extractor; views un-normalised,
  grey repeated to 3 channels, resized to ``curate_image_size``, ImageNet-normalised) and ``run:DIR`` (the
  frozen ``embed`` features of a finished batchmates run) need their own forward of both views: they cost more.
* What "skip" means under Lightning's automatic optimisation (and DDP, where ``training_step`` must not return
  None): every rank takes the same decision (the score is global); the step returns a zero loss connected to
  every trainable parameter (DDP's gradient all-reduce completes as usual), and :meth:`CurationMixin.
  on_before_optimizer_step` then sets every gradient to None, so ``optimizer.step()`` leaves the weights *and*
  the optimiser state (momentum, Adam moments and step counts) unchanged. BatchNorm running statistics updated
  by a rejected forward are restored from a copy taken before it. The LR schedule and ``global_step`` advance
  by one (the skipped batch keeps its place in the schedule, which is a function of the batch position, so
  the run length and exact resume are unchanged). With ``16-mixed`` the GradScaler records a normal step.
* ``reaugment`` draws new views of the same images from the step's random stream (so it is reproducible and
  resumes exactly) and runs the training forward again; a rejected forward's BatchNorm updates are undone.
* The :class:`~batchmates.curation.BatchCurator` state (the running-quantile window and totals) is saved in the
  checkpoint under ``"batchmates_curation"`` and restored on resume.
* ``drop`` keeps every pair in the encoder forward (BatchNorm sees the whole batch); the dropped pairs are
  removed from the projector outputs before the loss, which is then the exact loss of the kept pairs of the
  global batch. ``reweight`` averages per-anchor losses with mean-1 weights; Barlow Twins has no per-pair terms
  and refuses it.
* Logged per epoch: ``frac_dropped`` (pairs not trained on; for ``frd-batch`` the fraction of skipped batches),
  ``curate_score`` (mean pair score, or the batch FRD of the first draw), ``curate_draws`` and
  ``curate_threshold`` (``frd-batch``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from batchmates.config import ConfigError, Option
from batchmates.curation import BatchCurator, CurationResult, Curator, FRDScorer, global_batch_frd, pair_distance

__all__ = ["CURATION_OPTIONS", "CurationMixin", "CuratedViews", "build_scorer", "IMAGENET_MEAN", "IMAGENET_STD"]

CURATE_CHOICES = ("none", "frd-batch", "frd-pairwise", "pair-sq-l2")
PAIR_POLICIES = ("drop", "reweight", "resample")
BATCH_POLICIES = ("skip", "reaugment")
POLICY_CHOICES = ("auto", *PAIR_POLICIES, *BATCH_POLICIES)
FEATURE_CHOICES = ("both", "backbone", "projector")
_PAIR_MODE = {"frd-pairwise": "pairwise", "pair-sq-l2": "sq-l2", "frd-batch": "gaussian"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RENAMED_FRD_GAUSSIAN = (
    "option curate='frd-gaussian' no longer exists: it scored each pair by the squared L2 distance of its two "
    "views' features, which is not the Gaussian FRD. Use curate=pair-sq-l2 for that per-pair score (policies "
    "drop, reweight, resample), or curate=frd-batch for the Gaussian FRD between the two views' feature "
    "distributions of the whole batch (the reviews' reading of the paper; policies skip, reaugment)"
)


CURATION_OPTIONS: dict[str, Option] = {
    "curate": Option(str, "none", "batch curation (The Bad Batches, arXiv:2403.19579): frd-batch = one "
                     "Gaussian FRD per batch; frd-pairwise / pair-sq-l2 = per-pair discrete Fréchet / "
                     "squared L2 distance", choices=CURATE_CHOICES,
                     retired=(("frd-gaussian", RENAMED_FRD_GAUSSIAN),)),
    "curate_policy": Option(str, "auto", "auto = drop (per-pair kinds) or skip (frd-batch); per-pair kinds: drop, "
                                         "reweight, resample; frd-batch: skip, reaugment", choices=POLICY_CHOICES),
    "curate_quantile": Option(float, 0.75, "keep this fraction: the lowest-scoring pairs of the global batch "
                                           "(per-pair kinds), or batches scoring at most this quantile of the last "
                                           "curate_window batch scores (frd-batch); ignored when "
                                           "curate_threshold > 0", minimum=1e-6, maximum=1.0),
    "curate_threshold": Option(float, 0.0, "absolute score threshold (pairs or batches above it are bad); 0 = use "
                                           "curate_quantile", minimum=0.0),
    "curate_window": Option(int, 32, "frd-batch: past batch scores in the running quantile (short: the online "
                                     "encoder's scores drift down as it trains)", minimum=1),
    "curate_warmup": Option(int, 8, "frd-batch with curate_quantile: first batches kept unconditionally (scores "
                                    "recorded) before the quantile rule applies (capped at curate_window)",
                             minimum=1),
    "curate_features": Option(str, "both", "online extractor: features of the training forward that are scored "
                                           "(both = sum of the backbone and projector scores)",
                              choices=FEATURE_CHOICES),
    "curate_extractor": Option(str, "online", "feature extractor: online (the training forward's own features), "
                                              "resnet18:PATH, resnet50:PATH (torchvision weights file), run:DIR"),
    "curate_temperature": Option(float, 1.0, "reweight: softmax temperature on standardised scores", minimum=1e-6),
    "curate_max_resample": Option(int, 1, "resample / reaugment: rounds of fresh views for bad pairs / a bad batch",
                                  minimum=1),
    "curate_min_keep": Option(int, 2, "per-pair kinds: never keep fewer pairs than this in the global batch",
                              minimum=0),
    "curate_image_size": Option(int, 224, "resnet18/resnet50 extractors: resize views to this side (0 = keep)",
                                minimum=0),
}


class _ImageNetPreprocess(nn.Module):
    """Dataset-normalised views -> ImageNet-normalised 3-channel images of side ``size`` (0 = unchanged)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.register_buffer("in_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("in_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device
        x = x.float() * self.std.to(dev) + self.mean.to(dev)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.size and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - self.in_mean.to(dev)) / self.in_std.to(dev)


class _RunEmbedder(nn.Module):
    """A finished batchmates run as a frozen extractor: ``x -> run.embed(x)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


def build_scorer(spec: str, curate: str, method: Any) -> FRDScorer:
    """The :class:`FRDScorer` for ``curate_extractor=spec`` and ``curate=curate`` (forms: module docstring).

    ``"online"`` gives the separate-forward scorer on the method's backbone (used by ``resample`` only; the other
    policies score the training forward's features).
    """
    mode = _PAIR_MODE[curate]
    if spec == "online":
        return FRDScorer.from_online_encoder(method.backbone, mode=mode)
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise ConfigError(f"option curate_extractor={spec!r}: use 'online', 'resnet18:PATH', 'resnet50:PATH' or "
                          "'run:DIR'")
    info = method.info
    if kind in ("resnet18", "resnet50"):
        pre = _ImageNetPreprocess(info.mean, info.std, int(method.opts["curate_image_size"]))
        try:
            return FRDScorer.from_torchvision_resnet(arg, kind, mode=mode, preprocess=pre)
        except FileNotFoundError as e:
            raise ConfigError(f"option curate_extractor={spec!r}: {e}") from None
    if kind == "run":
        from batchmates.config import RunError
        from batchmates.methods.base import Method

        if not os.path.isdir(arg):
            raise ConfigError(f"option curate_extractor={spec!r}: {arg!r} is not a directory written by "
                              "`batchmates train`")
        try:
            model = Method.from_checkpoint(arg)  # the config and dataset facts are in the checkpoint
        except RunError as e:
            raise ConfigError(f"option curate_extractor={spec!r}: {e}") from None
        if (model.info.in_channels, model.info.image_size) != (info.in_channels, info.image_size):
            raise ConfigError(
                f"option curate_extractor={spec!r}: that run was trained on {model.info.name!r} "
                f"({model.info.in_channels}x{model.info.image_size}px) but this run's images are "
                f"{info.in_channels}x{info.image_size}px; use a run on the same dataset"
            )
        return FRDScorer(_RunEmbedder(model), mode=mode)
    raise ConfigError(f"option curate_extractor={spec!r}: unknown extractor {kind!r}; use 'online', "
                      "'resnet18:PATH', 'resnet50:PATH' or 'run:DIR'")


def _resolve_policy(kind: str, policy: str, name: str) -> str:
    allowed = BATCH_POLICIES if kind == "frd-batch" else PAIR_POLICIES
    if policy == "auto":
        return allowed[0]
    if policy not in allowed:
        what = "scores whole batches" if kind == "frd-batch" else "scores pairs"
        raise ConfigError(f"option curate_policy={policy!r} does not apply to curate={kind!r} (method {name!r}), "
                          f"which {what}: use one of {list(allowed)}")
    return policy


@dataclass
class CuratedViews:
    """One curated training forward: the projector outputs to train on, or ``skip``.

    Attributes:
        z1, z2: projector outputs ``[B, D]`` of the two views trained on (with gradient); None when skipped.
        result: the per-pair decision (per-pair kinds), else None.
        skip: True when a batch-level policy rejected the batch: train on nothing this step.
        log: per-step statistics to log.
    """

    z1: torch.Tensor | None
    z2: torch.Tensor | None
    result: CurationResult | None = None
    skip: bool = False
    log: dict[str, float] = field(default_factory=dict)


class CurationMixin:
    """Adds batch curation to a two-view :class:`~batchmates.methods.base.Method`.

    Use: put :data:`CURATION_OPTIONS` in the method's ``options``; implement ``encode_views(v1, v2) -> (h1, h2,
    z1, z2)`` (backbone and projector outputs of both views, with gradient: the method's training forward); call
    :meth:`setup_curation` at the end of ``__init__``; in ``compute_loss`` call :meth:`curated_forward` on the
    uint8 batch and, when it says ``skip``, return :meth:`curation_skip_loss`; log with :meth:`log_curated`.
    ``reweight_supported = False`` makes ``curate_policy=reweight`` a ``ConfigError``.
    """

    reweight_supported: ClassVar[bool] = True
    curator: Curator | None
    batch_curator: BatchCurator | None
    curation_scorer: FRDScorer | None

    @classmethod
    def curation_policy(cls, opts: dict[str, Any]) -> str:
        """The policy the parsed options ask for (``auto`` resolved); ``ConfigError`` when it does not apply."""
        name = cls.name  # type: ignore[attr-defined]
        policy = _resolve_policy(str(opts["curate"]), str(opts["curate_policy"]), name)
        if policy == "reweight" and not cls.reweight_supported:
            raise ConfigError(
                f"option curate_policy='reweight' is not defined for method {name!r}: its loss has no per-pair "
                "terms to weight; use curate_policy=drop or curate_policy=resample"
            )
        return policy

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Curation options are checked with the rest of the config, before any data is loaded."""
        super().check_config(cfg)  # type: ignore[misc]
        if cfg.options.get("curate", "none") != "none":
            cls.curation_policy(cfg.options)

    def setup_curation(self) -> None:
        opts: dict[str, Any] = self.opts  # type: ignore[attr-defined]
        self.curator, self.batch_curator, self.curation_scorer = None, None, None
        self._curation_skip = False
        kind = str(opts["curate"])
        if kind == "none":
            return
        name = type(self).name  # type: ignore[attr-defined]
        policy = self.curation_policy(opts)
        spec = str(opts["curate_extractor"])
        rule: dict[str, Any] = ({"threshold": float(opts["curate_threshold"])} if opts["curate_threshold"] > 0
                                else {"quantile": float(opts["curate_quantile"])})
        try:
            if kind == "frd-batch":
                warmup = min(int(opts["curate_warmup"]), int(opts["curate_window"]))
                self.batch_curator = BatchCurator(policy, **rule, window=int(opts["curate_window"]), warmup=warmup,
                                                  max_resample=int(opts["curate_max_resample"]))
                if spec != "online":
                    self.curation_scorer = build_scorer(spec, kind, self)
                return
            if spec != "online" or policy == "resample":
                self.curation_scorer = build_scorer(spec, kind, self)
            kwargs: dict[str, Any] = dict(min_keep=int(opts["curate_min_keep"]))
            if policy == "reweight":
                kwargs["temperature"] = float(opts["curate_temperature"])
            else:
                kwargs.update(rule)
            if policy == "resample":
                kwargs["max_resample"] = int(opts["curate_max_resample"])
            self.curator = Curator(self.curation_scorer, policy, **kwargs)
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"curation options of method {name!r}: {e}") from None

    @property
    def curating(self) -> bool:
        return self.curator is not None or self.batch_curator is not None

    # ------------------------------------------------------------------ scoring the training forward
    def encode_views(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, ...]:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement encode_views(v1, v2) -> (h1, h2, z1, z2)")

    def scored_spaces(self, h1: torch.Tensor, h2: torch.Tensor, z1: torch.Tensor,
                      z2: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The detached feature pairs scored by the online extractor (``curate_features``)."""
        which = self.opts["curate_features"]  # type: ignore[attr-defined]
        spaces = []
        if which in ("both", "backbone"):
            spaces.append((h1.detach(), h2.detach()))
        if which in ("both", "projector"):
            spaces.append((z1.detach(), z2.detach()))
        return spaces

    def online_pair_scores(self, spaces: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Per-pair scores ``[B]`` of the training forward's features: the sum over the scored spaces."""
        mode = _PAIR_MODE[self.opts["curate"]]  # type: ignore[attr-defined]
        return torch.stack([pair_distance(mode, f1, f2).to(torch.float64) for f1, f2 in spaces]).sum(0)

    def batch_score(self, spaces: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """The ``frd-batch`` score of this step: the Gaussian FRD of the global batch, summed over the spaces."""
        return global_batch_frd(spaces)

    def _encode(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        h1, h2, z1, z2 = self.encode_views(v1, v2)
        return z1, z2, self.scored_spaces(h1, h2, z1, z2)

    # ------------------------------------------------------------------ the curated step
    def curated_forward(self, x: torch.Tensor) -> CuratedViews:
        """Two augmented views of the uint8 batch ``x``, curated, through the training forward."""
        self._curation_skip = False
        v1, v2 = self.train_views(x)  # type: ignore[attr-defined]
        if self.batch_curator is not None:
            return self._batch_curated_forward(x, v1, v2)
        if self.curator is not None and self.curation_scorer is None:  # online drop / reweight: no extra forward
            z1, z2, spaces = self._encode(v1, v2)
            result = self.curator.select_scores(self.online_pair_scores(spaces))
            return CuratedViews(z1, z2, result, log=self.curation_log(result))
        v1, v2, result = self.curate_views(x, v1, v2)  # frozen extractor or resample: scored before the forward
        _, _, z1, z2 = self.encode_views(v1, v2)
        return CuratedViews(z1, z2, result, log=self.curation_log(result))

    def _batch_curated_forward(self, x: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor) -> CuratedViews:
        bc = self.batch_curator
        assert bc is not None
        online = self.curation_scorer is None
        saved = [(b, b.detach().clone()) for b in self.buffers()] if online else []  # type: ignore[attr-defined]
        attempt = 0
        while True:
            if online:
                z1, z2, spaces = self._encode(v1, v2)
            else:
                spaces = [(self.curation_scorer.features(v1), self.curation_scorer.features(v2))]
            decision = bc.decide(self.batch_score(spaces), attempt=attempt)
            if decision == "accept":
                break
            with torch.no_grad():  # a rejected forward leaves no trace in BatchNorm running statistics
                for b, copy in saved:
                    b.copy_(copy)
            if decision == "skip":
                self._curation_skip = True
                return CuratedViews(None, None, skip=True, log=self._batch_log())
            z1 = z2 = spaces = None  # free the rejected forward's graph before the next one (peak memory)
            v1, v2 = self.train_views(x)  # type: ignore[attr-defined]
            attempt += 1
        if not online:
            _, _, z1, z2 = self.encode_views(v1, v2)
        return CuratedViews(z1, z2, log=self._batch_log())

    def _batch_log(self) -> dict[str, float]:
        st = self.batch_curator.last_stats  # type: ignore[union-attr]
        out = {"frac_dropped": float(st["skipped"]), "curate_score": float(st["first_score"]),
               "curate_draws": float(st["draws"])}
        if st["threshold"] is not None:
            out["curate_threshold"] = float(st["threshold"])
        return out

    def curate_views(
        self, x: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, CurationResult | None]:
        """Per-pair policy scored on the views before the training forward (frozen extractor, or ``resample``).

        Returns the views to encode (fresh ones for resampled pairs) and the curation result (None when
        per-pair curation is off).
        """
        if self.curator is None:
            return v1, v2, None

        def resample(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.train_views(x[idx.to(x.device)])  # type: ignore[attr-defined]

        result = self.curator.select(v1, v2, resample_fn=resample if self.curator.policy == "resample" else None)
        if result.views is not None:
            v1, v2 = result.views
        return v1, v2, result

    @staticmethod
    def curation_log(result: CurationResult | None) -> dict[str, float]:
        """Per-step statistics to log (``frac_dropped``, ``curate_score``); empty when curation is off."""
        if result is None:
            return {}
        stats = result.stats
        out = {"frac_dropped": float(stats.get("fraction_dropped", 0.0))}
        if "mean_score" in stats:
            out["curate_score"] = float(stats["mean_score"])
        return out

    # ------------------------------------------------------------------ skipping a step
    def curation_skip_loss(self) -> torch.Tensor:
        """The loss of a skipped step: exactly 0, connected to every trainable parameter (so DDP's all-reduce of
        the gradients runs on every rank); :meth:`on_before_optimizer_step` then drops the gradients."""
        params = [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]
        return torch.stack([p.sum() for p in params]).sum() * 0.0

    def log_curated(self, loss: torch.Tensor, *, batch_size: int, extra: dict[str, float]) -> None:
        """``log_train`` for an accepted step; only the curation statistics for a skipped one."""
        if not self._curation_skip:
            self.log_train(loss, batch_size=batch_size, **extra)  # type: ignore[attr-defined]
            return
        self.log_train_epoch(batch_size=batch_size, **extra)  # type: ignore[attr-defined]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A skipped step: no gradient reaches ``optimizer.step()``, so weights and optimiser state stay put."""
        super().on_before_optimizer_step(optimizer)  # type: ignore[misc]
        if self._curation_skip:
            optimizer.zero_grad(set_to_none=True)
            self._curation_skip = False

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        if self.batch_curator is not None:
            checkpoint["batchmates_curation"] = self.batch_curator.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        state = checkpoint.get("batchmates_curation")
        if self.batch_curator is not None and state is not None:
            self.batch_curator.load_state_dict(state)
