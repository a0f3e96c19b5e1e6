"""Class Batch Attention (Her et al. 2024, arXiv:2407.04218): maths, contract and global-batch semantics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from batchmates.nn.class_batch_attention import ClassBatchAttention, class_batch_attention, resolve_cba_scale
from batchmates.testing import Shard, ddp_average_grads

torch.set_num_threads(1)
D64 = torch.float64


def _qkv(b: int = 5, k: int = 3, e: int = 7, seed: int = 0, dtype=D64, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, k, e, generator=g, dtype=dtype) * spread
    kk = torch.randn(b, k, e, generator=g, dtype=dtype) * spread
    v = torch.randn(b, k, generator=g, dtype=dtype) * 3
    return q, kk, v


def _loop_reference(q, k, v, scale):
    """Independent reference: the paper's per-class loop, written out with explicit softmax."""
    b, n_cls, _ = q.shape
    out = torch.empty(b, n_cls, dtype=q.dtype)
    for c in range(n_cls):
        s = (q[:, c, :] * scale) @ k[:, c, :].T  # [B, B]
        w = torch.exp(s - s.max(dim=1, keepdim=True).values)
        w = w / w.sum(dim=1, keepdim=True)
        out[:, c] = w @ v[:, c]
    return out


# ---------------------------------------------------------------- shapes and maths


def test_shapes_and_bt_is_cba_plus_v():
    q, k, v = _qkv(b=6, k=4, e=9)
    cba, bt = ClassBatchAttention()(q, k, v)
    assert cba.shape == bt.shape == (6, 4)
    torch.testing.assert_close(bt, cba + v, rtol=0, atol=0)
    # the functional form accepts a key/value set of another size (e.g. gathered from all ranks)
    assert class_batch_attention(q[:2], k, v).shape == (2, 4)


