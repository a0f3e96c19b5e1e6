"""Scoring two-view batches with a feature extractor (The Bad Batches, Göksu & Pugeault 2024, arXiv:2403.19579).

Paper (as far as it could be recovered, see ``docs/curation.md``): data is scored with the Fréchet ResNet
Distance (FRD) and only representative data is trained on; the reviews describe one Gaussian FRD between the two
augmented batches' features (backbone and projection head). FRD's original definition (GestureGAN,
arXiv:1808.04859) is a discrete Fréchet distance between two images' frozen-ResNet outputs (1000-d) read as
curves.

Library choices: the readings offered behind one interface (``mode``):

* ``"pairwise"``: FRD's original definition per pair of views: each view's feature vector is a 1-D curve and a
  pair's score is the discrete Fréchet distance between its two curves
  (:func:`~batchmates.curation.discrete_frechet_distance`).
* ``"sq-l2"``: a per-pair squared L2 distance ``‖f1 − f2‖²`` (not FRD; cheaper than the discrete Fréchet DP).
  Before it had this name it was served as ``"gaussian"`` per-pair scores.
* ``"gaussian"``: the reviews' reading: *one score per batch*, the Gaussian Fréchet distance between the two
  views' feature sets (:func:`~batchmates.curation.gaussian_frechet_distance`). It has no per-pair score:
  :meth:`FRDScorer.score_pairs` refuses it.

The extractor is any ``nn.Module`` mapping a batch of images to features (flattened to ``[B, F]``): a frozen
model (``FRDScorer(module)``), torchvision's ResNet with weights from a local file
(:meth:`FRDScorer.from_torchvision_resnet`, FRD's original extractor), or the online training encoder in a
separate forward (:meth:`FRDScorer.from_online_encoder`). Scoring never builds a graph (``torch.no_grad``) and
always runs the extractor in eval mode, so scores of a pair do not depend on its batch mates (no BatchNorm batch
statistics) and no running statistics are updated. The methods avoid the separate forward altogether by scoring
their training forward's features (:mod:`batchmates.methods.curation`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from batchmates.curation.frechet import discrete_frechet_distance, gaussian_frechet_distance

__all__ = ["FRDScorer", "squared_l2_distance", "pair_distance", "MODES"]

_RESNET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
}

Mode = Literal["pairwise", "sq-l2", "gaussian"]
MODES = ("pairwise", "sq-l2", "gaussian")


def squared_l2_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-pair squared L2 distance ``‖p_i − q_i‖²`` of ``[P, D]`` features -> ``[P]`` (no gradient).

    Library choice (``mode="sq-l2"``, ``--curate pair-sq-l2``): not a Fréchet distance. float64 if either input
    is float64, else float32.
    """
    for name, x in (("p", p), ("q", q)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a floating-point [P, D] feature tensor, got {got}")
    if p.shape != q.shape:
        raise ValueError(f"p and q must have equal shapes [P, D], got {tuple(p.shape)} and {tuple(q.shape)}")
    dtype = torch.float64 if torch.float64 in (p.dtype, q.dtype) else torch.float32
    return (p.detach().to(dtype) - q.detach().to(dtype)).square().sum(1)


def pair_distance(mode: str, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """Per-pair scores ``[P]`` of ``mode`` (``"pairwise"`` or ``"sq-l2"``) on features ``[P, D]``."""
    if mode == "pairwise":
        return discrete_frechet_distance(f1, f2)
    if mode == "sq-l2":
        return squared_l2_distance(f1, f2)
    raise ValueError(
        f"mode {mode!r} has no per-pair score: the Gaussian FRD scores the whole batch (use score_batch, or "
        "batch_frd / BatchCurator); for per-pair scores use mode='pairwise' (discrete Fréchet distance, FRD's "
        "original definition) or mode='sq-l2' (squared L2 distance)"
    )


class FRDScorer:
    """Scores the pairs of a two-view batch with a frozen (or temporarily frozen) feature extractor.

    Args:
        extractor: module mapping ``[B, ...]`` inputs to ``[B, ...]`` features (flattened to ``[B, F]``).
            The scorer owns it: it is put in eval mode, its parameters stop requiring gradients, and it is moved
            to the device of the inputs on first use (so a scorer built on CPU follows the training device).
        mode: ``"pairwise"`` (discrete Fréchet distance per pair), ``"sq-l2"`` (squared L2 distance per pair)
            or ``"gaussian"`` (one Gaussian Fréchet distance between the two view batches; batch scores only).
            See :meth:`score_pairs` and :meth:`score_batch`.
        preprocess: optional callable applied to each view batch before the extractor (e.g. resizing to 224 and
            ImageNet normalisation for a torchvision ResNet, or repeating a grey channel to 3).

    Not an ``nn.Module`` on purpose (library choice): a frozen scorer must not add parameters to a method's
    optimiser or checkpoint, and the online encoder must not be registered twice.
    """

    def __init__(
        self,
        extractor: nn.Module,
        *,
        mode: Mode = "pairwise",
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        _owned: bool = True,
    ) -> None:
        if not isinstance(extractor, nn.Module):
            raise TypeError(f"extractor must be a torch.nn.Module, got {type(extractor).__name__}")
        if mode not in MODES:
            raise ValueError(
                f"mode must be one of {list(MODES)} ('pairwise': discrete Fréchet per pair; 'sq-l2': squared L2 "
                f"per pair; 'gaussian': Gaussian Fréchet distance of the whole batch), got {mode!r}"
            )
        if preprocess is not None and not callable(preprocess):
            raise TypeError(f"preprocess must be callable or None, got {type(preprocess).__name__}")
        self.extractor = extractor
        self.mode: Mode = mode
        self.preprocess = preprocess
        self.owned = _owned
        if _owned:
            extractor.eval()
            extractor.requires_grad_(False)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_torchvision_resnet(
        cls,
        weights_path: str | os.PathLike[str],
        arch: Literal["resnet18", "resnet50"] = "resnet18",
        *,
        mode: Mode = "pairwise",
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        output: Literal["logits", "pool"] = "logits",
    ) -> FRDScorer:
        """torchvision's ResNet with weights loaded from a local file; never downloads.

        Args:
            weights_path: a ``state_dict`` saved with ``torch.save`` (a dict holding it under ``"state_dict"`` or
                ``"model"`` is accepted too), e.g. torchvision's ImageNet checkpoint file.
            arch: ``"resnet18"`` or ``"resnet50"``.
            output: ``"logits"`` (the 1000-d output, as the original FRD) or ``"pool"`` (the pooled features
                before the classifier, 512-d / 2048-d).
        """
        if arch not in _RESNET_URLS:
            raise ValueError(f"arch must be one of {sorted(_RESNET_URLS)}, got {arch!r}")
        if output not in ("logits", "pool"):
            raise ValueError(f"output must be 'logits' or 'pool', got {output!r}")
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"ResNet weights for {arch} not found at {path!r}. batchmates never downloads weights. Get "
                f"torchvision's ImageNet checkpoint on a machine with network access, e.g. from "
                f"{_RESNET_URLS[arch]} or with `torch.save(torchvision.models.{arch}(weights='DEFAULT')"
                f".state_dict(), {path!r})`, copy it here and pass its path as weights_path."
            )
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            for key in ("state_dict", "model"):
                if key in state and isinstance(state[key], dict):
                    state = state[key]
                    break
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"{path!r} does not hold a torchvision {arch} state_dict: {err}") from err
        if output == "pool":
            model.fc = nn.Identity()
        return cls(model, mode=mode, preprocess=preprocess)

    @classmethod
    def from_online_encoder(
        cls,
        module: nn.Module,
        *,
        mode: Mode = "pairwise",
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> FRDScorer:
        """Score with the current training encoder in a *separate* no-grad forward (library option). Costs one
        extra forward of both views; the methods avoid it by scoring the features of their own training forward
        (see :mod:`batchmates.methods.curation`), except for the ``resample`` policy.

        The module is not frozen or moved: each scoring call switches it to eval mode under ``torch.no_grad`` and
        then restores every submodule's previous ``training`` flag, so BatchNorm running statistics are not
        updated by scoring and training continues unchanged. Under DDP pass the inner module (``ddp.module``),
        not the ``DistributedDataParallel`` wrapper, so scoring triggers no gradient-sync bookkeeping.
        """
        return cls(module, mode=mode, preprocess=preprocess, _owned=False)

    # ------------------------------------------------------------------ helpers
    def to(self, device: torch.device | str) -> FRDScorer:
        """Move an owned extractor to ``device`` (the online encoder is never moved)."""
        if self.owned:
            self.extractor.to(device)
        return self

    def _move_to(self, device: torch.device) -> None:
        if not self.owned:
            return
        ref = next(iter(self.extractor.parameters()), None)
        if ref is None:
            ref = next(iter(self.extractor.buffers()), None)
        if ref is not None and ref.device != device:
            self.extractor.to(device)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Extractor features ``[B, F]`` of one view batch, in eval mode, without gradient."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor batch, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch [B, ...], got shape {tuple(x.shape)}")
        self._move_to(x.device)
        if self.preprocess is not None:
            x = self.preprocess(x)
        modes = [(m, m.training) for m in self.extractor.modules()]
        try:
            self.extractor.eval()
            f = self.extractor(x)
        finally:
            for m, was_training in modes:
                m.training = was_training
            if self.owned:
                self.extractor.eval()
        if not isinstance(f, torch.Tensor) or f.shape[0] != x.shape[0]:
            raise ValueError("the extractor must return one feature tensor with the batch as its first dimension")
        return f.flatten(1).float() if f.dtype in (torch.float16, torch.bfloat16) else f.flatten(1)

    def _check_views(self, x1: torch.Tensor, x2: torch.Tensor) -> None:
        for name, x in (("x1", x1), ("x2", x2)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor batch, got {type(x).__name__}")
        if x1.shape[0] != x2.shape[0]:
            raise ValueError(
                f"x1 and x2 must hold the two views of the same samples (same batch size), got "
                f"{x1.shape[0]} and {x2.shape[0]}"
            )

    # ------------------------------------------------------------------ scores
    def score_features(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        """Per-pair scores ``[B]`` from already-extracted features ``[B, F]`` of the two views.

        ``"pairwise"``: discrete Fréchet distance between ``f1[i]`` and ``f2[i]`` as 1-D curves.
        ``"sq-l2"``: ``‖f1[i] − f2[i]‖²``. ``"gaussian"`` has no per-pair score (``ValueError``).
        """
        return pair_distance(self.mode, f1, f2)

    def score_pairs(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Score ``[B]`` of each positive pair ``(x1[i], x2[i])``; higher = less representative."""
        self._check_views(x1, x2)
        if self.mode == "gaussian":
            pair_distance(self.mode, x1, x2)  # raises: the Gaussian FRD scores batches, not pairs
        return self.score_features(self.features(x1), self.features(x2))

    def score_batch(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """One score for the whole two-view batch (scalar).

        ``"gaussian"``: :func:`gaussian_frechet_distance` between the feature sets of the two views (float64;
        needs ``B >= 2``). ``"pairwise"`` / ``"sq-l2"``: the mean of the per-pair scores (library choice).
        Local only: under ``torch.distributed`` use :func:`batchmates.curation.global_batch_frd` on the features
        for the score of the global batch.
        """
        self._check_views(x1, x2)
        f1, f2 = self.features(x1), self.features(x2)
        if self.mode == "gaussian":
            return gaussian_frechet_distance(f1, f2)
        return self.score_features(f1, f2).mean()

    def __repr__(self) -> str:
        kind = "frozen" if self.owned else "online"
        return f"FRDScorer(mode={self.mode!r}, extractor={kind} {type(self.extractor).__name__})"
