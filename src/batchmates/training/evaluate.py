"""Evaluation protocols on a trained method: classifier top-1, weighted kNN and a linear probe on frozen features.

* ``accuracy``: top-1 of the method's own classifier (``Method.classify``); for methods without one, the linear
  probe's top-1 (so every method reports an "accuracy").
* ``knn``: weighted k-nearest-neighbour classification on L2-normalised frozen features with cosine similarity,
  each of the k neighbours voting ``exp(sim / T)`` for its class.
* ``linear``: multinomial logistic regression on standardised frozen features (train-split mean/std).
* corruptions: classifier top-1 on the deterministic corrupted test sets of :mod:`batchmates.data.corruptions`.

Paper: the weighted kNN follows InstDisc (Wu et al. 2018, arXiv:1805.01978) as used by DINO
(arXiv:2104.14294); the corrupted test sets adapt IBAFormer's domain-shift evaluation (arXiv:2309.06282) to
image classification.

Library choices:

* kNN with T = 0.07 and k = 20 and 200.
* The linear probe is fitted full-batch with L-BFGS and a small L2 penalty: deterministic and fast on
  precomputed features, no augmentation.
* Features are extracted in eval mode, with batch-relational modules in ``eval_mode="independent"`` unless the
  run says otherwise, so no test prediction depends on the other test images.
* If the run used label noise, the probes are fitted on the same noisy training labels the method saw.
* Flip test-time augmentation is reported beside the classifier's top-1, never instead of it: where a horizontal
  flip preserves labels (the dataset's ``hflip``, the same flag that lets training flip), ``accuracy`` also holds
  ``top1_flip_tta``, the top-1 of the mean softmax of each test image and its mirror image. ``test_acc`` and the
  studies use the plain ``top1``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from batchmates.config import PROTOCOLS, ConfigError
from batchmates.io import atomic_write_json, read_json

__all__ = [
    "evaluate",
    "evaluate_model",
    "extract_features",
    "classifier_accuracies",
    "knn_classify",
    "knn_accuracy",
    "linear_probe",
    "classifier_accuracy",
]


# ---------------------------------------------------------------------------------------------- data access
def _split_tensors(ds: Any, batch_size: int = 512) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` batches of a split: in-memory tensors directly, else through a DataLoader."""
    if hasattr(ds, "images") and hasattr(ds, "labels"):
        for i in range(0, ds.images.shape[0], batch_size):
            yield ds.images[i : i + batch_size], ds.labels[i : i + batch_size]
        return
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    for batch in loader:
        yield batch[0], batch[1]


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def extract_features(model: Any, ds: Any, *, batch_size: int = 512, classify: bool = False,
                     flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features (``model.embed``) or logits (``classify=True``) of every image of ``ds``, in eval mode.

    ``flip``: of the horizontally mirrored images. Returns ``(float32 [N, D] on CPU, int64 [N] labels)``.
    """
    was_training = model.training
    model.eval()
    mode = getattr(getattr(model, "cfg", None), "eval_mode", "independent")
    if hasattr(model, "set_eval_mode"):
        model.set_eval_mode(mode)
    dev = _device_of(model)
    feats, labels = [], []
    try:
        for x, y in _split_tensors(ds, batch_size):
            xn = model.normalize(x.to(dev).flip(-1) if flip else x.to(dev))
            out = model.classify(xn) if classify else model.embed(xn)
            if out is None:
                raise ValueError(f"method {getattr(model, 'name', '?')!r} has no classifier (classify returned None)")
            feats.append(out.float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


# ---------------------------------------------------------------------------------------------- kNN
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, *,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN predictions: cosine similarity on L2-normalised features, votes ``exp(sim/T)``.

    ``k`` is clipped to the number of training samples. Returns int64 ``[M]`` predicted labels.
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"knn: features must be [N, D] and [M, D] with the same D, got "
                         f"{tuple(train_feats.shape)} and {tuple(test_feats.shape)}")
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(f"knn: train_labels must be [N]={train_feats.shape[0]}, got {tuple(train_labels.shape)}")
    if k < 1:
        raise ValueError(f"knn: k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"knn: temperature must be > 0, got {temperature}")
    c = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    k = min(k, train_feats.shape[0])
    tr = F.normalize(train_feats.float(), dim=1)
    te = F.normalize(test_feats.float(), dim=1)
    preds = []
    for i in range(0, te.shape[0], chunk):
        sim = te[i : i + chunk] @ tr.T
        top_sim, top_idx = sim.topk(k, dim=1)
        w = torch.exp((top_sim - 1.0) / temperature)  # exp(sim/T) up to a per-row constant: no overflow
        votes = torch.zeros(sim.shape[0], c, dtype=w.dtype)
        votes.scatter_add_(1, train_labels[top_idx], w)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, *, ks: Sequence[int] = (20, 200),
                 temperature: float = 0.07, num_classes: int | None = None) -> dict[str, float]:
    """``{"k20": acc, "k200": acc, ...}`` of :func:`knn_classify`."""
    return {
        f"k{k}": float((knn_classify(train_feats, train_labels, test_feats, k=k, temperature=temperature,
                                     num_classes=num_classes) == test_labels).float().mean())
        for k in ks
    }


# ---------------------------------------------------------------------------------------------- linear probe
def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, num_classes: int | None = None, weight_decay: float = 1e-4,
                 max_iter: int = 200) -> dict[str, float]:
    """Fit softmax regression on standardised features with full-batch L-BFGS; return train and test top-1.

    Deterministic (no sampling). ``weight_decay`` is the L2 penalty on the weights (not the bias).
    """
    c = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    x = train_feats.double()
    mean = x.mean(0, keepdim=True)
    std = x.std(0, keepdim=True).clamp_min(1e-6)
    xs = ((x - mean) / std).float()
    xt = ((test_feats.double() - mean) / std).float()
    lin = torch.nn.Linear(xs.shape[1], c)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(xs), train_labels) + 0.5 * weight_decay * lin.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        tr_acc = float((lin(xs).argmax(1) == train_labels).float().mean())
        te_acc = float((lin(xt).argmax(1) == test_labels).float().mean())
    return {"top1": te_acc, "train_top1": tr_acc}


def classifier_accuracy(model: Any, ds: Any, *, batch_size: int = 512, flip_tta: bool = False) -> float:
    """Top-1 of the method's classifier on ``ds``; ``flip_tta``: of the mean softmax over each image and its mirror."""
    return classifier_accuracies(model, ds, batch_size=batch_size, flip_tta=flip_tta)[-1]


def classifier_accuracies(model: Any, ds: Any, *, batch_size: int = 512, flip_tta: bool = False) -> list[float]:
    """``[top1]``, or ``[top1, top1 with flip TTA]`` with ``flip_tta`` (one pass over the plain images for both)."""
    logits, labels = extract_features(model, ds, batch_size=batch_size, classify=True)
    accs = [float((logits.argmax(1) == labels).float().mean())]
    if flip_tta:
        mirrored, _ = extract_features(model, ds, batch_size=batch_size, classify=True, flip=True)
        probs = logits.softmax(1) + mirrored.softmax(1)
        accs.append(float((probs.argmax(1) == labels).float().mean()))
    return accs


# ---------------------------------------------------------------------------------------------- drivers
def evaluate_model(model: Any, splits: Any, protocols: Sequence[str] = PROTOCOLS, *, batch_size: int = 512,
                   corruptions: bool = False, severities: Sequence[int] | None = None,
                   kinds: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``protocols`` on a trained method; always includes ``"accuracy"`` (classifier or linear probe)."""
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise ConfigError(f"unknown protocol(s) {bad}; choose from {list(PROTOCOLS)}")
    results: dict[str, Any] = {}
    num_classes = int(splits.num_classes)
    has_cls = bool(getattr(model, "has_classifier", False))
    need_feats = "knn" in protocols or "linear" in protocols or not has_cls
    if need_feats:
        tr_f, tr_y = extract_features(model, splits.train, batch_size=batch_size)
        cfg = getattr(model, "cfg", None)
        if cfg is not None and getattr(cfg, "label_noise", 0.0) > 0:
            from batchmates.training.data import apply_label_noise

            tr_y = apply_label_noise(tr_y, cfg.label_noise, num_classes, cfg.seed)
        te_f, te_y = extract_features(model, splits.test, batch_size=batch_size)
        if "knn" in protocols:
            results["knn"] = knn_accuracy(tr_f, tr_y, te_f, te_y, num_classes=num_classes)
        if "linear" in protocols or not has_cls:
            results["linear"] = linear_probe(tr_f, tr_y, te_f, te_y, num_classes=num_classes)
    if has_cls:
        accs = classifier_accuracies(model, splits.test, batch_size=batch_size,
                                     flip_tta=bool(getattr(splits, "hflip", False)))
        results["accuracy"] = {"top1": accs[0], "source": "classifier"}
        if len(accs) > 1:
            results["accuracy"]["top1_flip_tta"] = accs[1]
    else:
        results["accuracy"] = {"top1": results["linear"]["top1"], "source": "linear_probe"}
    if corruptions:
        results["corruptions"] = corruption_accuracy(model, splits, severities=severities, kinds=kinds,
                                                     batch_size=batch_size)
    return results


class _Split:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return int(self.images.shape[0])


def corruption_accuracy(model: Any, splits: Any, *, severities: Sequence[int] | None = None,
                        kinds: Sequence[str] | None = None, batch_size: int = 512) -> dict[str, Any]:
    """Top-1 (classifier, or the linear probe fitted on clean features) on each corrupted test set."""
    from batchmates.data import corruptions as C

    kinds = list(kinds) if kinds else list(C.CORRUPTIONS)
    bad = [k for k in kinds if k not in C.CORRUPTIONS]
    if bad:
        raise ConfigError(f"unknown corruption kind(s) {bad}; choose from {list(C.CORRUPTIONS)}")
    if not hasattr(splits.test, "images"):
        raise ConfigError(f"corruptions need an in-memory test set; {getattr(splits, 'name', '?')!r} is not one")
    severities = list(severities) if severities else list(range(1, 6))
    if any(s not in range(1, 6) for s in severities):
        raise ConfigError(f"corruption severities must be in 1..5, got {severities}")
    has_cls = bool(getattr(model, "has_classifier", False))
    probe = None
    if not has_cls:
        tr_f, tr_y = extract_features(model, splits.train, batch_size=batch_size)
        probe = (tr_f, tr_y)
    out: dict[str, Any] = {}
    accs = []
    for kind in kinds:
        for sev in severities:
            ds = _Split(C.corrupt(splits.test.images, kind, sev, seed=0), splits.test.labels)
            if has_cls:
                acc = classifier_accuracy(model, ds, batch_size=batch_size)
            else:
                te_f, te_y = extract_features(model, ds, batch_size=batch_size)
                acc = linear_probe(probe[0], probe[1], te_f, te_y, num_classes=int(splits.num_classes))["top1"]
            out.setdefault(kind, {})[str(sev)] = acc
            accs.append(acc)
    out["mean"] = float(sum(accs) / len(accs)) if accs else float("nan")
    return out


def evaluate(run_dir: str, protocols: Sequence[str] = PROTOCOLS, *, corruptions: bool = False,
             severities: Sequence[int] | None = None, kinds: Sequence[str] | None = None,
             device: str = "cpu", eval_mode: str | None = None) -> dict[str, Any]:
    """Evaluate the run in ``run_dir`` and merge the results into ``run_dir/metrics.json`` under ``"eval"``.

    ``eval_mode`` overrides the run's ``eval_mode`` of its batch-relational layers. ``"batch"`` evaluates test
    batches of the run's (global) training batch size, in dataset order, and its results are merged under
    ``"eval_batch"`` so they never overwrite the run's own (independent) evaluation.
    """
    from batchmates.training.preflight import check_device
    from batchmates.training.rundir import RunError, run_lock

    protocols = list(protocols) or list(PROTOCOLS)
    if not os.path.isdir(run_dir):
        raise RunError(f"{run_dir!r} is not a directory; pass the --out directory of a `batchmates train` run")
    check_device(device)
    with run_lock(run_dir, purpose="eval"):  # one writer of metrics.json at a time
        return _evaluate_locked(run_dir, protocols, corruptions=corruptions, severities=severities, kinds=kinds,
                                device=device, eval_mode=eval_mode)


def _evaluate_locked(run_dir: str, protocols: list[str], *, corruptions: bool, severities: Sequence[int] | None,
                     kinds: Sequence[str] | None, device: str, eval_mode: str | None) -> dict[str, Any]:
    from batchmates.training.rundir import METRICS_FILE, load_run

    model, cfg, splits = load_run(run_dir, map_location=device)
    model.to(device)
    key, batch_size = "eval", max(cfg.batch_size or 256, 256)
    if eval_mode is not None and eval_mode != cfg.eval_mode:
        model.cfg = cfg = cfg.replace(eval_mode=eval_mode)
        key = f"eval_{eval_mode}"
    if cfg.eval_mode == "batch":
        batch_size = int(cfg.batch_size or 256)  # batch mates as in training
    res = evaluate_model(model, splits, protocols, batch_size=batch_size,
                         corruptions=corruptions, severities=severities, kinds=kinds)
    path = os.path.join(run_dir, METRICS_FILE)
    metrics = read_json(path, {}) or {}
    ev = dict(metrics.get(key, {}))
    ev.update(res)
    metrics[key] = ev
    atomic_write_json(path, metrics)
    return res
