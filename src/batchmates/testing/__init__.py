"""Helpers for testing batch-relational code, shipped so users can test their own components too."""

from batchmates.testing.distributed import ddp_average_grads, run_distributed

__all__ = ["run_distributed", "ddp_average_grads"]
