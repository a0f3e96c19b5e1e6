"""Batch-relational layers: modules whose per-sample output uses the other samples of the (global) batch.

Every layer here has ``eval_mode``: ``"independent"`` (default; in ``eval()`` a sample's output never depends
on its batch mates and equals its batch-size-1 output) or ``"batch"`` (opt-in). Under ``torch.distributed``
they relate the global batch through the gradient-exact collectives of :mod:`batchmates.distributed`.

```python
from batchmates.nn import BA2M, IntraBatchAttention, BatchFormer
BA2M(64)(x)                                  # [N, C, H, W] -> same, batch-softmax sample re-weighting
IntraBatchAttention(192, 3, mode="element")  # [B, N, D] -> same, MIBA ("mean") / EIBA ("element")
BatchFormer(512)(feats)                      # [B, D] -> same, transformer layer across the batch
```

Also :class:`SqueezeExcite` (per-sample channel gates; CC-Loss relates them across the batch). This package
imports nothing above it: the backbone factories of :mod:`batchmates.models` import these layers and register
them (``"se"``, ``"ba2m"`` attention layers; ``"miba"`` / ``"eiba"`` token mixers), not the other way round.
"""

from .ba2m import BA2M
from .batch_transformer import BatchTransformerHead
from .batchformer import BatchFormer
from .class_batch_attention import ClassBatchAttention
from .ibaformer_convert import to_ibaformer
from .intra_batch_attention import IntraBatchAttention, intra_batch_attention
from .multi_level_attention import MultiLevelAttention
from .squeeze_excite import SqueezeExcite

__all__ = [
    "BA2M",
    "BatchFormer",
    "BatchTransformerHead",
    "ClassBatchAttention",
    "IntraBatchAttention",
    "MultiLevelAttention",
    "SqueezeExcite",
    "intra_batch_attention",
    "to_ibaformer",
]
