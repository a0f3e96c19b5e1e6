"""Batch-level curation (batchmates.curation.batch): the batch FRD against scipy, regularisation when N < D, the
threshold / running-quantile / re-augment logic, exact state round trip, the global score and decision on 2 gloo
ranks, and the skip mechanism (zero loss connected to the parameters, gradients dropped) under DDP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from batchmates.curation import BatchCurator, batch_frd, gaussian_frechet_distance, global_batch_frd
from batchmates.testing import Shard, run_distributed

torch.set_num_threads(1)


def scipy_frd(x: np.ndarray, y: np.ndarray, eps: float = 0.0) -> float:
    """Independent reference: numpy covariances (+ eps I), scipy.linalg.sqrtm of the product, float64."""
    d = x.shape[1]
    s1 = np.cov(x, rowvar=False) + eps * np.eye(d)
    s2 = np.cov(y, rowvar=False) + eps * np.eye(d)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def views(n: int, d: int, seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix
    y = x + scale * torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.1 * scale
    return x, y


# ------------------------------------------------------------------------------------------------ the score
@pytest.mark.parametrize(("n", "d"), [(300, 16), (40, 64), (12, 200)])
def test_batch_frd_matches_scipy_reference(n, d):
    """Backbone + projector spaces: the score is the sum of the per-space Gaussian FRDs, each equal to scipy's
    (regularised by eps I exactly when n <= d; n + m < d takes the low-rank route)."""
    h1, h2 = views(n, d, seed=d)
    z1, z2 = views(n, 8, seed=d + 1, scale=0.5)
    eps = 1e-6
    ref_h = scipy_frd(h1.numpy(), h2.numpy(), eps if n <= d else 0.0)
    ref_z = scipy_frd(z1.numpy(), z2.numpy(), eps if n <= 8 else 0.0)
    got = batch_frd([(h1, h2), (z1, z2)], eps=eps)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert got.item() == pytest.approx(ref_h + ref_z, rel=1e-6)
    assert gaussian_frechet_distance(h1, h2, eps=eps).item() == pytest.approx(ref_h, rel=1e-6)
    # float32 features are scored in float64
    assert batch_frd([(h1.float(), h2.float())], eps=eps).item() == pytest.approx(
        scipy_frd(h1.float().double().numpy(), h2.float().double().numpy(), eps if n <= d else 0.0), rel=1e-6)


def test_regularised_small_batch_is_finite_and_low_rank_route_equals_dense():
    """N < D: the covariances are singular; eps I makes the value well defined and finite, and the low-rank
    evaluation used when N + M < D equals the dense D x D evaluation of the same regularised formula."""
    from batchmates.curation.frechet import _trace_sqrt_product, _trace_sqrt_product_lowrank

    x, y = views(10, 300, seed=3)
    d = gaussian_frechet_distance(x, y)
    assert torch.isfinite(d) and d.item() > 0
    assert gaussian_frechet_distance(x, x).item() == pytest.approx(0.0, abs=1e-6)
    a = (x - x.mean(0)) / 3.0
    b = (y - y.mean(0)) / 3.0
    eye = torch.eye(300, dtype=torch.float64)
    # (with eps = 1e-6 the dense route's eigenvalues near eps² carry round-off of about 1e-14 each, hence rel 1e-7)
    for eps, rel in ((1e-6, 1e-7), (1e-2, 1e-10)):
        dense = _trace_sqrt_product(a.T @ a + eps * eye, b.T @ b + eps * eye)
        low = _trace_sqrt_product_lowrank(a, b, eps)
        assert low.item() == pytest.approx(dense.item(), rel=rel)
    # a larger eps moves the value (the regularisation is really applied)
    assert gaussian_frechet_distance(x, y, eps=1e-1).item() != pytest.approx(d.item(), rel=1e-6)


def test_batch_frd_validation():
    x, y = views(6, 4, seed=0)
    with pytest.raises(ValueError, match="non-empty list"):
        batch_frd([])
    with pytest.raises(ValueError, match="same samples"):
        batch_frd([(x, y[:5])])
    with pytest.raises(TypeError, match="torch.Tensor"):
        batch_frd([(x, y.numpy())])
    with pytest.raises(ValueError, match="at least 2 rows"):
        batch_frd([(x[:1], y[:1])])


# ------------------------------------------------------------------------------------------------ the decision
def test_absolute_threshold_and_skip():
    bc = BatchCurator("skip", threshold=2.0)
    assert [bc.decide(s) for s in (1.0, 2.0, 2.5, 0.1)] == ["accept", "accept", "skip", "accept"]
    assert bc.batches == 4 and bc.skipped == 1 and bc.last_stats["fraction_skipped_total"] == 0.25
    with pytest.raises(ValueError, match="attempt"):
        bc.decide(3.0, attempt=1)  # skip has no second draw


def test_running_quantile_with_warmup_and_window():
    bc = BatchCurator("skip", quantile=0.5, window=4, warmup=3)
    # warm-up: the first 3 batches are kept whatever they score, and recorded
    assert [bc.decide(s) for s in (5.0, 1.0, 3.0)] == ["accept"] * 3
    assert bc.current_threshold() == 3.0  # ceil(0.5 * 3) = 2nd smallest of {5, 1, 3}
    assert bc.decide(4.0) == "skip" and bc.last_stats["threshold"] == 3.0
    # the window now holds {5, 1, 3, 4}: threshold = 2nd smallest = 3; 4 stays recorded although skipped
    assert bc.current_threshold() == 3.0
    assert bc.decide(2.0) == "accept"  # window -> {1, 3, 4, 2} (5 evicted): threshold 2
    assert bc.current_threshold() == 2.0
    assert bc.decide(2.5) == "skip"
    # an independent recomputation of the rule over a longer random sequence
    rng = np.random.default_rng(0)
    scores = rng.gamma(2.0, size=200)
    bc = BatchCurator("skip", quantile=0.8, window=50, warmup=10)
    for i, s in enumerate(scores):
        past = scores[max(0, i - 50) : i]
        if len(past) < 10:
            expected = "accept"
        else:
            thr = np.sort(past)[math.ceil(0.8 * len(past)) - 1]
            expected = "accept" if s <= thr else "skip"
        assert bc.decide(float(s)) == expected, i
    assert 0.1 < bc.skipped / 200 < 0.3  # about 1 - q of the batches


def test_reaugment_retries_then_skips_and_records_first_draws_only():
    bc = BatchCurator("reaugment", quantile=0.5, window=10, warmup=2, max_resample=2)
    bc.decide(1.0)
    bc.decide(3.0)  # warm-up done: threshold = 1.0
    assert bc.decide(5.0, attempt=0) == "retry"
    assert bc.decide(4.0, attempt=1) == "retry"
    assert bc.decide(0.5, attempt=2) == "accept" and bc.last_stats["draws"] == 3
    assert bc.last_stats["first_score"] == 5.0 and bc.last_stats["score"] == 0.5
    assert bc.state_dict()["scores"] == [1.0, 3.0, 5.0]  # redraws are not recorded
    assert bc.decide(9.0) == "retry" and bc.decide(9.0, attempt=1) == "retry"
    assert bc.decide(9.0, attempt=2) == "skip"  # still bad after max_resample new draws
    assert bc.skipped == 1 and bc.redraws == 4
    with pytest.raises(ValueError, match="attempt"):
        bc.decide(1.0, attempt=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of threshold"),
        ({"threshold": 1.0, "quantile": 0.5}, "exactly one of threshold"),
        ({"policy": "drop", "threshold": 1.0}, "policy must be 'skip' or 'reaugment'"),
        ({"quantile": 0.0}, "quantile must be in"),
        ({"threshold": float("inf")}, "threshold must be a finite"),
        ({"quantile": 0.5, "window": 0}, "window must be"),
        ({"quantile": 0.5, "window": 5, "warmup": 6}, "warmup must be"),
        ({"threshold": 1.0, "max_resample": 0}, "max_resample"),
    ],
)
def test_batch_curator_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchCurator(**kwargs)


def test_non_finite_score_is_an_error():
    with pytest.raises(ValueError, match="NaN/Inf"):
        BatchCurator(threshold=1.0).decide(float("nan"))


def test_state_dict_round_trip_resumes_exactly():
    rng = np.random.default_rng(1)
    scores = rng.gamma(2.0, size=60).tolist()
    ref = BatchCurator("reaugment", quantile=0.7, window=16, warmup=5, max_resample=1)

    def run(bc: BatchCurator, seq: list[float]) -> list[str]:
        out = []
        for s in seq:
            d = bc.decide(s)
            if d == "retry":
                d = bc.decide(s * 0.5, attempt=1)
            out.append(d)
        return out

    full = run(ref, scores)
    first = BatchCurator("reaugment", quantile=0.7, window=16, warmup=5, max_resample=1)
    head = run(first, scores[:25])
    resumed = BatchCurator("reaugment", quantile=0.7, window=16, warmup=5, max_resample=1)
    resumed.load_state_dict(first.state_dict())
    assert head + run(resumed, scores[25:]) == full
    assert resumed.state_dict() == ref.state_dict()
    fresh = BatchCurator("reaugment", quantile=0.7, window=16, warmup=5, max_resample=1)
    assert head + run(fresh, scores[25:]) != full  # without the state the decisions differ (the test can fail)
    with pytest.raises(ValueError, match="state_dict"):
        resumed.load_state_dict({"window": 3})


# ------------------------------------------------------------------------------------------------ distributed
STEPS, N_GLOBAL = 6, 12


def _step_features(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    h1, h2 = views(N_GLOBAL, 20, seed=100 + step, scale=0.3 + 0.2 * (step % 3))
    z1, z2 = views(N_GLOBAL, 6, seed=200 + step, scale=0.5)
    return [(h1, h2), (z1, z2)]


def _run_decisions(rows: slice | None) -> tuple[list[float], list[str]]:
    bc = BatchCurator("skip", quantile=0.5, window=4, warmup=2)
    scores, decisions = [], []
    for step in range(STEPS):
        spaces = _step_features(step)
        if rows is not None:
            spaces = [(f1[rows], f2[rows]) for f1, f2 in spaces]
        s = global_batch_frd(spaces)
        scores.append(s)
        decisions.append(bc.decide(s))
    return scores, decisions


def _decisions_shard(shard: Shard) -> dict:
    scores, decisions = _run_decisions(shard.rows)
    return {"scores": torch.tensor(scores, dtype=torch.float64), "decisions": decisions}


def test_global_batch_score_and_decision_on_two_gloo_ranks(ddp_contract):
    ref_scores, ref_decisions = _run_decisions(None)
    assert "skip" in ref_decisions and ref_decisions.count("accept") > 2  # the rule really decides
    # decisions (strings) must be equal, scores within rtol 1e-10 (atol 0, as numpy's assert_allclose)
    run = ddp_contract(_decisions_shard, N_GLOBAL, rtol=1e-10, atol=0.0)
    assert run.splits == (7, 5)  # uneven split of the global batch
    assert run.full["decisions"] == ref_decisions
    for res in run.ranks:
        assert res["decisions"] == ref_decisions
        np.testing.assert_allclose(res["scores"].numpy(), ref_scores, rtol=1e-10)
    assert torch.equal(run.ranks[0]["scores"], run.ranks[1]["scores"])  # bitwise the same score on every rank
    # a rank's own share scores differently: the score really is of the global batch
    own = slice(0, run.splits[0])
    half = batch_frd([(f1[own], f2[own]) for f1, f2 in _step_features(0)]).item()
    assert half != pytest.approx(ref_scores[0], rel=1e-3)


def _ddp_skip_worker(rank: int, world: int) -> dict:
    """A skipped step under torch DDP: the zero loss connected to every parameter runs DDP's all-reduce, the
    dropped gradients leave weights and optimiser state unchanged, and the next (normal) step works."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(rank))
    ddp(x).square().mean().backward()  # one normal step: momentum buffers exist
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    ddp(x)  # the training forward of a batch that is then skipped
    skip_loss = torch.stack([p.sum() for p in model.parameters()]).sum() * 0.0
    skip_loss.backward()
    reached = all(p.grad is not None for p in model.parameters())
    opt.zero_grad(set_to_none=True)  # what CurationMixin.on_before_optimizer_step does on a skipped step
    opt.step()
    unchanged = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    mom_unchanged = all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(), momentum))
    opt.zero_grad(set_to_none=True)
    ddp(x).square().mean().backward()  # DDP is not left waiting for a reduction
    opt.step()
    moved = not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    return {"reached": reached, "unchanged": unchanged, "momentum_unchanged": mom_unchanged, "moved": moved}


def test_skip_mechanism_under_ddp_leaves_weights_and_optimiser_state():
    for r in run_distributed(_ddp_skip_worker, 2):
        assert r == {"reached": True, "unchanged": True, "momentum_unchanged": True, "moved": True}
