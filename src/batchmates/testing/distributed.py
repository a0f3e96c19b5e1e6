"""Run a function on W CPU processes under a gloo process group and collect what each rank returns.

Used by the test-suite to check the global-batch contract of METHODS.md: a loss or layer on W ranks holding
``B/W`` samples each must give the value and parameter gradients of one process holding all ``B``.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:  # noqa: BLE001 - shipped back to the parent, which re-raises
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *args: Any) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return their results.

    ``fn`` must be importable (defined at module level). Results must be picklable by ``torch.save``.
    An exception on any rank is re-raised here with the rank's traceback.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(world_size, init_file, tmp, fn, args), nprocs=world_size, join=True)
        results, errors = [], []
        for r in range(world_size):
            payload = torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
            if not payload["ok"]:
                errors.append(f"rank {r} failed:\n{payload['error']}")
            results.append(payload.get("result"))
        if errors:
            # A rank that crashed first makes its peers fail with "connection closed": show every rank's error.
            raise RuntimeError("\n".join(errors))
        return results


def ddp_average_grads(module: torch.nn.Module) -> None:
    """Average parameter gradients over ranks in place, as DistributedDataParallel does."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    w = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= w
