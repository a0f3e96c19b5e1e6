"""Barlow Twins: lightly parity, hand-computed value, Gram == cross form, properties, precision, DDP."""

from __future__ import annotations

import math

import pytest
import torch

from batchmates.losses import BarlowTwinsLoss, barlow_twins_loss
from batchmates.testing import Shard, ddp_average_grads

torch.set_num_threads(1)


def _pair(n: int, d: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=dtype)
    b = a + 0.5 * torch.randn(n, d, generator=g, dtype=dtype)
    return a, b


def _hand_barlow(za, zb, lam, eps=1e-5):
    """Explicit loops: BatchNorm-style standardisation (biased var), C = ẑ_aᵀ ẑ_b / N, eq. 1-2 of arXiv:2103.03230."""
    n, d = len(za), len(za[0])

    def standardise(z):
        out = [[0.0] * d for _ in range(n)]
        for k in range(d):
            mean = sum(z[i][k] for i in range(n)) / n
            var = sum((z[i][k] - mean) ** 2 for i in range(n)) / n
            for i in range(n):
                out[i][k] = (z[i][k] - mean) / math.sqrt(var + eps)
        return out

    a, b = standardise(za), standardise(zb)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k][i] * b[k][j] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lam * c * c
    return loss


# ---------------------------------------------------------------- reference parity


@pytest.mark.parametrize("n,d", [(8, 5), (4, 32), (16, 16), (3, 2)])
@pytest.mark.parametrize("algorithm", ["auto", "cross", "gram"])
def test_matches_lightly(n, d, algorithm):
    from lightly.loss import BarlowTwinsLoss as LightlyBT

    a, b = _pair(n, d, seed=n * d)
    a.requires_grad_(True)
    b.requires_grad_(True)
    # lightly normalises with F.batch_norm(training=True): biased variance, eps 1e-5, exactly like ours
    ref = LightlyBT(lambda_param=0.0051)(a, b)
    ours = barlow_twins_loss(a, b, algorithm=algorithm)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    for g1, g2 in zip(torch.autograd.grad(ours, (a, b)), torch.autograd.grad(ref, (a, b))):
        torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)


def test_tiny_case_against_explicit_loops():
    za = [[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]]
    zb = [[0.0, 1.0], [2.0, 2.0], [-1.0, 0.5]]
    expected = _hand_barlow(za, zb, lam=0.3)
    ours = barlow_twins_loss(torch.tensor(za, dtype=torch.float64), torch.tensor(zb, dtype=torch.float64),
                             lambda_param=0.3)
    assert ours.item() == pytest.approx(expected, rel=1e-12)


def test_perfectly_correlated_views_give_only_redundancy_term():
    a, _ = _pair(64, 3, seed=1)
    loss = barlow_twins_loss(a, 2 * a + 1, lambda_param=0.0, eps=0.0)  # identical after standardisation
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_gram_equals_cross_float32_and_grads():
    a, b = _pair(12, 40, seed=2, dtype=torch.float32)
    a.requires_grad_(True)
    b.requires_grad_(True)
    cross = barlow_twins_loss(a, b, algorithm="cross")
    gram = barlow_twins_loss(a, b, algorithm="gram")
    torch.testing.assert_close(gram, cross, rtol=1e-5, atol=1e-5)
    for g1, g2 in zip(torch.autograd.grad(gram, (a, b)), torch.autograd.grad(cross, (a, b))):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- properties


def test_permutation_invariance_and_pairing_matters():
    a, b = _pair(10, 6, seed=3)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(4))
    base = barlow_twins_loss(a, b)
    torch.testing.assert_close(barlow_twins_loss(a[perm], b[perm]), base, rtol=1e-12, atol=1e-12)
    assert abs(barlow_twins_loss(a[perm], b).item() - base.item()) > 1e-3  # breaking the pairing changes it


def test_module_options():
    a, b = _pair(8, 4, seed=5)
    assert BarlowTwinsLoss().lambda_param == 0.0051
    torch.testing.assert_close(BarlowTwinsLoss(scale_loss=0.25)(a, b), 0.25 * BarlowTwinsLoss()(a, b))
    lam0 = BarlowTwinsLoss(lambda_param=0.0)(a, b)
    lam1 = BarlowTwinsLoss(lambda_param=1.0)(a, b)
    assert lam1.item() > lam0.item()


