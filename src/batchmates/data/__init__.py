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

from batchmates.data.augment import (
    STRENGTHS,
    BatchAugment,
    MultiCrop,
    TwoViews,
    eval_transform,
    make_augment,
    multicrop_scales,
    multicrop_sizes,
)
from batchmates.data.corruptions import CORRUPTIONS, corrupt
from batchmates.data.datasets import (
    DATASETS,
    DatasetNotFoundError,
    DatasetSplits,
    DecodedImages,
    InMemoryImages,
    STL10Unlabeled,
    describe_datasets,
    load_dataset,
    read_idx,
)
from batchmates.data.loaders import EpochPermutationSampler, InMemoryBatchLoader, make_loader

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
