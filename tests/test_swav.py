"""SwAV building blocks: Sinkhorn-Knopp, the swapped-prediction loss, prototypes and the queue (METHODS.md Sec. 5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import swav_loss as lightly_swav  # test-only reference (pip install -e .[dev])

from batchmates.losses.swav import SwAVLoss, SwAVPrototypes, SwAVQueue, sinkhorn_knopp, swav_loss
from batchmates.testing import Shard, ddp_average_grads, ddp_contract

torch.set_num_threads(1)
F64 = torch.float64


def _rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


# ----------------------------------------------------------------------------------------------------------------
# Hand-written references (explicit loops over python floats, the official algorithm step by step)
# ----------------------------------------------------------------------------------------------------------------
def _hand_sinkhorn(scores: list[list[float]], eps: float, iters: int) -> list[list[float]]:
    b, k = len(scores), len(scores[0])
    q = [[math.exp(scores[i][j] / eps) for j in range(k)] for i in range(b)]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        for j in range(k):  # each prototype's total -> 1/K
            col = sum(q[i][j] for i in range(b))
            for i in range(b):
                q[i][j] /= col * k
        for i in range(b):  # each sample's total -> 1/B
            row = sum(q[i])
            for j in range(k):
                q[i][j] /= row * b
    return [[v * b for v in row] for row in q]


def _hand_swav(high: list[list[list[float]]], low: list[list[list[float]]], tau: float, eps: float, iters: int):
    crops = high + low
    total = 0.0
    for i in range(len(high)):
        codes = _hand_sinkhorn(high[i], eps, iters)
        sub = 0.0
        for v in range(len(crops)):
            if v == i:
                continue
            ce = 0.0
            for b, row in enumerate(crops[v]):
                logz = math.log(sum(math.exp(x / tau) for x in row))
                ce -= sum(codes[b][j] * (row[j] / tau - logz) for j in range(len(row)))
            sub += ce / len(crops[v])
        total += sub / (len(crops) - 1)
    return total / len(high)


# ----------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps,iters,shape", [(0.05, 3, (16, 10)), (0.1, 1, (5, 12)), (0.5, 7, (9, 3))])
def test_sinkhorn_matches_lightly(eps, iters, shape):
    s = _rand(*shape, seed=1, scale=0.3)
    # lightly returns per-sample codes summing to 1 (its Q^T scaled by B), the convention of ours
    ref = lightly_swav.sinkhorn(s.clone(), iterations=iters, epsilon=eps)
    torch.testing.assert_close(ref.sum(1), torch.ones(shape[0], dtype=F64))
    ours = sinkhorn_knopp(s, epsilon=eps, iterations=iters)
    assert ours.dtype == F64
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_sinkhorn_hand_computed():
    s = [[0.1, -0.2], [0.3, 0.05], [-0.4, 0.2]]
    ours = sinkhorn_knopp(torch.tensor(s, dtype=F64), epsilon=0.5, iterations=2)
    torch.testing.assert_close(ours, torch.tensor(_hand_sinkhorn(s, 0.5, 2), dtype=F64), rtol=1e-12, atol=1e-14)


def test_sinkhorn_marginals():
    b, k = 64, 8
    s = F.normalize(_rand(b, 16, seed=2), dim=1) @ F.normalize(_rand(k, 16, seed=3), dim=1).t()
    converged = sinkhorn_knopp(s, epsilon=0.1, iterations=300)
    torch.testing.assert_close(converged.sum(1), torch.ones(b, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(converged.sum(0), torch.full((k,), b / k, dtype=F64), rtol=0, atol=1e-6)
    # 3 iterations: rows exact, columns much closer to B/K than the plain per-sample softmax.
    codes = sinkhorn_knopp(s, epsilon=0.1, iterations=3)
    torch.testing.assert_close(codes.sum(1), torch.ones(b, dtype=F64), rtol=0, atol=1e-12)
    dev3 = (codes.sum(0) - b / k).abs().max()
    dev0 = (torch.softmax(s / 0.1, 1).sum(0) - b / k).abs().max()
    assert dev3 < 0.25 * dev0


def test_sinkhorn_permutation_equivariant_and_no_grad():
    s = _rand(12, 7, seed=4).requires_grad_()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    codes = sinkhorn_knopp(s)
    assert not codes.requires_grad
    torch.testing.assert_close(sinkhorn_knopp(s[perm]), codes[perm], rtol=1e-12, atol=1e-14)
    assert s.grad is None and torch.equal(s, _rand(12, 7, seed=4))  # input untouched


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_sinkhorn_low_precision_under_autocast(half, scale):
    s = (torch.tanh(_rand(32, 20, seed=5)) * scale).to(half)
    if half == torch.float16:
        assert not torch.isfinite(torch.exp(s / 0.05)).all()  # the regime that overflows without care
    with torch.autocast("cpu", dtype=half):
        codes = sinkhorn_knopp(s, epsilon=0.05)
    assert codes.dtype == torch.float32 and torch.isfinite(codes).all()
    if scale == 1.0:  # cosine-range scores: float32 work loses nothing against float64 on the same values
        torch.testing.assert_close(codes.sum(1), torch.ones(32), rtol=0, atol=1e-5)
        ref = sinkhorn_knopp(s.to(F64), epsilon=0.05)
        torch.testing.assert_close(codes.to(F64), ref, rtol=0, atol=1e-5)
    codes64 = sinkhorn_knopp(s, epsilon=0.05, dtype=F64)
    assert codes64.dtype == F64


def test_sinkhorn_unnormalised_scores_do_not_overflow():
    s = _rand(10, 6, seed=6, scale=10.0)  # exp(s / 0.05) ~ e^600: still finite in float64 without the shift
    ref = lightly_swav.sinkhorn(s.clone(), epsilon=0.05)
    torch.testing.assert_close(sinkhorn_knopp(s, epsilon=0.05), ref, rtol=1e-9, atol=1e-12)
    huge = s * 10  # e^6000: the unshifted algorithm overflows even in float64
    assert not torch.isfinite(lightly_swav.sinkhorn(huge.clone(), epsilon=0.05)).all()
    codes = sinkhorn_knopp(huge, epsilon=0.05)
    assert torch.isfinite(codes).all() and (codes >= 0).all()


def test_sinkhorn_validation():
    with pytest.raises(ValueError, match="shape \\[B, K\\]"):
        sinkhorn_knopp(torch.randn(5))
    with pytest.raises(TypeError, match="floating-point"):
        sinkhorn_knopp(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(torch.randn(3, 4), epsilon=0.0)
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn_knopp(torch.randn(3, 4), iterations=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        sinkhorn_knopp(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(TypeError, match="dtype"):
        sinkhorn_knopp(torch.randn(3, 4), dtype=torch.float16)


def test_sinkhorn_batch_of_one():
    codes = sinkhorn_knopp(torch.tensor([[0.3, -0.1, 0.2]]))
    torch.testing.assert_close(codes.sum(1), torch.ones(1))
    assert torch.isfinite(codes).all()


# Scores that are not unit-scaled (issue 8): float32 must match float64, every row sums to 1, no row is dropped.
def _log_sinkhorn_ref(s: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """The official algorithm step by step (whole-matrix rewrites, total first), in float64 logs: no underflow."""
    q = s.to(F64) / eps
    b, k = q.shape
    q = q - torch.logsumexp(q.reshape(-1), 0)
    for _ in range(iters):
        q = q - torch.logsumexp(q, 0, keepdim=True) - math.log(k)  # each prototype's total -> 1/K
        q = q - torch.logsumexp(q, 1, keepdim=True) - math.log(b)  # each sample's total -> 1/B
    return torch.exp(q + math.log(b))


def _plain_float32_sinkhorn(s: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """The official algorithm in float32 on exp(scores / eps), max-shifted: what batchmates did before issue 8."""
    q = torch.exp((s.float() - s.float().max()) / eps)
    for _ in range(iters):
        q = q / q.sum(0, keepdim=True).clamp_min(1e-38)
        q = q / q.sum(1, keepdim=True).clamp_min(1e-38)
    return q


def test_log_sinkhorn_reference_matches_lightly():
    s = _rand(12, 9, seed=7, scale=0.5)
    torch.testing.assert_close(_log_sinkhorn_ref(s), lightly_swav.sinkhorn(s.clone()), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("std", [10.0, 100.0])
@pytest.mark.parametrize("shape", [(16, 3000), (64, 30)])
def test_sinkhorn_float32_matches_float64_for_wide_scores(std, shape):
    s = _rand(*shape, seed=8, scale=std)
    plain = _plain_float32_sinkhorn(s)
    assert (plain.sum(1) == 0).sum() >= shape[0] // 2  # the regime that used to drop most samples
    ref = _log_sinkhorn_ref(s)
    torch.testing.assert_close(ref.sum(1), torch.ones(shape[0], dtype=F64), rtol=0, atol=1e-12)
    codes = sinkhorn_knopp(s.float())
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes.sum(1), torch.ones(shape[0]), rtol=0, atol=1e-5)
    assert (codes.amax(1) > 1e-3).all()  # no zero (or vanishing) row
    torch.testing.assert_close(codes.to(F64), ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(sinkhorn_knopp(s), ref, rtol=0, atol=1e-10)  # float64 path, same maths


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("std", [10.0, 100.0])
def test_sinkhorn_wide_scores_under_autocast(half, std):
    s = _rand(32, 300, seed=9, scale=std).to(half)
    with torch.autocast("cpu", dtype=half):
        codes = sinkhorn_knopp(s)
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes.sum(1), torch.ones(32), rtol=0, atol=1e-5)
    torch.testing.assert_close(codes.to(F64), _log_sinkhorn_ref(s.to(F64)), rtol=0, atol=1e-4)


def test_swav_loss_float32_keeps_every_sample_of_wide_scores():
    crops = [_rand(16, 300, seed=110 + i, scale=10.0) for i in range(3)]
    # Reference: the swapped prediction written pair by pair, on the float64 log-domain codes.
    codes = [_log_sinkhorn_ref(c) for c in crops[:2]]
    logp = [torch.log_softmax(c / 0.1, 1) for c in crops]
    ref = sum(-(codes[i] * logp[v]).sum(1).mean() for i in range(2) for v in range(3) if v != i) / (2 * 2)
    loss32 = swav_loss([c.float() for c in crops[:2]], [crops[2].float()])
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(ref.item(), rel=1e-4)
    assert swav_loss(crops[:2], crops[2:]).item() == pytest.approx(ref.item(), rel=1e-10)


def test_sinkhorn_out_of_range_scores_raise_instead_of_dropping():
    # Row 1 lies 6e38 below each column's max: beyond float32 even before dividing by epsilon.
    s = torch.tensor([[3e38, 3e38, 1.0], [-3e38, -3e38, -3e38], [0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="non-finite codes for scores.*dtype=torch.float64"):
        sinkhorn_knopp(s)
    codes = sinkhorn_knopp(s, dtype=F64)
    torch.testing.assert_close(codes.sum(1), torch.ones(3, dtype=F64), rtol=0, atol=1e-12)
    # The reference loses the small scores next to 6e39 / eps unless each column is first shifted by its max,
    # which the first (prototype) normalisation absorbs exactly.
    s64 = s.to(F64)
    torch.testing.assert_close(codes, _log_sinkhorn_ref(s64 - s64.amax(0)), rtol=0, atol=1e-9)
    low = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="codes for high\\[1\\].*sinkhorn_dtype=torch.float64"):
        swav_loss([low, s], [low])
    assert torch.isnan(swav_loss([low, s], [low], validate=False))  # opted out of checks: loud NaN, never smaller
    assert torch.isfinite(swav_loss([low.double(), s.double()], [low.double()]))


# ----------------------------------------------------------------------------------------------------------------
# SwAV loss
# ----------------------------------------------------------------------------------------------------------------
def _crops(n: int, b: int, k: int, seed: int) -> list[torch.Tensor]:
    return [torch.tanh(_rand(b, k, seed=seed + i)).requires_grad_() for i in range(n)]


@pytest.mark.parametrize("with_queue", [False, True])
def test_swav_loss_matches_lightly_multicrop(with_queue):
    high, low = _crops(2, 8, 12, seed=10), _crops(3, 8, 12, seed=20)
    queue = [torch.tanh(_rand(16, 12, seed=30 + i)) for i in range(2)] if with_queue else None
    ref = lightly_swav.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)(high, low, queue)
    ref_grads = torch.autograd.grad(ref.sum(), high + low)
    ours = SwAVLoss(temperature=0.1, epsilon=0.05, sinkhorn_iterations=3)(high, low, queue_scores=queue)
    grads = torch.autograd.grad(ours, high + low)
    assert ours.shape == () and ours.dtype == F64
    torch.testing.assert_close(ours, ref.reshape(()), rtol=1e-10, atol=1e-12)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-12)


def test_swav_loss_queue_changes_codes():
    high, low = _crops(2, 4, 6, seed=40), _crops(1, 4, 6, seed=50)
    queue = [torch.tanh(_rand(8, 6, seed=60 + i)) * 3 for i in range(2)]
    assert not torch.isclose(swav_loss(high, low), swav_loss(high, low, queue))


def test_swav_loss_hand_computed():
    high = [[[0.2, -0.1, 0.4], [0.0, 0.3, -0.2]], [[0.1, 0.1, -0.3], [0.5, -0.4, 0.2]]]
    low = [[[-0.2, 0.3, 0.1], [0.2, 0.2, 0.0]]]
    ref = _hand_swav(high, low, tau=0.5, eps=0.3, iters=2)
    ours = swav_loss(
        [torch.tensor(h, dtype=F64) for h in high],
        [torch.tensor(v, dtype=F64) for v in low],
        temperature=0.5,
        epsilon=0.3,
        sinkhorn_iterations=2,
    )
    assert ours.item() == pytest.approx(ref, rel=1e-12)


def test_swav_loss_permutation_invariant():
    high, low = _crops(2, 10, 7, seed=70), _crops(2, 10, 7, seed=80)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    a = swav_loss(high, low)
    b = swav_loss([h[perm] for h in high], [v[perm] for v in low])
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_swav_loss_stacked_input_equals_list():
    high, low = _crops(2, 6, 5, seed=90), _crops(2, 6, 5, seed=95)
    torch.testing.assert_close(swav_loss(torch.stack(high), torch.stack(low)), swav_loss(high, low))


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_swav_loss_low_precision_under_autocast(half):
    enc = torch.nn.Linear(8, 16)
    protos = SwAVPrototypes(16, 30)
    x = [torch.randn(12, 8, generator=torch.Generator().manual_seed(i)) * 10 for i in range(4)]
    with torch.autocast("cpu", dtype=half):
        scores = protos([enc(v) for v in x])
        assert scores[0].dtype == half
        loss = SwAVLoss(epsilon=0.05)(scores[:2], scores[2:])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for p in [enc.weight, enc.bias, protos.weight]:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    ref = swav_loss([s.to(F64) for s in scores[:2]], [s.to(F64) for s in scores[2:]], epsilon=0.05)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)


def test_swav_loss_validation():
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(ValueError, match="at least one"):
        swav_loss([], [a, b])
    with pytest.raises(ValueError, match="at least 2 crops"):
        swav_loss([a])
    with pytest.raises(ValueError, match="same \\[B, K\\]"):
        swav_loss([a, torch.randn(5, 6)])
    with pytest.raises(ValueError, match="low\\[0\\] contains NaN"):
        swav_loss([a, b], [torch.full((4, 6), float("nan"))])
    with pytest.raises(ValueError, match="one \\[L, K\\] tensor per assignment crop"):
        swav_loss([a, b], queue_scores=[torch.randn(8, 6)])
    with pytest.raises(ValueError, match="prototype columns"):
        swav_loss([a, b], queue_scores=[torch.randn(8, 5), torch.randn(8, 5)])
    with pytest.raises(ValueError, match="temperature"):
        SwAVLoss(temperature=0)
    with pytest.raises(ValueError, match="shape \\[B, K\\]"):
        swav_loss([torch.randn(4), torch.randn(4)])


# ----------------------------------------------------------------------------------------------------------------
# Prototypes
# ----------------------------------------------------------------------------------------------------------------
def test_prototypes_no_bias_unit_rows_and_renormalised_after_step():
    protos = SwAVPrototypes(6, 9)
    assert protos.layer.bias is None
    torch.testing.assert_close(protos.weight.norm(dim=1), torch.ones(9))
    opt = torch.optim.SGD(protos.parameters(), lr=5.0)
    z = torch.randn(5, 6)
    protos(z).sum().backward()
    opt.step()
    assert not torch.allclose(protos.weight.norm(dim=1), torch.ones(9))  # the step broke the unit norm
    w_before = protos.weight.detach().clone()
    scores = protos(z)  # re-normalised before use
    torch.testing.assert_close(protos.weight.norm(dim=1), torch.ones(9))
    torch.testing.assert_close(scores, F.normalize(z, dim=1) @ F.normalize(w_before, dim=1).t())


def test_prototypes_several_forwards_per_step_then_backward():
    protos = SwAVPrototypes(6, 9)
    with torch.no_grad():
        protos.weight.mul_(3.0)  # e.g. after an optimiser step
    z1, z2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    s1 = protos(z1)
    s2 = protos(z2)  # must not modify the weight saved for s1's backward
    (s1.sum() + s2.pow(2).sum()).backward()
    assert z1.grad is not None and protos.weight.grad is not None
    w = protos.weight.detach()
    torch.testing.assert_close(w.norm(dim=1), torch.ones(9))
    torch.testing.assert_close(
        protos.weight.grad,
        torch.ones(4, 9).t() @ F.normalize(z1.detach(), dim=1)
        + (2 * s2.detach()).t() @ F.normalize(z2.detach(), dim=1),
    )


def test_prototypes_unnormalised_input():
    protos = SwAVPrototypes(5, 7)
    z = torch.randn(6, 5, dtype=torch.float32) * 7
    torch.testing.assert_close(protos(z), protos(F.normalize(z, dim=1)))  # default: normalised inside
    strict = SwAVPrototypes(5, 7, normalize_input=False)
    with pytest.raises(ValueError, match="L2-normalised"):
        strict(z)
    strict.load_state_dict(protos.state_dict())
    torch.testing.assert_close(strict(F.normalize(z, dim=1)), protos(z))
    with pytest.raises(ValueError, match="shape \\[N, 5\\]"):
        protos(torch.randn(3, 4))


def test_prototype_freezing_drops_prototype_grad_only():
    enc = torch.nn.Linear(4, 6)
    protos = SwAVPrototypes(6, 10, freeze_iterations=2)
    x = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for step, frozen in [(0, True), (1, True), (2, False)]:
        enc.zero_grad()
        protos.zero_grad()
        scores = protos([enc(v) for v in x])
        SwAVLoss()(scores[:2], scores[2:]).backward()
        assert protos.weight.grad is not None and protos.weight.grad.abs().sum() > 0
        assert protos.freeze_prototypes_if(step) is frozen
        assert (protos.weight.grad is None) is frozen
        assert enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0  # z still learns
    opt = torch.optim.SGD(protos.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1)
    w = protos.weight.detach().clone()
    protos.zero_grad()
    scores = protos([enc(v) for v in x])
    SwAVLoss()(scores[:2], scores[2:]).backward()
    protos.freeze_prototypes_if(0)
    opt.step()
    assert torch.equal(protos.weight, w)  # frozen: no gradient, no weight decay either


# ----------------------------------------------------------------------------------------------------------------
# Queue
# ----------------------------------------------------------------------------------------------------------------
def test_queue_used_only_when_full_and_newest_first():
    queue = SwAVQueue(length=6, dim=4, dtype=F64)
    protos = SwAVPrototypes(4, 5).double()
    batches = [[_rand(3, 4, seed=100 + 10 * t + c) for c in range(2)] for t in range(3)]
    assert queue.scores(protos) is None
    queue.enqueue(batches[0])
    assert not queue.is_full and queue.scores(protos) is None
    assert torch.count_nonzero(queue.embeddings[:, 3:]) == 0
    queue.enqueue(batches[1])
    assert queue.is_full
    queue.enqueue(batches[2])
    for c in range(2):
        expected = F.normalize(torch.cat([batches[2][c], batches[1][c]]), dim=1)
        torch.testing.assert_close(queue.embeddings[c], expected)
    scores = queue.scores(protos)
    assert len(scores) == 2 and not scores[0].requires_grad
    torch.testing.assert_close(scores[1], queue.embeddings[1] @ protos.weight.detach().t())
    state = queue.state_dict()
    assert set(state) == {"embeddings", "n_filled"}
    fresh = SwAVQueue(length=6, dim=4, dtype=F64)
    fresh.load_state_dict(state)
    assert fresh.is_full
    queue.reset()
    assert queue.scores(protos) is None


def test_queue_validation():
    queue = SwAVQueue(length=10, dim=4)
    with pytest.raises(ValueError, match="multiple of the global batch size 4"):
        queue.enqueue([torch.randn(4, 4), torch.randn(4, 4)])
    with pytest.raises(ValueError, match="2 crops"):
        queue.enqueue([torch.randn(5, 4)])
    with pytest.raises(ValueError, match="shape \\[B, 4\\]"):
        queue.enqueue([torch.randn(5, 3), torch.randn(5, 3)])
    with pytest.raises(ValueError, match="same batch size"):
        queue.enqueue([torch.randn(5, 4), torch.randn(2, 4)])
    with pytest.raises(ValueError, match="length"):
        SwAVQueue(length=0, dim=4)


# ----------------------------------------------------------------------------------------------------------------
# Distributed equivalence (2 gloo ranks on uneven shares of the batch vs one process with all of it)
# ----------------------------------------------------------------------------------------------------------------
B, D_IN, D, K, L = 8, 6, 5, 7, 16


def _swav_inputs():
    x = [_rand(B, D_IN, seed=200 + i) for i in range(4)]  # 2 high + 2 low crops
    past = [[_rand(B, D, seed=300 + 10 * t + c) for c in range(2)] for t in range(2)]
    raw = _rand(B, K, seed=400, scale=0.5)
    return x, past, raw


def _wide_crops() -> list[torch.Tensor]:
    """3 crops of float32 scores with std 10 (not unit-scaled): 2 high + 1 low."""
    return [_rand(B, K, seed=410 + i, scale=10.0).float() for i in range(3)]


def _swav_shard(shard: Shard):
    rows = shard.rows
    torch.manual_seed(0)
    enc = torch.nn.Linear(D_IN, D).double()
    protos = SwAVPrototypes(D, K).double()
    x, past, raw = _swav_inputs()
    out = {"codes": sinkhorn_knopp(raw[rows])}
    wide = [c[rows] for c in _wide_crops()]
    out["codes_wide"] = sinkhorn_knopp(wide[0])
    out["loss_wide"] = swav_loss(wide[:2], wide[2:])
    loss_fn = SwAVLoss()
    queue = SwAVQueue(L, D, dtype=F64)
    for batch in past:
        queue.enqueue([e[rows] for e in batch])
    out["queue_embeddings"] = queue.embeddings.clone()
    for name, use_queue in [("plain", False), ("queue", True)]:
        enc.zero_grad()
        protos.zero_grad()
        xs = [v[rows].clone().requires_grad_() for v in x]
        scores = protos([enc(v) for v in xs])
        qs = queue.scores(protos) if use_queue else None
        assert (qs is not None) == use_queue
        loss = loss_fn(scores[:2], scores[2:], queue_scores=qs)
        loss.backward()
        ddp_average_grads(enc)
        ddp_average_grads(protos)
        out[name] = {
            "loss": loss.detach(),
            "grads": [p.grad.clone() for p in [enc.weight, enc.bias, protos.weight]],
        }
        # Input gradients: rank r holds the gradient of its rows; DDP does not average inputs, so each rank's
        # gradient of the (global) loss, divided by W for DDP's averaging of the parameters' objective, matches.
        out[f"{name} input_grads"] = [v.grad.clone() / shard.world for v in xs]
    return out


_SWAV_CONCAT = ("codes", "codes_wide", "plain input_grads", "queue input_grads")


@pytest.fixture(scope="module")
def swav_distributed():
    """The contract, run once for the tests below: per-sample keys concatenated over the ranks, the rest equal on
    every rank to one process's (rtol = atol = 1e-5); the tests add the stricter per-key checks. Module-scoped, so
    it calls :func:`batchmates.testing.ddp_contract` itself with the conftest fixture's skip."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    run = ddp_contract(_swav_shard, B, concat=_SWAV_CONCAT, rtol=1e-5, atol=1e-5)
    assert run.splits == (5, 3)  # uneven: the queue length 16 is still a multiple of the global batch 8
    return run.ranks, run.full, run.splits


