"""CC-Loss (channel correlation loss, METHODS.md Sec. 7): per-class-sum form vs pairwise references."""

from __future__ import annotations

import pytest
import torch

from batchmates.losses.cc_loss import CCLoss, cc_loss
from batchmates.testing import Shard, ddp_average_grads

torch.set_num_threads(1)
F64 = torch.float64


def _naive(a: torch.Tensor, y: torch.Tensor, form: str = "difference", margin: float = 0.1, eps: float = 1e-6):
    """The B x B pairwise definition: d_ij = ||a_i - a_j||^2 / C, means over same / different-class pairs."""
    n, c = a.shape
    d = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1) / c
    same = y[:, None] == y[None, :]
    off = ~torch.eye(n, dtype=torch.bool)
    intra_m, inter_m = same & off, ~same
    intra = d[intra_m].mean() if intra_m.any() else a.new_zeros(())
    inter = d[inter_m].mean() if inter_m.any() else a.new_zeros(())
    if form == "difference":
        return intra - inter
    if form == "ratio":
        return intra / (inter + eps) if inter_m.any() else intra
    return intra + (torch.relu(margin - inter) if inter_m.any() else 0.0)


def _attn(n: int, c: int, seed: int, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.sigmoid(torch.randn(n, c, generator=g, dtype=dtype)).requires_grad_()


def _labels(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("form", ["difference", "ratio", "margin"])
@pytest.mark.parametrize("n,c,k,seed", [(24, 9, 4, 0), (17, 5, 7, 1), (40, 3, 2, 2)])
def test_matches_naive_value_and_gradient(form, n, c, k, seed):
    a, y = _attn(n, c, seed), _labels(n, k, seed + 100)
    margin = 0.5  # large enough that the hinge is active for sigmoid(randn) vectors
    ref = _naive(a, y, form, margin=margin)
    (ref_grad,) = torch.autograd.grad(ref, a)
    ours = cc_loss(a, y, form, margin=margin)
    (grad,) = torch.autograd.grad(ours, a)
    assert ours.dtype == F64 and ours.shape == ()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_hand_computed():
    a = [[0.1, 0.9], [0.2, 0.7], [0.8, 0.3], [0.6, 0.6]]
    y = [0, 0, 1, 0]
    intra, n_intra, inter, n_inter = 0.0, 0, 0.0, 0
    for i in range(4):
        for j in range(4):
            if i == j:
                continue
            d = sum((a[i][t] - a[j][t]) ** 2 for t in range(2)) / 2
            if y[i] == y[j]:
                intra, n_intra = intra + d, n_intra + 1
            else:
                inter, n_inter = inter + d, n_inter + 1
    expected = intra / n_intra - inter / n_inter
    got = CCLoss()(torch.tensor(a, dtype=F64), torch.tensor(y))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_finite_when_vectors_coincide():
    a = _attn(6, 4, 3).detach().clone()
    a[1] = a[0]  # same class, identical
    a[5] = a[2]  # different classes, identical
    a.requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    for form in ["difference", "ratio", "margin"]:
        loss = cc_loss(a, y, form)
        (g,) = torch.autograd.grad(loss, a)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
        torch.testing.assert_close(loss, _naive(a, y, form))
    same = a.detach()[:1].repeat(4, 1).requires_grad_()
    loss = cc_loss(same, torch.tensor([0, 0, 1, 1]))
    (g,) = torch.autograd.grad(loss, same)
    assert loss.item() == pytest.approx(0.0, abs=1e-15) and torch.isfinite(g).all()


def test_one_class_inter_term_is_zero():
    a, y = _attn(10, 6, 4), torch.full((10,), 3)
    n, c = a.shape
    d = ((a[:, None] - a[None]) ** 2).sum(-1) / c
    intra = d.sum() / (n * (n - 1))
    for form in ["difference", "ratio", "margin"]:
        torch.testing.assert_close(cc_loss(a, y, form), intra, rtol=1e-10, atol=1e-12)


def test_all_classes_distinct_intra_term_is_zero():
    a, y = _attn(8, 5, 5), torch.randperm(8, generator=torch.Generator().manual_seed(0)) * 3
    d = ((a[:, None] - a[None]) ** 2).sum(-1) / 5
    inter = d.sum() / (8 * 7)
    torch.testing.assert_close(cc_loss(a, y), -inter, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cc_loss(a, y, "ratio"), torch.zeros((), dtype=F64), rtol=0, atol=1e-12)


def test_batch_of_one_is_zero_with_zero_grad():
    a = _attn(1, 4, 6)
    loss = cc_loss(a, torch.tensor([2]))
    (g,) = torch.autograd.grad(loss, a)
    assert loss.item() == 0.0 and torch.count_nonzero(g) == 0


def test_permutation_invariant():
    a, y = _attn(20, 7, 7), _labels(20, 5, 8)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(cc_loss(a[perm], y[perm]), cc_loss(a, y), rtol=1e-12, atol=1e-14)


def test_label_ids_need_not_be_contiguous_and_num_classes():
    a, y = _attn(12, 4, 9), _labels(12, 3, 10)
    sparse = torch.tensor([5, 1000, 77])[y]
    torch.testing.assert_close(cc_loss(a, sparse), cc_loss(a, y))
    torch.testing.assert_close(cc_loss(a, y, num_classes=10), cc_loss(a, y))
    with pytest.raises(ValueError, match="num_classes=2"):
        cc_loss(a, y, num_classes=2)


def test_float32_precision_and_autocast():
    a64, y = _attn(256, 64, 11), _labels(256, 10, 12)
    ref = _naive(a64.detach(), y)
    ours32 = cc_loss(a64.detach().float(), y)
    assert ours32.dtype == torch.float32
    assert ours32.item() == pytest.approx(ref.item(), abs=1e-6)
    for half in [torch.bfloat16, torch.float16]:
        ah = a64.detach().to(half).requires_grad_()
        with torch.autocast("cpu", dtype=half):
            loss = cc_loss(ah, y)
        (g,) = torch.autograd.grad(loss, ah)
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(g).all()
        assert loss.item() == pytest.approx(_naive(ah.detach().to(F64), y).item(), abs=1e-6)


# Bounds: for gates in (0, 1) every d_ij = ||a_i - a_j||^2 / C lies in [0, 1), so "difference" lies in (-1, 1)
# (the closed [-1, 1] once gates saturate to exactly 0 or 1 in floating point).
def _bounds_case(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n, c, k = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in [(1, 65), (1, 33), (1, 6)])
    y = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, c, generator=g, dtype=F64) * (1.0, 10.0, 40.0, 200.0)[seed % 4]  # 200: saturated
    if seed % 2:  # class-aligned extremes: even classes near 1, odd classes near 0 (the value nears -1)
        logits = logits.abs() * (1 - 2 * (y % 2)).to(F64)[:, None]
    return torch.sigmoid(logits), y


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_difference_form_lies_in_minus_one_one(dtype):
    values = []
    for seed in range(300):
        a, y = _bounds_case(seed)
        v = cc_loss(a.to(dtype), y).item()
        assert -1.0 <= v <= 1.0, f"seed {seed}: {v}"
        if seed % 10 == 0:
            assert v == pytest.approx(_naive(a, y).item(), abs=1e-5)
        values.append(v)
    assert min(values) < -0.99  # the lower bound is approached, so the term is bounded, not small
    # Two classes at opposite gate values d: intra 0, inter (1 - 2 delta)^2, tending to -1 as delta -> 0.
    for delta in [0.25, 1e-3, 1e-8]:
        a = torch.tensor([[1 - delta] * 4, [1 - delta] * 4, [delta] * 4], dtype=F64)
        v = cc_loss(a, torch.tensor([0, 0, 1])).item()
        assert v == pytest.approx(-((1 - 2 * delta) ** 2), rel=1e-12) and v > -1


def test_validation():
    a, y = _attn(6, 4, 13).detach(), _labels(6, 3, 14)
    with pytest.raises(ValueError, match="labels has 5 entries but attention has 6 rows"):
        cc_loss(a, y[:5])
    with pytest.raises(ValueError, match="shape \\[N, C\\]"):
        cc_loss(a[None], y)
    with pytest.raises(ValueError, match="labels must have shape \\[N\\]"):
        cc_loss(a, y[:, None])
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        cc_loss(a * 3 - 1, y)
    with pytest.raises(ValueError, match="NaN"):
        cc_loss(torch.where(a > 0.5, float("nan"), a), y)
    with pytest.raises(ValueError, match="non-negative"):
        cc_loss(a, y - 5)
    with pytest.raises(TypeError, match="integer"):
        cc_loss(a, y.float())
    with pytest.raises(TypeError, match="floating-point"):
        cc_loss(y[:, None].repeat(1, 4), y)
    with pytest.raises(ValueError, match="form"):
        CCLoss("sum")
    with pytest.raises(ValueError, match="form"):
        cc_loss(a, y, "sum")


# ----------------------------------------------------------------------------------------------------------------
# Distributed equivalence: 2 gloo ranks with 5 samples each vs one process (value, parameter and input grads)
# ----------------------------------------------------------------------------------------------------------------
N, D_IN, C = 10, 5, 6
# class 3 lives only on rank 0, class 4 only on rank 1, classes 0-2 are split across ranks
LABELS = torch.tensor([0, 1, 3, 2, 0, 1, 4, 2, 0, 4])


def _cc_shard(shard: Shard) -> dict:
    torch.manual_seed(0)
    layer = torch.nn.Linear(D_IN, C).double()
    rows = shard.rows
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(1), dtype=F64)[rows].requires_grad_()
    out = {}
    for form in ["difference", "ratio", "margin"]:
        layer.zero_grad()
        x.grad = None
        loss = CCLoss(form, margin=0.5)(torch.sigmoid(layer(x)), LABELS[rows])
        loss.backward()
        ddp_average_grads(layer)
        out[form] = (loss.detach(), layer.weight.grad.clone(), layer.bias.grad.clone())
        # each rank's input gradient is W x its rows' share of the global gradient (DDP averages parameters)
        out[f"{form} input grad"] = x.grad / shard.world
    return out


def test_distributed_equivalence(ddp_contract):
    forms = ["difference", "ratio", "margin"]
    run = ddp_contract(
        _cc_shard, N, splits=(5, 5), same=forms, concat=[f"{f} input grad" for f in forms], rtol=1e-5, atol=1e-5
    )
    # the global statistics matter: a rank on its own would give another value
    assert not torch.isclose(run.ranks[0]["difference"][0], _local_value())


def _local_value() -> torch.Tensor:
    torch.manual_seed(0)
    layer = torch.nn.Linear(D_IN, C).double()
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(1), dtype=F64)[:5]
    with torch.no_grad():
        return cc_loss(torch.sigmoid(layer(x)), LABELS[:5])
