"""Data: datasets as uint8 tensors, batch loaders, batched augmentation and views, corruptions.

```python
from batchmates.data import load_dataset, make_loader, make_augment, TwoViews
splits = load_dataset("digits")
loader = make_loader(splits.train, batch_size=128, seed=0)
aug = make_augment(splits.image_size, splits.in_channels, splits.mean, splits.std, "simclr", hflip=splits.hflip)
for images, labels in loader:          # uint8 [B, C, H, W], int64 [B]
    v1, v2 = TwoViews(aug)(images)     # float, normalised, independent per-sample parameters
```
"""

import importlib
from typing import Any

# Lazy re-exports (PEP 562): `import batchmates.data` imports neither torch nor kornia until a name is used, so
# `batchmates data list` and the CLI's checks stay fast. Name -> the submodule that defines it.
_EXPORTS = {
    **dict.fromkeys(("STRENGTHS", "BatchAugment", "MultiCrop", "TwoViews", "eval_transform", "make_augment",
                     "multicrop_scales", "multicrop_sizes"), "augment"),
    **dict.fromkeys(("CORRUPTIONS", "corrupt"), "corruptions"),
    **dict.fromkeys(("DATASETS", "DatasetNotFoundError", "DatasetSplits", "DecodedImages", "InMemoryImages",
                     "STL10Unlabeled", "describe_datasets", "load_dataset", "read_idx"), "datasets"),
    **dict.fromkeys(("EpochPermutationSampler", "InMemoryBatchLoader", "make_loader"), "loaders"),
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"batchmates.data.{_EXPORTS[name]}"), name)
    if name in ("augment", "corruptions", "datasets", "loaders"):
        return importlib.import_module(f"batchmates.data.{name}")
    raise AttributeError(f"module 'batchmates.data' has no attribute {name!r}")


__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "DatasetSplits",
    "DecodedImages",
    "InMemoryImages",
    "STL10Unlabeled",
    "describe_datasets",
    "load_dataset",
    "read_idx",
    "EpochPermutationSampler",
    "InMemoryBatchLoader",
    "make_loader",
    "STRENGTHS",
    "BatchAugment",
    "MultiCrop",
    "TwoViews",
    "eval_transform",
    "make_augment",
    "multicrop_scales",
    "multicrop_sizes",
    "CORRUPTIONS",
    "corrupt",
]