def test_scale_is_one_over_sqrt_k_and_differs_from_sqrt_e():
    q, k, v = _qkv(b=6, k=3, e=10, seed=1, spread=2.0)  # K != E
    ref = _loop_reference(q, k, v, 1 / math.sqrt(3))
    cba, _ = ClassBatchAttention()(q, k, v)
    torch.testing.assert_close(cba, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(class_batch_attention(q, k, v), ref, rtol=1e-12, atol=1e-12)

    cba_e, _ = ClassBatchAttention(scale="sqrt_e")(q, k, v)
    torch.testing.assert_close(cba_e, _loop_reference(q, k, v, 1 / math.sqrt(10)), rtol=1e-12, atol=1e-12)
    assert (cba_e - cba).abs().max() > 1e-3
    # a float is a multiplier of q k^T
    torch.testing.assert_close(ClassBatchAttention(scale=0.25)(q, k, v)[0], _loop_reference(q, k, v, 0.25))
    assert resolve_cba_scale("sqrt_k", 16, 4) == 0.25 and resolve_cba_scale("sqrt_e", 16, 4) == 0.5


def test_batch_size_one_gives_v_exactly():
    q, k, v = _qkv(b=1, k=5, e=4, spread=50.0)
    for dtype in (torch.float32, D64):
        cba, bt = ClassBatchAttention().train()(q.to(dtype), k.to(dtype), v.to(dtype))
        assert torch.equal(cba, v.to(dtype))
        assert torch.equal(bt, 2 * v.to(dtype))


def test_identical_samples_give_v():
    q, k, v = _qkv(b=1, k=4, e=6, seed=3, spread=5.0)
    rep = lambda x: x.expand(7, *x.shape[1:]).clone()
    cba, _ = ClassBatchAttention()(rep(q), rep(k), rep(v))
    torch.testing.assert_close(cba, rep(v), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("seed,spread", [(0, 1.0), (1, 10.0), (2, 1e3), (3, 1e-6)])
def test_outputs_within_value_range_per_class(seed, spread):
    q, k, v = _qkv(b=9, k=5, e=3, seed=seed, spread=spread)
    cba, _ = ClassBatchAttention()(q, k, v)
    assert torch.isfinite(cba).all()
    lo, hi = v.min(dim=0).values, v.max(dim=0).values
    assert (cba >= lo - 1e-12).all() and (cba <= hi + 1e-12).all()
    if spread >= 10:  # sharp attention: not just a mean; the check above must bind
        assert (cba - v.mean(dim=0)).abs().max() > 1e-2


def test_classes_are_independent():
    q, k, v = _qkv(b=6, k=4, e=5, seed=4)
    cba0, _ = ClassBatchAttention()(q, k, v)
    for name in ("q", "k", "v"):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        t = {"q": q2, "k": k2, "v": v2}[name]
        t[:, 2] += torch.randn_like(t[:, 2])
        cba1, _ = ClassBatchAttention()(q2, k2, v2)
        changed = (cba1 - cba0).abs().amax(dim=0) > 1e-9
        assert changed.tolist() == [False, False, True, False], name


def test_batch_permutation_equivariance_in_training():
    q, k, v = _qkv(b=8, k=3, e=4, seed=5, spread=2.0)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    m = ClassBatchAttention().train()
    cba, bt = m(q, k, v)
    cba_p, bt_p = m(q[perm], k[perm], v[perm])
    torch.testing.assert_close(cba_p, cba[perm], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bt_p, bt[perm], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- eval modes and gradients


def test_independent_eval_ignores_batch_mates_and_equals_batch_size_one():
    q, k, v = _qkv(b=6, k=3, e=4, seed=6, spread=3.0)
    q2, k2, v2 = _qkv(b=6, k=3, e=4, seed=7, spread=3.0)
    m = ClassBatchAttention().eval()
    cba_a, bt_a = m(q, k, v)
    q2[0], k2[0], v2[0] = q[0], k[0], v[0]  # same sample 0, different batch mates
    cba_b, bt_b = m(q2, k2, v2)
    assert torch.equal(cba_a[0], cba_b[0]) and torch.equal(bt_a[0], bt_b[0])
    cba_1, bt_1 = m.train()(q[:1], k[:1], v[:1])  # batch-size-1 behaviour
    assert torch.equal(cba_a[:1], cba_1) and torch.equal(bt_a[:1], bt_1)


def test_batch_eval_mode_keeps_attending():
    q, k, v = _qkv(b=6, k=3, e=4, seed=8, spread=3.0)
    train_out = ClassBatchAttention(eval_mode="batch").train()(q, k, v)[0]
    eval_out = ClassBatchAttention(eval_mode="batch").eval()(q, k, v)[0]
    torch.testing.assert_close(eval_out, train_out, rtol=0, atol=0)
    assert (eval_out - v).abs().max() > 1e-3


def _grads_of_sample0(m: nn.Module):
    q, k, v = (t.requires_grad_() for t in _qkv(b=5, k=3, e=4, seed=9, spread=2.0))
    cba, bt = m(q, k, v)
    (cba[0].sum() + bt[0].sum()).backward()
    return [(t.grad if t.grad is not None else torch.zeros_like(t)) for t in (q, k, v)]


def test_gradient_across_samples_nonzero_in_training_zero_in_independent_eval():
    gq, gk, gv = _grads_of_sample0(ClassBatchAttention().train())
    assert gk[1:].abs().sum() > 0 and gv[1:].abs().sum() > 0 and gq[0].abs().sum() > 0
    gq, gk, gv = _grads_of_sample0(ClassBatchAttention().eval())
    assert torch.count_nonzero(gq) == 0 and torch.count_nonzero(gk) == 0
    assert torch.count_nonzero(gv[1:]) == 0 and (gv[0] == 3).all()  # d(cba + bt)/dv = 1 + 2


def test_sdpa_backend_matches_einsum_values_and_gradients():
    q, k, v = _qkv(b=6, k=3, e=5, seed=14, spread=2.0)
    outs = []
    for backend in ("einsum", "sdpa"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        cba, bt = ClassBatchAttention(backend=backend)(qq, kk, vv)
        (cba.square().sum() + bt.sum()).backward()
        outs.append([cba.detach(), qq.grad, kk.grad, vv.grad])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(class_batch_attention(q[:2], k, v, backend="sdpa"), outs[0][0][:2])
    with pytest.raises(ValueError, match="backend"):
        ClassBatchAttention(backend="flash")


def test_gradcheck():
    q, k, v = (t.requires_grad_() for t in _qkv(b=4, k=2, e=3, seed=10))
    assert torch.autograd.gradcheck(lambda a, b, c: class_batch_attention(a, b, c), (q, k, v))


# ---------------------------------------------------------------- precision, validation


def test_bf16_autocast_is_finite_and_float32():
    q, k, v = _qkv(b=6, k=3, e=8, seed=11, dtype=torch.float32, spread=30.0)  # scores far beyond bf16/fp16 exp range
    torch.manual_seed(0)  # unseeded, about 1 init in 4 put the bf16 matmul rounding above the tolerance
    lin = nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cba, bt = ClassBatchAttention()(lin(q), lin(k), v.bfloat16())
    assert cba.dtype == torch.float32 and torch.isfinite(cba).all() and torch.isfinite(bt).all()
    ref, _ = ClassBatchAttention()(lin(q).bfloat16().float(), lin(k).bfloat16().float(), v.bfloat16().float())
    torch.testing.assert_close(cba, ref, rtol=1e-4, atol=1e-4)


def test_half_inputs_without_autocast_do_not_overflow():
    q, k, v = _qkv(b=4, k=2, e=4, seed=12, dtype=torch.float16, spread=40.0)
    cba, _ = ClassBatchAttention()(q, k, v)
    assert cba.dtype == torch.float32 and torch.isfinite(cba).all()


@pytest.mark.parametrize(
    "shapes,match",
    [
        (((4, 3, 5), (4, 3, 6), (4, 3)), "agree in classes K and tokens E"),
        (((4, 3, 5), (4, 2, 5), (4, 3)), "agree in classes K"),
        (((4, 3, 5), (3, 3, 5), (4, 3)), "same batch size"),
        (((4, 3, 5), (4, 3, 5), (4, 2)), "v must have shape"),
        (((4, 3, 5), (4, 3, 5), (4, 3, 1)), r"v must have shape \[B, K\]"),
        (((4, 3), (4, 3, 5), (4, 3)), r"q must have shape \[B, K, E\]"),
        (((0, 3, 5), (0, 3, 5), (0, 3)), "empty"),
    ],
)
def test_bad_shapes_raise(shapes, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        ClassBatchAttention()(q, k, v)


def test_bad_values_and_options_raise():
    q, k, v = _qkv()
    v[1, 1] = float("nan")
    with pytest.raises(ValueError, match="v contains NaN or Inf"):
        ClassBatchAttention()(q, k, v)
    with pytest.raises(TypeError, match="floating-point"):
        ClassBatchAttention()(q, k, torch.ones(5, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        class_batch_attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="sqrt_k"):
        ClassBatchAttention(scale="sqrt_d")
    with pytest.raises(ValueError, match="positive finite"):
        ClassBatchAttention(scale=-1.0)
    with pytest.raises(ValueError, match="eval_mode"):
        ClassBatchAttention(eval_mode="test")


# ---------------------------------------------------------------- global batch under torch.distributed


class _QKVNet(nn.Module):
    """A tiny module producing q, k, v from per-sample inputs, so parameter gradients can be compared."""

    def __init__(self, d: int = 4, n_cls: int = 3, e: int = 5) -> None:
        super().__init__()
        self.n_cls, self.e = n_cls, e
        self.q = nn.Linear(d, n_cls * e)
        self.k = nn.Linear(d, n_cls * e)
        self.v = nn.Linear(d, n_cls)

    def forward(self, x):
        return self.q(x).view(-1, self.n_cls, self.e), self.k(x).view(-1, self.n_cls, self.e), self.v(x)


def _cba_shard(shard: Shard, x, w1, w2):
    """Global objective L = sum_b (w1*cba + w2*bt)[b] / B (the same value on every rank)."""
    from batchmates import distributed

    rows = shard.rows
    torch.manual_seed(0)
    net = _QKVNet().double()
    x = x[rows].clone().requires_grad_()
    q, k, v = net(x)
    for t in (q, k, v):
        t.retain_grad()
    cba, bt = ClassBatchAttention()(q, k, v)
    local = (w1[rows] * cba + w2[rows] * bt).sum()
    loss = distributed.all_reduce_sum(local) / distributed.global_count(x.shape[0])
    loss.backward()
    ddp_average_grads(net)
    world = shard.world
    return {
        "loss": loss.detach(),
        "cba": cba.detach(),
        "bt": bt.detach(),
        # input-side gradients carry the factor W that DDP's parameter averaging later divides out
        "gq": q.grad / world, "gk": k.grad / world, "gv": v.grad / world, "gx": x.grad / world,
        "params": {n: p.grad.clone() for n, p in net.named_parameters()},
    }


def test_distributed_equivalence_two_gloo_ranks(ddp_contract):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=D64) * 2
    w1, w2 = torch.randn(6, 3, generator=g, dtype=D64), torch.randn(6, 3, generator=g, dtype=D64)
    run = ddp_contract(
        _cba_shard, 6, x, w1, w2, concat=("cba", "bt", "gq", "gk", "gv", "gx"), rtol=1e-5, atol=1e-5
    )
    # the rank-local attention would differ: the test can fail if gathering is dropped
    local_only = ClassBatchAttention(gather=False)
    torch.manual_seed(0)
    q, k, v = _QKVNet().double()(x)
    assert (local_only(q[:3], k[:3], v[:3])[0] - run.full["cba"][:3]).abs().max() > 1e-6


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_fp16_autocast_finite():
    q, k, v = _qkv(b=64, k=10, e=16, seed=13, spread=3.0)
    ref = _loop_reference(q, k, v, 1 / math.sqrt(10))
    cba, _ = ClassBatchAttention()(q.cuda(), k.cuda(), v.cuda())
    torch.testing.assert_close(cba.cpu(), ref, rtol=1e-10, atol=1e-10)
    with torch.autocast("cuda", dtype=torch.float16):
        cba16, bt16 = ClassBatchAttention()((q * 20).float().cuda(), (k * 20).float().cuda(), v.float().cuda())
    assert cba16.dtype == torch.float32 and torch.isfinite(cba16).all() and torch.isfinite(bt16).all()
    qc, kc, vc = (t.float().cuda().requires_grad_() for t in (q, k, v))
    grads = []
    for backend in ("einsum", "sdpa"):
        out, _ = ClassBatchAttention(backend=backend)(qc, kc, vc)
        grads.append([out.detach(), *torch.autograd.grad(out.square().sum(), (qc, kc, vc))])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
