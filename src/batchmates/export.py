"""Take a model out: the backbone alone as safetensors (+ a JSON card), as ONNX, and embeddings as arrays.

```python
from batchmates.export import export_backbone, export_onnx, load_exported_backbone, write_embeddings
export_backbone(backbone, "out/backbone.safetensors", metadata={"mean": [0.5], "std": [0.25], "metrics": {...}})
export_onnx(backbone, "out/backbone.onnx", image_size=28, in_channels=1)       # pip install batchmates[export]
write_embeddings(features, labels, "out/test.npz")                              # or .npy / .parquet
```

Paper: none (library infrastructure).

Library choices:

* **Weights** (:func:`export_backbone`): only the backbone's tensors, no classifier, projector or optimizer
  state. A foreign backbone (``timm:NAME`` / ``torchvision:NAME`` / ``from_module``) is written with the key
  names of the original model (``ForeignBackbone.model``), so it loads with ``strict=True`` into
  ``timm.create_model(NAME, num_classes=0, in_chans=C)`` or into the torchvision model with ``fc =
  nn.Identity()``; a batchmates backbone is written with its own keys and loads strictly into
  ``create_backbone(name, ...)``. Tensors are saved contiguous, on the CPU, in their dtype. The safetensors
  header carries the rebuild spec too (``metadata["batchmates"]``).
* **Card**: a JSON file beside the weights (``backbone.json`` for ``backbone.safetensors``) with the rebuild
  spec, input channels and size, feature width, how to load the file, and what the caller adds (normalisation
  ``mean``/``std``, ``metrics``, the run's configuration). :func:`load_exported_backbone` reads both back.
* **ONNX** (:func:`export_onnx`): the eval-mode backbone, every batch-relational layer in
  ``eval_mode="independent"`` (an exported model predicts each image on its own) and value checks off (a data-
  dependent check cannot be traced), with a dynamic batch axis; input ``images [N, C, H, W]`` (normalised),
  output ``features [N, D]``. torch's exporter (``dynamo=True``) needs ``onnx`` and ``onnxscript``: the
  ``export`` extra. One self-contained file below 1.5 GiB of weights, external data beside it above.
* **Embeddings** (:func:`write_embeddings`): ``.npy`` (features ``[N, D]`` float32; labels beside it as
  ``<stem>.labels.npy``), ``.npz`` (arrays ``features`` and ``labels``) or ``.parquet`` (columns ``features``,
  a fixed-size list of float32, and ``labels``; needs ``pyarrow``). All writes are atomic.
"""

from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from batchmates.io import atomic_open, atomic_write_bytes, atomic_write_json

__all__ = ["export_backbone", "load_exported_backbone", "backbone_spec", "export_onnx", "write_embeddings",
           "card_path"]

FORMAT = "batchmates.backbone/1"
_EXTERNAL_DATA_BYTES = 1536 * 2**20


def card_path(weights: str | os.PathLike) -> Path:
    """The JSON card beside a weights file: ``x/backbone.safetensors`` -> ``x/backbone.json``."""
    return Path(weights).with_suffix(".json")


def _is_foreign(backbone: nn.Module) -> bool:
    from batchmates.models.foreign import ForeignBackbone

    return isinstance(backbone, ForeignBackbone)


