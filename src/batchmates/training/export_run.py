"""Take a trained run out: its backbone (safetensors + JSON card, or ONNX) and its embeddings of a dataset split.

```python
from batchmates.training.export_run import embed_run, export_run
export_run("runs/supcon")                       # runs/supcon/export/backbone.safetensors + backbone.json
export_run("runs/supcon", fmt="onnx")           # runs/supcon/export/backbone.onnx + backbone.onnx.json
embed_run("runs/supcon", split="test", out="test.npz")      # features [N, D] and labels [N]
```

These are what ``batchmates export`` and ``batchmates embed`` call.

Paper: none (library infrastructure).

Library choices:

* The method is rebuilt from the checkpoint alone (:meth:`~batchmates.methods.base.Method.from_checkpoint`), so the
  weights are the trained ones, never ``pretrained_path``'s. Only the backbone leaves (no projection head,
  prototypes or classifier): the features are what ``embed`` (kNN / linear probe) uses.
* The card records the backbone's rebuild spec (a timm/torchvision backbone keeps its original key names and loads
  with ``strict=True`` into ``timm.create_model(NAME, num_classes=0, in_chans=C)`` or the torchvision model without
  its classifier; batchmates' own backbones into ``create_backbone``; an IBAFormer-converted timm ViT records the
  conversion), the input (channels, size, ``(x / 255 - mean) / std`` normalisation) and the run (method, data,
  config, and the metrics of ``metrics.json``).
* Embeddings are computed as ``batchmates eval`` computes them (eval mode, the run's ``eval_mode``), so a kNN on
  the written train and test features reproduces the run's kNN accuracy. Another dataset than the run's is
  resized to the run's image size and must have as many channels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from batchmates.config import ConfigError, RunError
from batchmates.io import atomic_write_json

__all__ = ["export_run", "embed_run", "EXPORT_FORMATS", "run_card"]

EXPORT_FORMATS = ("safetensors", "onnx")
_SPLITS = ("train", "test", "unlabeled")


def _export_spec(model: Any) -> dict[str, Any]:
    from batchmates.export import backbone_spec

    backbone = model.backbone
    recipe = dict(getattr(model, "backbone_recipe", None) or {"name": model.cfg.backbone})
    name = recipe.pop("name")
    spec = backbone_spec(backbone, name=name, **recipe)
    spec.update(getattr(model, "backbone_transform", None) or {})
    return spec


def run_card(model: Any, run_dir: str) -> dict[str, Any]:
    """What a card records about the run of ``model`` (input normalisation, metrics, configuration)."""
    from batchmates.training.rundir import read_metrics

    info, cfg = model.info, model.cfg
    metrics = read_metrics(run_dir) or {}
    keep = ("test_acc", "accuracy_source", "best_acc", "epochs_done", "steps", "eval")
    return {
        "mean": list(info.mean),
        "std": list(info.std),
        "input": {"name": "images", "shape": ["N", info.in_channels, info.image_size, info.image_size],
                  "dtype": "float32", "normalise": "(x / 255 - mean) / std, x uint8 in [0, 255]"},
        "metrics": {k: metrics[k] for k in keep if k in metrics},
        "run": {"dir": os.path.abspath(run_dir), "method": cfg.method, "data": cfg.data,
                "config": model.resolved_config.to_dict()},
    }


def export_run(run_dir: str, *, fmt: str = "safetensors", out: str | os.PathLike | None = None) -> list[Path]:
    """Write the backbone of the run in ``run_dir`` as ``fmt`` (``safetensors`` or ``onnx``) to ``out`` (default
    ``RUN/export/backbone.<fmt>``) with its JSON card; return the files written."""
    from batchmates.methods import Method

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {list(EXPORT_FORMATS)}")
    suffix = ".safetensors" if fmt == "safetensors" else ".onnx"
    path = Path(out) if out is not None else Path(run_dir) / "export" / f"backbone{suffix}"
    if path.suffix != suffix:
        raise ConfigError(f"--out {str(path)!r}: a {fmt} export must end in {suffix}")
    model = Method.from_checkpoint(run_dir)
    card = run_card(model, run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from batchmates.export import export_backbone

        return [path, export_backbone(model.backbone, path, metadata=card, spec=_export_spec(model))]
    from batchmates.export import export_onnx

    info = model.info
    export_onnx(model.backbone, path, image_size=int(info.image_size), in_channels=int(info.in_channels))
    card_file = path.with_name(path.name + ".json")
    atomic_write_json(card_file, {"format": "onnx", "model": path.name, "spec": _export_spec(model),
                                  "feature_dim": int(model.backbone.feature_dim), "output": "features [N, D]",
                                  **card})
    return [path, card_file]


def embed_run(run_dir: str, *, out: str | os.PathLike, data: str | None = None, split: str = "test",
              data_dir: str | None = None, device: str = "cpu", batch_size: int = 512) -> list[Path]:
    """Write the embeddings ``[N, D]`` and labels ``[N]`` of ``split`` of ``data`` (default: the run's dataset)
    under the run's model to ``out`` (``.npy``, ``.npz`` or ``.parquet``); return the files written."""
    from batchmates.data import load_dataset
    from batchmates.export import write_embeddings
    from batchmates.methods import Method
    from batchmates.training.evaluate import extract_features

    if split not in _SPLITS:
        raise ConfigError(f"--split {split!r}: choose one of {list(_SPLITS)}")
    if Path(out).suffix == ".parquet":
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None:
            raise ConfigError(f"--out {str(out)!r}: .parquet needs pyarrow (pip install 'batchmates[parquet]'); or "
                              "write .npy / .npz")
    model = Method.from_checkpoint(run_dir, map_location=device).to(device)
    cfg, info = model.cfg, model.info
    name = data or cfg.data
    size = cfg.image_size if name == cfg.data else int(info.image_size)
    splits = load_dataset(name, data_dir=data_dir or cfg.data_dir, image_size=size)
    if int(splits.in_channels) != int(info.in_channels):
        raise ConfigError(f"--data {name!r} has {splits.in_channels}-channel images; the run's model takes "
                          f"{info.in_channels} (trained on {cfg.data!r}): embed a dataset with as many channels")
    ds = getattr(splits, split, None)
    if ds is None:
        raise RunError(f"--data {name!r} has no {split!r} split; choose train or test")
    feats, labels = extract_features(model, ds, batch_size=batch_size)
    return write_embeddings(feats, labels, out)


def describe(paths: list[Path]) -> str:
    """One line naming the files written (for the CLI)."""
    return "wrote " + ", ".join(str(p) for p in paths)
