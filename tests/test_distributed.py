"""The gradient-exact collectives of batchmates.distributed on 2 gloo ranks: values and gradients."""

from __future__ import annotations

import pytest
import torch

from batchmates import distributed as bdist
from batchmates.testing import Shard, ddp_average_grads

torch.set_num_threads(1)

SIZES = (3, 5)  # uneven on purpose


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SIZES), 4, generator=g, dtype=torch.float64)
    w = torch.randn(sum(SIZES), 4, generator=g, dtype=torch.float64)
    return x, w


def _rows(rank: int) -> slice:
    start = sum(SIZES[:rank])
    return slice(start, start + SIZES[rank])


def _model():
    torch.manual_seed(1)
    return torch.nn.Linear(4, 4).double()


def _global_gather_objective(h_all, w):
    # non-linear in the whole batch: a softmax over the batch axis weighted by w
    return (torch.softmax(h_all, dim=0) * w).sum() + (h_all**2).mean()


def _global_stats_objective(s1, s2, n):
    mean = s1 / n
    var = s2 / n - mean**2
    return (var.log() * mean).sum()


def _collectives(shard: Shard) -> dict:
    x, w = _data()
    rows = shard.rows
    out: dict = {
        "world": bdist.world_size(),
        "rank": bdist.rank(),
        "is_dist": bdist.is_distributed(),
        "count": bdist.global_count(shard.size),
        "slice": bdist.local_slice(shard.size),
    }
    # gather: forward values (uneven), integer tensors, no-grad path
    out["gathered"] = bdist.gather(x[rows])
    out["gathered_int"] = bdist.gather(torch.arange(shard.size) + 100 * shard.rank)

    # gather with gradient through a model
    model = _model()
    xs = x[rows].clone().requires_grad_(True)
    loss = _global_gather_objective(bdist.gather(model(xs)), w)
    loss.backward()
    ddp_average_grads(model)
    out["gather_loss"] = loss.detach()
    out["gather_grads"] = [p.grad for p in model.parameters()]
    # each rank returns the global objective: its raw input gradient is W x the true one; DDP averages it away
    out["gather_xgrad"] = xs.grad / shard.world

    # all_reduce_sum / all_reduce_mean with gradient
    model = _model()
    h = model(x[rows])
    s1 = bdist.all_reduce_sum(h.sum(0))
    s2 = bdist.all_reduce_sum((h**2).sum(0))
    loss = _global_stats_objective(s1, s2, sum(SIZES))
    loss.backward()
    ddp_average_grads(model)
    out["reduce_loss"] = loss.detach()
    out["reduce_grads"] = [p.grad for p in model.parameters()]
    out["mean"] = bdist.all_reduce_mean(torch.tensor([float(shard.rank + 1)]))
    t = torch.tensor([2.0 * (shard.rank + 1)], requires_grad=True)
    bdist.all_reduce_mean(t).sum().backward()
    out["mean_grad"] = t.grad
    return out


def test_collectives_values_and_gradients(ddp_contract):
    # the gathered values, the objectives and their parameter gradients equal one process on the whole batch
    run = ddp_contract(
        _collectives,
        sum(SIZES),
        splits=SIZES,
        same=("gathered", "gather_loss", "gather_grads", "reduce_loss", "reduce_grads"),
        concat=("gather_xgrad",),
    )
    x, _ = _data()
    torch.testing.assert_close(run.full["gathered"], x)
    for r, res in enumerate(run.ranks):
        assert (res["world"], res["rank"], res["is_dist"], res["count"]) == (2, r, True, sum(SIZES))
        assert res["slice"] == _rows(r)
        assert res["gathered_int"].tolist() == [0, 1, 2, 100, 101, 102, 103, 104]
        torch.testing.assert_close(res["mean"], torch.tensor([1.5]))
        # d/dt_r of the mean on every rank, summed over the 2 ranks' outputs: 2 * 1/2 = 1
        torch.testing.assert_close(res["mean_grad"], torch.tensor([1.0]))


def test_single_process_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert not bdist.is_distributed() and bdist.world_size() == 1 and bdist.rank() == 0
    assert bdist.gather(x) is x and bdist.all_reduce_sum(x) is x
    torch.testing.assert_close(bdist.all_reduce_mean(x), x)
    assert bdist.local_slice(3) == slice(0, 3) and bdist.global_count(3) == 3


def _local_mean(shard: Shard) -> dict:
    x, _ = _data()
    return {"loss": x[shard.rows].mean()}  # the rank-local mean: what the contract exists to catch


def _global_mean(shard: Shard) -> dict:
    x, _ = _data()
    return {"loss": bdist.all_reduce_sum(x[shard.rows].sum()) / bdist.global_count(shard.size)}


def test_contract_fixture_catches_a_rank_local_mean(ddp_contract):
    with pytest.raises(AssertionError, match="'loss' on rank 0 of 2"):
        ddp_contract(_local_mean, 8)
    run = ddp_contract(_global_mean, 8)
    assert run.splits == (5, 3)  # uneven by default
