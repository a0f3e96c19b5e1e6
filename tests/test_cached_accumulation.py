"""Cached (GradCache-style) accumulation equals the large batch: loss value and parameter gradients (float64)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from batchmates.losses import BarlowTwinsLoss, SupConLoss, cached_backward

N, D_IN = 12, 8


def _net(*extra: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 16), *extra, nn.Tanh(), nn.Linear(16, 6)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    return x1, x1 + 0.3 * torch.randn(N, D_IN, generator=g, dtype=torch.float64), torch.arange(N) % 3


def _grads(net: nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    return out


def _two_views(net):
    return lambda a, b: torch.stack([net(a), net(b)], dim=1)


@pytest.mark.parametrize("labelled", [True, False], ids=["supcon", "simclr"])
@pytest.mark.parametrize("micro", [1, 5, 12])
def test_equals_one_large_batch(labelled, micro) -> None:
    net = _net()
    x1, x2, y = _data()
    args = (y,) if labelled else ()
    loss_fn = SupConLoss(temperature=0.1, chunk_size=5)  # the chunked (memory-linear) path
    want = SupConLoss(temperature=0.1)(_two_views(net)(x1, x2), *args)
    want.backward()
    want_grads = _grads(net)
    got = cached_backward(_two_views(net), (x1, x2), loss_fn, micro_batch_size=micro, loss_args=args)
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    for g, w in zip(_grads(net), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_plain_accumulation_would_differ() -> None:
    """The reason for the cache: per-micro-batch losses see fewer negatives (a guard that the test data can tell)."""
    net = _net()
    x1, x2, y = _data()
    loss = SupConLoss(temperature=0.1)
    large = loss(_two_views(net)(x1, x2), y)
    plain = sum(loss(_two_views(net)(x1[i:i + 4], x2[i:i + 4]), y[i:i + 4]) for i in range(0, N, 4)) / 3
    assert abs(float(large.detach()) - float(plain.detach())) > 1e-2


def test_tuple_outputs_and_batch_statistics_loss() -> None:
    """Barlow Twins normalises over the batch: cached accumulation is still exact (two embedding outputs)."""
    net = _net()
    x1, x2, _ = _data()
    want = BarlowTwinsLoss()(net(x1), net(x2))
    want.backward()
    want_grads = _grads(net)
    got = cached_backward(lambda a, b: (net(a), net(b)), (x1, x2), BarlowTwinsLoss(), micro_batch_size=5)
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    for g, w in zip(_grads(net), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_loss_parameters_get_their_gradient() -> None:
    net, head = _net(), nn.Linear(6, 4, bias=False).double()
    x1, _, y = _data()

    def loss_fn(z, labels):
        return nn.functional.cross_entropy(head(z), labels % 4) + z.square().mean()

    want = loss_fn(net(x1), y)
    want.backward()
    want_net, want_head = _grads(net), _grads(head)
    cached_backward(net, x1, loss_fn, micro_batch_size=5, loss_args=(y,))
    for g, w in zip(_grads(net) + _grads(head), want_net + want_head):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def _sequential_reference(net, x1, x2, y, micro, seed):
    """The micro-batches run one after another in a single graph (same random draws, same BN statistics)."""
    torch.manual_seed(seed)
    z = torch.cat([_two_views(net)(x1[i:i + micro], x2[i:i + micro]) for i in range(0, N, micro)])
    loss = SupConLoss(temperature=0.1)(z, y)
    loss.backward()
    return loss.detach(), _grads(net)


@pytest.mark.parametrize("preserve_rng", [True, False])
def test_dropout_replays_its_random_draws(preserve_rng) -> None:
    net = _net(nn.Dropout(0.3)).train()
    x1, x2, y = _data()
    want, want_grads = _sequential_reference(net, x1, x2, y, 4, seed=7)
    torch.manual_seed(7)
    got = cached_backward(_two_views(net), (x1, x2), SupConLoss(temperature=0.1), micro_batch_size=4,
                          loss_args=(y,), preserve_rng=preserve_rng)
    torch.testing.assert_close(got, want)  # the first pass draws what the reference draws
    same = all(torch.allclose(g, w, rtol=1e-6, atol=1e-6) for g, w in zip(_grads(net), want_grads))
    assert same is preserve_rng  # without the replay the re-forward's masks differ and so do the gradients


@pytest.mark.parametrize("freeze", [True, False])
def test_batchnorm_sees_micro_batches_and_updates_once(freeze) -> None:
    net = _net(nn.BatchNorm1d(16)).train()
    x1, x2, y = _data()
    twin = _net(nn.BatchNorm1d(16)).train()
    want, want_grads = _sequential_reference(twin, x1, x2, y, 4, seed=0)
    got = cached_backward(_two_views(net), (x1, x2), SupConLoss(temperature=0.1), micro_batch_size=4,
                          loss_args=(y,), freeze_norm_stats=freeze, norm_modules=[net])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(_grads(net), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    bn, ref = net[1], twin[1]
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) * (1 if freeze else 2)
    assert torch.allclose(bn.running_mean, ref.running_mean) is freeze


def test_no_sync_wraps_all_but_the_last_backward() -> None:
    net = _net()
    x1, x2, y = _data()
    entered = []

    @contextlib.contextmanager
    def no_sync():
        entered.append(1)
        yield

    cached_backward(_two_views(net), (x1, x2), SupConLoss(), micro_batch_size=5, loss_args=(y,), no_sync=no_sync)
    assert len(entered) == 2  # 3 micro-batches (5, 5, 2)


def test_bad_arguments() -> None:
    net = _net()
    x1, x2, y = _data()
    with pytest.raises(ValueError, match="micro_batch_size"):
        cached_backward(net, x1, SupConLoss(), micro_batch_size=0)
    with pytest.raises(ValueError, match="share a non-empty batch dimension"):
        cached_backward(_two_views(net), (x1, x2[:3]), SupConLoss(), micro_batch_size=4)
    with pytest.raises(TypeError, match="tensor or a tuple of tensors"):
        cached_backward(lambda a: "z", x1, SupConLoss(), micro_batch_size=4)
    with pytest.raises(ValueError, match="scalar"):
        cached_backward(net, x1, lambda z: z.sum(1), micro_batch_size=4)
