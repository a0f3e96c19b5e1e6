"""The gradient-exact collectives of batchmates.distributed on 2 gloo ranks: values and gradients."""

from __future__ import annotations

import torch

from batchmates import distributed as bdist
from batchmates.testing import ddp_average_grads, run_distributed

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


def _worker(rank: int, world: int) -> dict:
    x, w = _data()
    rows = _rows(rank)
    out: dict = {
        "world": bdist.world_size(),
        "rank": bdist.rank(),
        "is_dist": bdist.is_distributed(),
        "count": bdist.global_count(SIZES[rank]),
        "slice": bdist.local_slice(SIZES[rank]),
    }
    # gather: forward values (uneven), integer tensors, no-grad path
    out["gathered"] = bdist.gather(x[rows])
    out["gathered_int"] = bdist.gather(torch.arange(SIZES[rank]) + 100 * rank)

    # gather with gradient through a model
    model = _model()
    xs = x[rows].clone().requires_grad_(True)
    loss = _global_gather_objective(bdist.gather(model(xs)), w)
    loss.backward()
    ddp_average_grads(model)
    out["gather_loss"] = loss.detach()
    out["gather_grads"] = [p.grad for p in model.parameters()]
    out["gather_xgrad"] = xs.grad

    # all_reduce_sum / all_reduce_mean with gradient
    model = _model()
    xs = x[rows].clone().requires_grad_(True)
    h = model(xs)
    s1 = bdist.all_reduce_sum(h.sum(0))
    s2 = bdist.all_reduce_sum((h**2).sum(0))
    loss = _global_stats_objective(s1, s2, sum(SIZES))
    loss.backward()
    ddp_average_grads(model)
    out["reduce_loss"] = loss.detach()
    out["reduce_grads"] = [p.grad for p in model.parameters()]
    out["mean"] = bdist.all_reduce_mean(torch.tensor([float(rank + 1)]))
    t = torch.tensor([2.0 * (rank + 1)], requires_grad=True)
    bdist.all_reduce_mean(t).sum().backward()
    out["mean_grad"] = t.grad
    return out


def test_collectives_values_and_gradients():
    results = run_distributed(_worker, 2)
    x, w = _data()

    model = _model()
    ref_gather = _global_gather_objective(model(x), w)
    ref_gather.backward()
    gather_grads = [p.grad for p in model.parameters()]
    xs = x.clone().requires_grad_(True)
    _global_gather_objective(_model()(xs), w).backward()

    model = _model()
    h = model(x)
    ref_reduce = _global_stats_objective(h.sum(0), (h**2).sum(0), sum(SIZES))
    ref_reduce.backward()
    reduce_grads = [p.grad for p in model.parameters()]

    for r, res in enumerate(results):
        assert (res["world"], res["rank"], res["is_dist"], res["count"]) == (2, r, True, sum(SIZES))
        assert res["slice"] == _rows(r)
        torch.testing.assert_close(res["gathered"], x)
        assert res["gathered_int"].tolist() == [0, 1, 2, 100, 101, 102, 103, 104]
        torch.testing.assert_close(res["gather_loss"], ref_gather.detach(), rtol=1e-5, atol=1e-8)
        for a, b in zip(res["gather_grads"], gather_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
        # each rank returns the global objective: its raw input gradient is W x the true one; DDP averages it away
        torch.testing.assert_close(res["gather_xgrad"] / 2, xs.grad[_rows(r)], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(res["reduce_loss"], ref_reduce.detach(), rtol=1e-5, atol=1e-8)
        for a, b in zip(res["reduce_grads"], reduce_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(res["mean"], torch.tensor([1.5]))
        # d/dt_r of the mean on every rank, summed over the 2 ranks' outputs: 2 * 1/2 = 1
        torch.testing.assert_close(res["mean_grad"], torch.tensor([1.0]))


def test_single_process_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert not bdist.is_distributed() and bdist.world_size() == 1 and bdist.rank() == 0
    assert bdist.gather(x) is x and bdist.all_reduce_sum(x) is x
    torch.testing.assert_close(bdist.all_reduce_mean(x), x)
    assert bdist.local_slice(3) == slice(0, 3) and bdist.global_count(3) == 3