def backbone_spec(backbone: nn.Module, name: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """How to rebuild ``backbone``: a foreign backbone's own ``spec``; for a batchmates backbone
    ``{"source": "batchmates", "name": name, "in_channels", "image_size", **kwargs}`` (``kwargs``: the other
    :func:`~batchmates.models.create_backbone` arguments it was built with, e.g. ``attn_layer``)."""
    if _is_foreign(backbone):
        return dict(backbone.spec)
    spec = {"source": "batchmates", "name": name, "class": f"{type(backbone).__module__}:{type(backbone).__qualname__}",
            "in_channels": getattr(backbone, "in_channels", None), "image_size": getattr(backbone, "image_size", None)}
    spec.update(kwargs)
    return spec


def _load_hint(spec: Mapping[str, Any], file: str) -> str:
    src, name, c = spec.get("source"), spec.get("name"), spec.get("in_channels")
    if src == "timm" and not spec.get("attn_layer") and not spec.get("to_ibaformer"):
        return (f"timm.create_model({name!r}, num_classes=0, in_chans={c}, **model_kwargs)"
                f".load_state_dict(safetensors.torch.load_file({file!r}), strict=True)")
    if src == "torchvision" and not spec.get("attn_layer"):
        return (f"m = torchvision.models.get_model({name!r}, weights=None); replace its final Linear by "
                f"nn.Identity() (and its first conv for in_channels={c} != 3); "
                f"m.load_state_dict(safetensors.torch.load_file({file!r}), strict=True)")
    return f"batchmates.export.load_exported_backbone({file!r})"


def _tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # contiguous CPU copies: safetensors refuses strided (channels-last) and storage-sharing tensors
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def export_backbone(
    backbone: nn.Module,
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    spec: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``backbone``'s weights to ``path`` (``.safetensors``) and its JSON card beside it; return the card path.

    Args:
        backbone: a :class:`~batchmates.models.Backbone` (batchmates' own or foreign).
        path: the weights file; must end in ``.safetensors``.
        metadata: JSON-serialisable facts to record, e.g. ``{"mean": [...], "std": [...], "metrics": {...},
            "config": {...}}``; reserved card keys cannot be overridden.
        spec: how to rebuild it (default :func:`backbone_spec`; pass ``backbone_spec(b, name="cnn", attn_layer=...)``
            for a batchmates backbone so that :func:`load_exported_backbone` can rebuild it).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path={str(path)!r} must end in .safetensors (the card is written beside it as .json)")
    if not isinstance(backbone, nn.Module) or not hasattr(backbone, "feature_dim"):
        raise TypeError("export_backbone expects a batchmates Backbone (create_backbone(...) or from_module(...)); "
                        f"got {type(backbone).__name__}")
    from safetensors.torch import save

    foreign = _is_foreign(backbone)
    spec = dict(spec) if spec is not None else backbone_spec(backbone)
    card: dict[str, Any] = {
        "format": FORMAT,
        "weights": path.name,
        "keys": spec.get("source") if foreign else "batchmates",
        "spec": spec,
        "in_channels": spec.get("in_channels"),
        "image_size": spec.get("image_size"),
        "feature_dim": int(backbone.feature_dim),
        "load": _load_hint(spec, path.name) if foreign else f"batchmates.export.load_exported_backbone({path.name!r})",
    }
    extra = dict(metadata or {})
    clash = sorted(set(extra) & set(card))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved for the card; rename them (e.g. under 'run')")
    card.update(extra)
    try:
        text = json.dumps(card, indent=2, allow_nan=True)
    except TypeError as err:
        raise TypeError(f"metadata must be JSON-serialisable (numbers, strings, lists, dicts): {err}") from err
    state = backbone.model.state_dict() if foreign else backbone.state_dict()
    blob = save(_tensors(state), metadata={"format": "pt", "batchmates": json.dumps(spec)})
    atomic_write_bytes(path, blob)
    out = card_path(path)
    atomic_write_json(out, json.loads(text))
    return out


def load_exported_backbone(path: str | os.PathLike) -> nn.Module:
    """Rebuild a backbone written by :func:`export_backbone` (weights path or its card) and load it strictly."""
    path = Path(path)
    card = json.loads(card_path(path).read_text(encoding="utf-8"))
    if card.get("format") != FORMAT:
        raise ValueError(f"{card_path(path)} is not a batchmates backbone card (format {card.get('format')!r})")
    weights = path.with_name(card["weights"])
    spec = card["spec"]
    from safetensors.torch import load_file

    state = load_file(str(weights))
    if spec.get("source") in ("timm", "torchvision"):
        from batchmates.models.foreign import rebuild_backbone

        backbone = rebuild_backbone(spec)
        if spec.get("to_ibaformer"):  # a timm ViT converted by the ibaformer method (batchmates.nn.to_ibaformer)
            from batchmates.nn.ibaformer_convert import to_ibaformer

            to_ibaformer(backbone.model, **spec["to_ibaformer"])
        backbone.model.load_state_dict(state, strict=True)
        return backbone
    if spec.get("source") != "batchmates" or not spec.get("name"):
        raise ValueError(
            f"{card_path(path)}: spec {spec!r} cannot be rebuilt automatically (a from_module backbone, or a "
            "batchmates backbone exported without its name); build the model yourself and load "
            f"safetensors.torch.load_file({str(weights)!r})"
        )
    from batchmates.models import create_backbone

    kw = {k: v for k, v in spec.items() if k not in ("source", "name", "class", "in_channels", "image_size")}
    backbone = create_backbone(spec["name"], in_channels=spec["in_channels"], image_size=spec["image_size"], **kw)
    backbone.load_state_dict(state, strict=True)
    return backbone


# ---------------------------------------------------------------------------------------------- ONNX
def _require_onnx() -> None:
    missing = []
    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ImportError(
            f"export_onnx needs {' and '.join(missing)} (torch's ONNX exporter): pip install 'batchmates[export]'"
        )


def export_onnx(
    backbone: nn.Module,
    path: str | os.PathLike,
    *,
    image_size: int,
    in_channels: int,
    opset_version: int | None = None,
) -> Path:
    """Export the eval-mode ``backbone`` (independent eval, dynamic batch) to ONNX at ``path``; return ``path``."""
    _require_onnx()
    from batchmates.models import set_eval_mode

    for arg, v in (("image_size", image_size), ("in_channels", in_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be a positive int; got {v!r}")
    model = copy.deepcopy(backbone).eval()
    set_eval_mode(model, "independent")
    for m in model.modules():
        if hasattr(m, "check_finite"):
            m.check_finite = False  # a data-dependent check cannot be traced
    ref = next(model.parameters(), None)
    x = torch.randn(2, in_channels, image_size, image_size,
                    device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["images"], output_names=["features"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset_version,
                          external_data=size > _EXTERNAL_DATA_BYTES, verbose=False)
    return path


# ---------------------------------------------------------------------------------------------- embeddings
def _as_numpy(features: Any, labels: Any) -> tuple[np.ndarray, np.ndarray | None]:
    f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if f.ndim != 2 or not np.issubdtype(f.dtype, np.number):
        raise ValueError(f"features must be a numeric [N, D] array or tensor; got shape {f.shape}, dtype {f.dtype}")
    f = f.astype(np.float32, copy=False)
    if labels is None:
        return f, None
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.shape != (f.shape[0],):
        raise ValueError(f"labels must have shape [N] = [{f.shape[0]}] to match features; got {y.shape}")
    return f, y


def write_embeddings(features: Any, labels: Any, path: str | os.PathLike) -> list[Path]:
    """Write ``features [N, D]`` (as float32) and ``labels [N]`` (or ``None``) to ``path``; return the files written.

    ``.npy``: the features at ``path`` and the labels at ``<stem>.labels.npy``; ``.npz``: arrays ``features`` and
    ``labels``; ``.parquet``: columns ``features`` (fixed-size list of float32) and ``labels`` (needs pyarrow).
    """
    path = Path(path)
    f, y = _as_numpy(features, labels)
    if path.suffix == ".npy":
        written = [path]
        with atomic_open(path) as fh:
            np.save(fh, f)
        if y is not None:
            written.append(path.with_name(path.stem + ".labels.npy"))
            with atomic_open(written[-1]) as fh:
                np.save(fh, y)
        return written
    if path.suffix == ".npz":
        with atomic_open(path) as fh:
            np.savez(fh, features=f, **({} if y is None else {"labels": y}))
        return [path]
    if path.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError(
                "writing .parquet embeddings needs pyarrow: pip install pyarrow (or write .npy / .npz)"
            ) from err
        cols = {"features": pa.FixedSizeListArray.from_arrays(pa.array(f.reshape(-1)), f.shape[1])}
        if y is not None:
            cols["labels"] = pa.array(y)
        buf = io.BytesIO()
        pq.write_table(pa.table(cols), buf)
        atomic_write_bytes(path, buf.getvalue())
        return [path]
    raise ValueError(f"path={str(path)!r}: write embeddings as .npy, .npz or .parquet")
