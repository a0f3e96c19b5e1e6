"""batchmates: batch-relational representation learning in PyTorch.

Losses and layers whose per-sample features or loss use the other samples of the mini-batch (SupCon, SwAV,
Barlow Twins, CC-Loss, BA²M, Batch Transformer, IBAFormer, BatchFormer, batch curation), exact under
``torch.distributed``, plus a Lightning trainer and the ``batchmates`` CLI to train, evaluate and compare them.

Importing ``batchmates`` is light (no Lightning): import ``batchmates.losses`` / ``batchmates.nn`` for the
building blocks, ``batchmates.training`` for the trainer.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
