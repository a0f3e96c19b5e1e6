"""Helpers for testing batch-relational code, shipped so users can test their own components too.

Paper: none; METHODS.md's shared contract (global batch under ``torch.distributed``) is what they check.
Library choices:

* :func:`ddp_contract`: METHODS.md's global-batch contract (2 gloo ranks on uneven shards == one process) for any
  function of a batch shard; :func:`run_distributed` and :func:`ddp_average_grads` underneath it.
* :mod:`batchmates.testing.oracles`: direct, unoptimised reference implementations the losses are checked against.
"""

from batchmates.testing.distributed import (
    ContractRun,
    Shard,
    assert_tree_close,
    ddp_average_grads,
    ddp_contract,
    run_distributed,
    uneven_splits,
)
from batchmates.testing.oracles import naive_cc_loss, official_supcon

__all__ = [
    "run_distributed",
    "ddp_average_grads",
    "ddp_contract",
    "ContractRun",
    "Shard",
    "uneven_splits",
    "assert_tree_close",
    "official_supcon",
    "naive_cc_loss",
]