def test_constant_feature_is_finite():
    a, b = _pair(6, 4, seed=6)
    a[:, 1] = 3.0  # zero variance: standardised to 0 by eps, not NaN
    a.requires_grad_(True)
    loss = barlow_twins_loss(a, b)
    (grad,) = torch.autograd.grad(loss, a)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_batch_of_one_raises():
    with pytest.raises(ValueError, match="at least 2 samples"):
        barlow_twins_loss(torch.randn(1, 4), torch.randn(1, 4))


@pytest.mark.parametrize(
    "za,zb,exc,match",
    [
        (torch.randn(4), torch.randn(4), ValueError, r"\[N, D\]"),
        (torch.randn(4, 3, 2), torch.randn(4, 3, 2), ValueError, r"\[N, D\]"),
        (torch.randn(4, 3), torch.randn(5, 3), ValueError, "same shape"),
        (torch.randn(4, 3), torch.randn(4, 2), ValueError, "same shape"),
        (torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long), TypeError, "floating-point"),
        ([[1.0]], torch.randn(1, 1), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise(za, zb, exc, match):
    with pytest.raises(exc, match=match):
        barlow_twins_loss(za, zb)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_raises(bad):
    a, b = _pair(4, 3)
    b[2, 0] = bad
    with pytest.raises(ValueError, match="z_b contains NaN or inf"):
        barlow_twins_loss(a, b)


def test_bad_options_raise():
    a, b = _pair(4, 3)
    with pytest.raises(ValueError, match="lambda_param"):
        BarlowTwinsLoss(lambda_param=-1.0)
    with pytest.raises(ValueError, match="algorithm"):
        barlow_twins_loss(a, b, algorithm="fast")


# ---------------------------------------------------------------- precision


def test_autocast_bf16_and_half_inputs():
    a32, b32 = _pair(32, 24, seed=7, dtype=torch.float32)
    ref = barlow_twins_loss(a32, b32)
    lin = torch.nn.Linear(24, 24)
    torch.nn.init.eye_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        za, zb = lin(a32), lin(b32)
        assert za.dtype == torch.bfloat16
        loss = barlow_twins_loss(za, zb)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(lin.weight.grad).all()
    assert loss.item() == pytest.approx(ref.item(), rel=5e-2)
    for dtype in (torch.float16, torch.bfloat16):
        ah, bh = (a32 * 300).to(dtype).requires_grad_(True), (b32 * 300).to(dtype)  # 300² overflows fp16 sums
        out = barlow_twins_loss(ah, bh)
        (gh,) = torch.autograd.grad(out, ah)
        assert torch.isfinite(out) and torch.isfinite(gh.float()).all() and gh.dtype == dtype
        assert out.item() == pytest.approx(ref.item(), rel=5e-2)


# ---------------------------------------------------------------- distributed equivalence


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(5, 7).double()


def _data():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    return x, x + 0.3 * torch.randn(9, 5, generator=g, dtype=torch.float64)


def _loss(xa, xb, **kw):
    model = _model()
    xa = xa.clone().requires_grad_(True)
    loss = barlow_twins_loss(model(xa), model(xb), **kw)
    loss.backward()
    return model, xa, loss


def _barlow_shard(shard: Shard) -> dict:
    xa, xb = _data()
    rows = shard.rows
    model, xs, loss = _loss(xa[rows], xb[rows])
    ddp_average_grads(model)
    out = {"loss": loss.detach(), "grads": [p.grad for p in model.parameters()], "xgrad": xs.grad / shard.world}
    out["local"] = _loss(xa[rows], xb[rows], gather=False)[2].detach()
    try:
        barlow_twins_loss(torch.randn(1, 3), torch.randn(1, 3)) if shard.rank == 0 else barlow_twins_loss(
            torch.randn(0, 3), torch.randn(0, 3))
        out["n1"] = "no error"
    except ValueError as e:
        out["n1"] = str(e)
    return out


def test_distributed_equivalence(ddp_contract):
    run = ddp_contract(_barlow_shard, 9, same=("loss", "grads"), concat=("xgrad",))
    assert run.splits == (5, 4)
    xa, xb = _data()
    assert all("at least 2 samples in the global batch" in res["n1"] for res in run.ranks)
    torch.testing.assert_close(run.ranks[0]["local"], _loss(xa[:5], xb[:5])[2].detach())
    assert abs(run.ranks[0]["local"].item() - run.full["loss"].item()) > 1e-3


# ---------------------------------------------------------------- benchmark smoke


def test_bench_quick_runs():
    from batchmates.bench.barlow_twins import run

    rows = run("cpu", quick=True)
    assert {"ours", "ours-cross", "lightly"} <= {r.impl for r in rows}
    assert all(math.isfinite(r.time_ms) for r in rows if not r.extra)
