"""Run a function on W CPU processes under a gloo process group; check the global-batch contract with it.

METHODS.md (shared contract, "Batch semantics"): every loss and module that relates samples must give the same
value and the same parameter gradients on W ranks holding ``B/W`` samples each as one process holding all ``B``
(gloo, 2 CPU processes, tolerance 1e-5). :func:`ddp_contract` runs that check for any function of a batch
shard; :func:`run_distributed` is the bare launcher under it.

Library choices: ranks are spawned processes on a file-based rendezvous (no free port needed); shards are
uneven by default (:func:`uneven_splits`), since equal shards hide per-rank averaging; an exception on any rank
is re-raised in the caller with every rank's traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    # The result is on disk: leave without interpreter finalisation. A gloo worker thread may still hold the last
    # reference to a finished all-reduce's tensors; if it drops them while Python finalises, it needs the GIL,
    # is made to exit, and std::terminate aborts a rank whose work had succeeded (pytorch/pytorch#190489:
    # destroy_process_group does not join those threads). Seen as SIGABRT in 5 of 30 runs of one test's worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *args: Any) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return their results.

    ``fn`` must be importable (defined at module level). Results must be picklable by ``torch.save``.
    An exception on any rank is re-raised here with the rank's traceback. A failed gloo rendezvous (the ranks
    never connected), seen on a heavily loaded machine, is retried once with fresh processes; ``fn`` must
    therefore be free of side effects outside its return value.
    """
    for attempt in range(2):
        try:
            return _spawn_once(fn, world_size, args)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            transient = "connectFullMesh" in str(e)
            if attempt == 1 or not transient:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _spawn_once(fn: Callable[..., Any], world_size: int, args: tuple[Any, ...]) -> list[Any]:
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


# --------------------------------------------------------------------------------------------- the DDP contract
@dataclass(frozen=True)
class Shard:
    """Which rows of the global batch a call of a contract function holds.

    ``rows`` slices the global batch of ``n`` samples; ``rank`` and ``world`` are this process's place
    (``world == 1`` for the single-process reference, which holds every row).
    """

    rank: int
    world: int
    rows: slice
    n: int

    @property
    def size(self) -> int:
        """Number of rows this call holds."""
        return self.rows.stop - self.rows.start


def uneven_splits(n: int, world_size: int = 2) -> tuple[int, ...]:
    """Per-rank sizes summing to ``n`` in which rank 0 holds one more row than an even split would give it.

    Uneven on purpose: a loss that averages per rank instead of over the global batch fails the contract.
    """
    if n < world_size + 1:
        raise ValueError(f"n={n} is too small for an uneven split over {world_size} ranks; use n >= {world_size + 1}")
    base, extra = divmod(n - 1, world_size)
    sizes = [base + (1 if r < extra else 0) for r in range(world_size)]
    sizes[0] += 1
    return tuple(sizes)


def _shards(n: int, splits: Sequence[int]) -> list[Shard]:
    starts = [sum(splits[:r]) for r in range(len(splits))]
    return [Shard(r, len(splits), slice(s, s + k), n) for r, (s, k) in enumerate(zip(starts, splits))]


def _contract_worker(rank: int, world: int, fn: Callable[..., Any], n: int, splits: tuple[int, ...], args: tuple):
    return fn(_shards(n, splits)[rank], *args)


def assert_tree_close(got: Any, want: Any, *, rtol: float, atol: float, what: str) -> None:
    """``torch.testing.assert_close`` over nested dicts / lists / tuples of tensors; other leaves must be equal."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{what}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_tree_close(got[k], want[k], rtol=rtol, atol=atol, what=f"{what}[{k!r}]")
    elif isinstance(want, list | tuple):
        assert isinstance(got, list | tuple) and len(got) == len(want), f"{what}: length differs"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_tree_close(g, w, rtol=rtol, atol=atol, what=f"{what}[{i}]")
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
    else:
        assert got == want, f"{what}: {got!r} != {want!r}"


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, list | tuple):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    return torch.cat(parts)


@dataclass
class ContractRun:
    """What :func:`ddp_contract` computed: every rank's result (``ranks``) and the single-process one (``full``)."""

    ranks: list[dict[str, Any]]
    full: dict[str, Any]
    splits: tuple[int, ...]


def ddp_contract(
    fn: Callable[..., dict[str, Any]],
    n: int,
    *args: Any,
    world_size: int = 2,
    splits: Sequence[int] | None = None,
    same: Sequence[str] | None = None,
    concat: Sequence[str] = (),
    rtol: float = 1e-5,
    atol: float = 1e-8,
) -> ContractRun:
    """Check METHODS.md's global-batch contract: W gloo ranks holding shares of a batch == one process holding all.

    ``fn(shard, *args) -> dict`` computes on the rows ``shard.rows`` of a global batch of ``n`` samples (built the
    same way, e.g. from a seeded generator, in every process) and returns named results (tensors or nested
    dicts / lists / tuples of them). It runs on ``world_size`` spawned gloo ranks with ``splits`` rows each (default
    :func:`uneven_splits`), and once in this process on all rows (``Shard(0, 1, slice(0, n), n)``). Then:

    * every key in ``same`` (default: every key not in ``concat``) must equal the single-process value on every
      rank: the loss, and parameter gradients after :func:`ddp_average_grads` (a no-op in one process);
    * every key in ``concat`` (per-sample outputs, input gradients) concatenated over ranks in rank order must
      equal the single-process value. A rank returning the global loss gets ``world`` times its rows' input
      gradient (DDP's averaging divides it out): divide by ``shard.world`` inside ``fn``.

    ``fn`` must be defined at module level (it is pickled to the ranks). Keys in neither list are returned for
    further checks (e.g. a rank-local variant that must differ). Returns a :class:`ContractRun`.
    """
    sizes = tuple(splits) if splits is not None else uneven_splits(n, world_size)
    if len(sizes) != world_size or sum(sizes) != n or min(sizes) < 0:
        raise ValueError(f"splits {sizes} must give {world_size} non-negative sizes summing to n={n}")
    ranks = run_distributed(_contract_worker, world_size, fn, n, sizes, args)
    full = fn(Shard(0, 1, slice(0, n), n), *args)
    concat = tuple(concat)
    same = tuple(k for k in full if k not in concat) if same is None else tuple(same)
    for key in same:
        for r, res in enumerate(ranks):
            assert_tree_close(res[key], full[key], rtol=rtol, atol=atol, what=f"{key!r} on rank {r} of {world_size}")
    for key in concat:
        got = _concat([res[key] for res in ranks])
        assert_tree_close(got, full[key], rtol=rtol, atol=atol, what=f"{key!r} concatenated over {world_size} ranks")
    return ContractRun(ranks=ranks, full=full, splits=sizes)
