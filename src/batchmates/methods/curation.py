"""Representative batch curation for two-view pretraining methods (The Bad Batches, Göksu & Pugeault 2024,
arXiv:2403.19579), shared by ``simclr``, ``supcon`` and ``barlow``.

The paper scores each positive pair (two augmentations of one image) with the Fréchet ResNet Distance (FRD) and
trains only on representative pairs. This module wires :mod:`batchmates.curation` (``FRDScorer``, ``Curator``,
``apply_curation``, ``weighted_mean``) into a :class:`~batchmates.methods.base.Method` through
:class:`CurationMixin` and the :data:`CURATION_OPTIONS` a method adds to its ``options``
(``--opt curate=frd-pairwise --opt curate_quantile=0.75``; ``batchmates train`` also accepts ``--curate X``).

Paper: FRD scoring of the pairs of a two-view batch and training only on the representative ones.
Library choices (the paper's exact procedure was not recoverable):

* ``curate``: ``"frd-pairwise"`` (discrete Fréchet distance between the two views' feature vectors, the original
  FRD) or ``"frd-gaussian"`` (the Gaussian reading; per pair it is ``‖f1 − f2‖²``, see ``FRDScorer``).
* ``curate_extractor``: ``"online"`` (default: the method's own backbone, under ``no_grad`` and in eval mode, so
  scoring neither builds a graph nor updates BatchNorm statistics), ``"resnet18:PATH"`` / ``"resnet50:PATH"``
  (torchvision ImageNet weights from a local file, the paper's frozen ResNet; views are un-normalised, grey
  images repeated to 3 channels, resized to ``curate_image_size`` and ImageNet-normalised), or ``"run:DIR"``
  (the frozen ``embed`` features of a finished batchmates run on the same dataset).
* Scoring happens under ``no_grad`` on the two augmented, normalised views, before the training forward pass.
* ``"drop"``: every pair still goes through the encoder and projector (so BatchNorm statistics are those of the
  whole batch, and a rank never forwards an empty batch); the dropped pairs are removed by indexing the
  projector outputs before the loss, which is then the exact loss of the kept pairs of the global batch (the
  losses' gather supports uneven sizes under DDP).
* ``"reweight"``: per-anchor losses (``reduction="none"``) averaged with the curator's mean-1 weights by
  :func:`batchmates.curation.weighted_mean`. Defined for the contrastive losses only: the Barlow Twins loss is a
  function of batch statistics with no per-pair terms, so ``barlow`` rejects it with a ``ConfigError``.
* ``"resample"``: bad pairs get fresh views from the method's own training augmentation (re-scored, up to
  ``curate_max_resample`` rounds; still-bad pairs are dropped).
* The fraction of pairs dropped (per step, averaged per epoch) is logged as ``train/frac_dropped`` and lands in
  ``metrics.json`` / ``metrics.csv`` as ``frac_dropped``; the mean score as ``curate_score``.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from batchmates.config import ConfigError, Option
from batchmates.curation import CurationResult, Curator, FRDScorer

__all__ = ["CURATION_OPTIONS", "CurationMixin", "build_scorer", "IMAGENET_MEAN", "IMAGENET_STD"]

CURATE_CHOICES = ("none", "frd-pairwise", "frd-gaussian")
POLICY_CHOICES = ("drop", "reweight", "resample")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CURATION_OPTIONS: dict[str, Option] = {
    "curate": Option(str, "none", "batch curation by Fréchet ResNet Distance (The Bad Batches, arXiv:2403.19579)",
                     choices=CURATE_CHOICES),
    "curate_policy": Option(str, "drop", "what to do with unrepresentative pairs", choices=POLICY_CHOICES),
    "curate_quantile": Option(float, 0.75, "drop/resample: keep this fraction of lowest-score pairs of the global "
                                           "batch (ignored when curate_threshold > 0)", minimum=1e-6, maximum=1.0),
    "curate_threshold": Option(float, 0.0, "drop/resample: absolute score threshold (pairs above it are bad); "
                                           "0 = use curate_quantile", minimum=0.0),
    "curate_extractor": Option(str, "online", "feature extractor for FRD: online (the method's backbone), "
                                              "resnet18:PATH, resnet50:PATH (torchvision weights file), run:DIR"),
    "curate_temperature": Option(float, 1.0, "reweight: softmax temperature on standardised scores", minimum=1e-6),
    "curate_max_resample": Option(int, 1, "resample: rounds of fresh views for bad pairs", minimum=1),
    "curate_min_keep": Option(int, 2, "never keep fewer pairs than this in the global batch", minimum=0),
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
    """The :class:`FRDScorer` for ``curate_extractor=spec`` (see the module docstring for the forms)."""
    mode = "pairwise" if curate == "frd-pairwise" else "gaussian"
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


class CurationMixin:
    """Adds FRD batch curation to a two-view :class:`~batchmates.methods.base.Method`.

    Use: put :data:`CURATION_OPTIONS` in the method's ``options``, call :meth:`setup_curation` at the end of
    ``__init__``, call :meth:`curate_views` on the two views before the encoder, and :meth:`keep_pairs` on the
    projector outputs before the loss. ``reweight_supported = False`` makes ``curate_policy=reweight`` a
    ``ConfigError``.
    """

    reweight_supported: ClassVar[bool] = True
    curator: Curator | None

    def setup_curation(self) -> None:
        opts: dict[str, Any] = self.opts  # type: ignore[attr-defined]
        self.curator = None
        if opts["curate"] == "none":
            return
        policy = opts["curate_policy"]
        name = type(self).name  # type: ignore[attr-defined]
        if policy == "reweight" and not self.reweight_supported:
            raise ConfigError(
                f"option curate_policy='reweight' is not defined for method {name!r}: its loss has no per-pair "
                "terms to weight; use curate_policy=drop or curate_policy=resample"
            )
        scorer = build_scorer(str(opts["curate_extractor"]), str(opts["curate"]), self)
        kwargs: dict[str, Any] = dict(min_keep=int(opts["curate_min_keep"]))
        if policy == "reweight":
            kwargs["temperature"] = float(opts["curate_temperature"])
        elif opts["curate_threshold"] > 0:
            kwargs["threshold"] = float(opts["curate_threshold"])
        else:
            kwargs["quantile"] = float(opts["curate_quantile"])
        if policy == "resample":
            kwargs["max_resample"] = int(opts["curate_max_resample"])
        try:
            self.curator = Curator(scorer, policy, **kwargs)
        except ValueError as e:
            raise ConfigError(f"curation options of method {name!r}: {e}") from None

    @property
    def curating(self) -> bool:
        return self.curator is not None

    def curate_views(
        self, x: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, CurationResult | None]:
        """Score the pairs ``(v1[i], v2[i])`` of the uint8 batch ``x`` (no grad) and apply the policy.

        Returns the views to encode (fresh ones for resampled pairs) and the curation result (None when
        curation is off).
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