def test_distributed_sinkhorn_codes(swav_distributed):
    ranks, full, splits = swav_distributed
    torch.testing.assert_close(torch.cat([r["codes"] for r in ranks]), full["codes"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ranks[0]["codes"], sinkhorn_knopp(_swav_inputs()[2][: splits[0]], gather=False))


def test_distributed_sinkhorn_float32_wide_scores(swav_distributed):
    ranks, full, _ = swav_distributed
    wide = _wide_crops()
    codes = torch.cat([r["codes_wide"] for r in ranks])
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes.sum(1), torch.ones(B), rtol=0, atol=1e-5)
    torch.testing.assert_close(codes.to(F64), _log_sinkhorn_ref(wide[0].to(F64)), rtol=0, atol=1e-4)
    torch.testing.assert_close(codes, full["codes_wide"], rtol=0, atol=1e-5)
    ref = swav_loss([c.to(F64) for c in wide[:2]], [wide[2].to(F64)])
    for r in ranks:
        assert r["loss_wide"].item() == pytest.approx(full["loss_wide"].item(), rel=1e-5)
        assert r["loss_wide"].item() == pytest.approx(ref.item(), rel=1e-4)


@pytest.mark.parametrize("case", ["plain", "queue"])
def test_distributed_swav_loss(swav_distributed, case):
    ranks, full, _ = swav_distributed
    for r in ranks:
        torch.testing.assert_close(r[case]["loss"], full[case]["loss"], rtol=1e-5, atol=1e-5)
        for g, fg in zip(r[case]["grads"], full[case]["grads"]):
            torch.testing.assert_close(g, fg, rtol=1e-5, atol=1e-5)
    # Input gradients: rank r holds the gradient of its rows, divided by W on the rank (see _swav_shard).
    for v in range(4):
        got = torch.cat([r[f"{case} input_grads"][v] for r in ranks])
        torch.testing.assert_close(got, full[f"{case} input_grads"][v], rtol=1e-5, atol=1e-5)


def test_distributed_queue_identical_on_ranks(swav_distributed):
    ranks, full, _ = swav_distributed
    for r in ranks:
        torch.testing.assert_close(r["queue_embeddings"], full["queue_embeddings"], rtol=0, atol=0)
