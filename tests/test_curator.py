"""Curation (batchmates.curation.curator / scorer): policies, exactness of the curated loss, DDP semantics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchmates.curation import (
    CurationResult,
    Curator,
    FRDScorer,
    apply_curation,
    discrete_frechet_distance,
    gaussian_frechet_distance,
    weighted_mean,
)
from batchmates.distributed import gather
from batchmates.losses import BarlowTwinsLoss, SupConLoss
from batchmates.testing import Shard, ddp_average_grads

torch.set_num_threads(1)


def ntxent(z1: torch.Tensor, z2: torch.Tensor, weights: torch.Tensor | None = None, t: float = 0.5) -> torch.Tensor:
    """Test-local NT-Xent over the global batch (gradient-carrying gather), optional per-pair weights.

    Every rank returns the same global loss, so DDP-averaged gradients are the exact global gradient.
    """
    a, b = gather(z1), gather(z2)
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b]), dim=1)
    logits = (z @ z.T / t).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n) + n, torch.arange(n)])
    per_anchor = F.cross_entropy(logits, target, reduction="none")
    if weights is not None:
        w = gather(weights.to(per_anchor.dtype))
        per_anchor = per_anchor * torch.cat([w, w])
    return per_anchor.mean()


def sq_dist_scorer(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    return (x1 - x2).square().sum(1)


def make_pairs(n: int = 12, d: int = 6, bad: tuple[int, ...] = (3,), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x2 = x1 + 0.05 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    for i in bad:
        x2[i] = x1[i] + 3.0 * torch.randn(d, generator=gen, dtype=torch.float64)
    return x1, x2


def make_encoder(d: int = 6, out: int = 4) -> nn.Module:
    torch.manual_seed(123)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, out)).double()


def loss_and_grads(enc: nn.Module, x1, x2, rows=None, weights=None):
    enc.zero_grad()
    z1, z2 = enc(x1), enc(x2)
    if rows is not None:
        z1, z2 = z1[rows], z2[rows]
    loss = ntxent(z1, z2, weights)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in enc.parameters()]


# ---------------------------------------------------------------------------------------------- drop policy
def test_threshold_dropping_nothing_is_exactly_uncurated():
    x1, x2 = make_pairs()
    enc = make_encoder()
    ref_loss, ref_grads = loss_and_grads(enc, x1, x2)
    res = Curator(sq_dist_scorer, threshold=1e9).select(x1, x2)
    assert res.keep.all() and res.weights is None
    enc.zero_grad()
    k1, k2, w = apply_curation(enc(x1), enc(x2), res)
    assert w is None
    loss = ntxent(k1, k2)
    loss.backward()
    assert torch.equal(loss.detach(), ref_loss)
    for g, r in zip([p.grad for p in enc.parameters()], ref_grads):
        assert torch.equal(g, r)


def test_dropping_a_pair_removes_exactly_its_terms():
    x1, x2 = make_pairs(bad=(3,))
    scores = sq_dist_scorer(x1, x2)
    threshold = float(scores.sort().values[-2]) + 1e-9  # only the worst pair (3) is above it
    res = Curator(sq_dist_scorer, threshold=threshold).select(x1, x2)
    expected_keep = torch.ones(12, dtype=torch.bool)
    expected_keep[3] = False
    assert torch.equal(res.keep, expected_keep)
    assert res.stats["num_dropped"] == 1 and res.stats["fraction_dropped"] == pytest.approx(1 / 12)

    enc = make_encoder()
    # Reference: the batch built without pair 3, independently of the curation code.
    others = torch.tensor([i for i in range(12) if i != 3])
    ref_loss, ref_grads = loss_and_grads(enc, x1[others], x2[others])
    full_loss, _ = loss_and_grads(enc, x1, x2)

    enc.zero_grad()
    x1g = x1.clone().requires_grad_()
    z1, z2 = enc(x1g), enc(x2)
    k1, k2, _ = apply_curation(z1, z2, res)
    assert k1.shape == (11, 4)
    loss = ntxent(k1, k2)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-12, atol=1e-12)
    for p, r in zip(enc.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, r, rtol=1e-10, atol=1e-12)
    assert not torch.isclose(loss.detach(), full_loss)
    assert torch.count_nonzero(x1g.grad[3]) == 0 and torch.count_nonzero(x1g.grad[2]) > 0


@pytest.mark.parametrize(("n", "q", "kept"), [(20, 0.75, 15), (10, 0.7, 7), (16, 0.9, 15), (8, 1.0, 8)])
def test_quantile_drops_the_right_fraction(n, q, kept):
    gen = torch.Generator().manual_seed(n)
    x1 = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    x2 = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    scores = sq_dist_scorer(x1, x2)
    cur = Curator(sq_dist_scorer, quantile=q)
    res = cur.select(x1, x2)
    assert int(res.keep.sum()) == kept
    # the dropped pairs are exactly the highest-scoring ones
    worst = set(scores.argsort(descending=True)[: n - kept].tolist())
    assert set((~res.keep).nonzero().flatten().tolist()) == worst
    assert cur.last_stats["fraction_dropped"] == pytest.approx((n - kept) / n)
    assert cur.last_stats["mean_score"] == pytest.approx(float(scores.mean()))
    torch.testing.assert_close(res.scores, scores)


def test_never_drops_everything_and_running_totals():
    x1, x2 = make_pairs(n=6)
    scores = sq_dist_scorer(x1, x2)
    cur = Curator(sq_dist_scorer, threshold=-1.0)  # every pair is "bad"
    res = cur.select(x1, x2)
    assert int(res.keep.sum()) == 2
    assert set(res.keep.nonzero().flatten().tolist()) == set(scores.argsort()[:2].tolist())
    assert cur.last_stats["min_keep_applied"] == 1
    cur.select(x1, x2)
    assert cur.last_stats["steps"] == 2
    assert cur.last_stats["fraction_dropped_total"] == pytest.approx(4 / 6)
    # batch of one: kept, finite stats
    one = Curator(sq_dist_scorer, quantile=0.5).select(x1[:1], x2[:1])
    assert one.keep.tolist() == [True] and math.isfinite(one.stats["mean_score"])


# ------------------------------------------------------------------------------------------- reweight policy
def test_reweight_weights_positive_mean_one_monotone():
    gen = torch.Generator().manual_seed(11)
    x1 = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    x2 = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    scores = sq_dist_scorer(x1, x2)
    res = Curator(sq_dist_scorer, policy="reweight", temperature=0.5).select(x1, x2)
    w = res.weights
    assert res.keep.all() and w.shape == (16,) and (w > 0).all()
    assert float(w.double().mean()) == pytest.approx(1.0, abs=1e-6)
    order = scores.argsort()
    assert (w[order][1:] <= w[order][:-1]).all()  # higher score -> lower weight
    z = (scores - scores.mean()) / scores.std(unbiased=False)
    expected = torch.exp(-z / 0.5) / torch.exp(-z / 0.5).sum() * 16
    torch.testing.assert_close(w.double(), expected, rtol=1e-6, atol=1e-6)
    flat = Curator(sq_dist_scorer, policy="reweight", temperature=50.0).select(x1, x2).weights
    assert float(flat.max() - flat.min()) < float(w.max() - w.min())
    # weighted loss with all weights 1 equals the plain loss (the weighting is a mean, not a sum)
    enc = make_encoder(4)
    z1, z2 = enc(x1), enc(x2)
    torch.testing.assert_close(ntxent(z1, z2, torch.ones(16)), ntxent(z1, z2))


# ------------------------------------------------------------------------------------------- resample policy
def test_resample_calls_fn_only_for_bad_pairs():
    x1, x2 = make_pairs(n=10, bad=(2, 7))
    calls: list[list[int]] = []

    def resample_fn(idx):
        calls.append(idx.tolist())
        fresh2 = x1[idx] + 0.01  # pair 2 gets a good view, pair 7 stays bad
        fresh2[idx == 7] = x1[7] + 10.0
        return x1[idx].clone(), fresh2

    scores_calls = []

    def counting_scorer(a, b):
        scores_calls.append(a.shape[0])
        return sq_dist_scorer(a, b)

    cur = Curator(counting_scorer, policy="resample", threshold=1.0, max_resample=3)
    res = cur.select(x1, x2, resample_fn=resample_fn)
    assert calls == [[2, 7], [7], [7]]
    assert scores_calls == [10, 2, 1, 1]  # full batch once, then only the resampled pairs
    expected_keep = torch.ones(10, dtype=torch.bool)
    expected_keep[7] = False  # still bad after max_resample rounds: dropped
    assert torch.equal(res.keep, expected_keep)
    v1, v2 = res.views
    torch.testing.assert_close(v2[2], x1[2] + 0.01)
    assert torch.equal(v2[5], x2[5]) and torch.equal(x2[2], make_pairs(n=10, bad=(2, 7))[1][2])  # input untouched
    assert res.scores[2] < 1.0 and res.stats["resampled"] == 4 and res.stats["resample_rounds"] == 3

    # once all pairs are good no further call is made
    calls.clear()
    cur1 = Curator(sq_dist_scorer, policy="resample", quantile=1.0)
    cur1.select(x1, x2, resample_fn=resample_fn)
    assert calls == []


def test_resample_validates_fn_output():
    x1, x2 = make_pairs(n=6, bad=(1,))
    cur = Curator(sq_dist_scorer, policy="resample", threshold=1.0)
    with pytest.raises(ValueError, match="resample_fn must return"):
        cur.select(x1, x2, resample_fn=lambda idx: (x1[:3], x2[:3]))
    with pytest.raises(ValueError, match="needs resample_fn"):
        cur.select(x1, x2)


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"policy": "drop"}, "exactly one of threshold"),
        ({"policy": "drop", "threshold": 1.0, "quantile": 0.5}, "exactly one of threshold"),
        ({"policy": "reweight", "quantile": 0.5}, "reweight"),
        ({"policy": "nope", "threshold": 1.0}, "policy must be"),
        ({"quantile": 0.0}, "quantile must be"),
        ({"quantile": 1.5}, "quantile must be"),
        ({"policy": "reweight", "temperature": 0.0}, "temperature"),
        ({"policy": "resample", "threshold": 1.0, "max_resample": 0}, "max_resample"),
        ({"threshold": float("nan")}, "threshold must be"),
    ],
)
def test_curator_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Curator(sq_dist_scorer, **kwargs)


def test_select_and_apply_validation():
    x1, x2 = make_pairs(n=4)
    cur = Curator(sq_dist_scorer, threshold=1.0)
    with pytest.raises(ValueError, match="same batch size"):
        cur.select(x1, x2[:3])
    with pytest.raises(ValueError, match="one score per pair"):
        Curator(lambda a, b: torch.zeros(2), threshold=1.0).select(x1, x2)
    with pytest.raises(ValueError, match="NaN/Inf"):
        Curator(lambda a, b: torch.full((4,), float("nan")), threshold=1.0).select(x1, x2)
    res = cur.select(x1, x2)
    with pytest.raises(ValueError, match="covers 4 pairs"):
        apply_curation(torch.zeros(5, 2), torch.zeros(5, 2), res)
    with pytest.raises(TypeError, match="CurationResult"):
        apply_curation(x1, x2, {"keep": res.keep})
    with pytest.raises(TypeError, match="score_pairs"):
        Curator(42, threshold=1.0)


def test_select_scores_equals_select_on_the_same_scores():
    """Precomputed scores (the methods score their training forward's features) decide exactly as select."""
    x1, x2 = make_pairs(n=10, bad=(1, 6))
    scores = sq_dist_scorer(x1, x2)
    for kw in ({"policy": "drop", "quantile": 0.8}, {"policy": "reweight", "temperature": 0.5}):
        a = Curator(sq_dist_scorer, **kw).select(x1, x2)
        b = Curator(None, **kw).select_scores(scores)
        assert torch.equal(a.keep, b.keep) and a.stats == b.stats
        assert (a.weights is None and b.weights is None) or torch.equal(a.weights, b.weights)
    assert (~Curator(None, quantile=0.8).select_scores(scores).keep).nonzero().flatten().tolist() == [1, 6]
    with pytest.raises(ValueError, match="needs the views"):
        Curator(None, "resample", threshold=1.0).select_scores(scores)
    with pytest.raises(ValueError, match="no scorer"):
        Curator(None, threshold=1.0).select(x1, x2)
    with pytest.raises(ValueError, match="1-D tensor"):
        Curator(None, threshold=1.0).select_scores(scores[None])


# ---------------------------------------------------------------------------------------------- distributed
def _scorer() -> FRDScorer:
    torch.manual_seed(7)
    return FRDScorer(nn.Linear(6, 5).double(), mode="pairwise")


def _loss(name: str, k1: torch.Tensor, k2: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    if name == "local-ntxent":
        return ntxent(k1, k2, w)
    if name == "supcon":  # the library's SimCLR mode, per-anchor losses + curated global (weighted) mean
        per_anchor = SupConLoss(temperature=0.5, base_temperature=0.5, reduction="none")(torch.stack([k1, k2], 1))
        return weighted_mean(per_anchor, w)
    if name == "barlow":
        return BarlowTwinsLoss()(k1, k2)
    raise AssertionError(name)


def _curated_step(x1, x2, cfg, rows: slice | None):
    """One curated step on this process's rows (all rows when ``rows`` is None)."""
    curator_kwargs, loss_name = cfg
    enc = make_encoder()
    if rows is not None:
        x1, x2 = x1[rows], x2[rows]
    x1 = x1.clone().requires_grad_()
    res = Curator(_scorer(), **curator_kwargs).select(x1, x2)
    k1, k2, w = apply_curation(enc(x1), enc(x2), res)
    loss = _loss(loss_name, k1, k2, w)
    loss.backward()
    ddp_average_grads(enc)
    return {
        "loss": loss.detach(),
        "grads": [p.grad.clone() for p in enc.parameters()],
        "x_grad": x1.grad.clone(),
        "keep": res.keep,
        "weights": res.weights,
        "stats": res.stats,
    }


CONFIGS = [
    ({"quantile": 0.75}, "local-ntxent"),
    ({"policy": "reweight", "temperature": 0.5}, "local-ntxent"),
    ({"quantile": 0.75}, "supcon"),
    ({"policy": "reweight", "temperature": 0.5}, "supcon"),
    ({"quantile": 0.75}, "barlow"),
]


def _curation_shard(shard: Shard, x1, x2) -> dict:
    out = {}
    for c, cfg in enumerate(CONFIGS):
        step = _curated_step(x1, x2, cfg, shard.rows)
        out[f"{c} loss"], out[f"{c} grads"], out[f"{c} stats"] = step["loss"], step["grads"], step["stats"]
        out[f"{c} keep"] = step["keep"]
        if step["weights"] is not None:
            out[f"{c} weights"] = step["weights"]
        # input gradients: each rank returns the global loss, DDP's objective is their mean, hence the 1/W
        out[f"{c} x_grad"] = step["x_grad"] / shard.world
    return out


def test_distributed_curation_equals_one_process(ddp_contract):
    x1, x2 = make_pairs(n=12, bad=(0, 2, 4))  # all bad pairs on rank 0: uneven kept counts across ranks
    per_sample = [f"{c} {k}" for c in range(len(CONFIGS)) for k in ("keep", "x_grad")]
    per_sample += [f"{c} weights" for c, cfg in enumerate(CONFIGS) if "quantile" not in cfg[0]]
    # keep (bool) is compared exactly, stats (python numbers) with ==; loss, grads, x_grad within 1e-5
    run = ddp_contract(_curation_shard, 12, x1, x2, concat=per_sample, rtol=1e-5, atol=1e-5)
    assert run.splits == (7, 5)
    for c, cfg in enumerate(CONFIGS):
        single, ranks = run.full, run.ranks
        keep = torch.cat([r[f"{c} keep"] for r in ranks])
        assert torch.equal(keep, single[f"{c} keep"]), cfg
        if "quantile" in cfg[0]:
            assert f"{c} weights" not in single
            assert int(single[f"{c} keep"].sum()) == 9
            assert int(ranks[0][f"{c} keep"].sum()) == 4 and int(ranks[1][f"{c} keep"].sum()) == 5  # uneven
        else:  # at the default (float32) tolerance, tighter than the contract's
            torch.testing.assert_close(torch.cat([r[f"{c} weights"] for r in ranks]), single[f"{c} weights"])
        for r in ranks:
            assert r[f"{c} stats"] == single[f"{c} stats"]


def test_curation_with_library_losses_removes_exactly_the_dropped_pairs():
    x1, x2 = make_pairs(n=10, bad=(1, 6))
    res = Curator(sq_dist_scorer, quantile=0.8).select(x1, x2)
    assert (~res.keep).nonzero().flatten().tolist() == [1, 6]
    assert isinstance(res, CurationResult)
    others = torch.tensor([0, 2, 3, 4, 5, 7, 8, 9])
    enc = make_encoder()
    for name in ("supcon", "barlow"):
        enc.zero_grad()
        z1, z2 = enc(x1[others]), enc(x2[others])
        ref_loss = _loss(name, z1, z2, None)
        ref_loss.backward()
        ref_grads = [p.grad.clone() for p in enc.parameters()]
        enc.zero_grad()
        k1, k2, w = apply_curation(enc(x1), enc(x2), res)
        loss = _loss(name, k1, k2, w)
        loss.backward()
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=1e-12)
        for p, r in zip(enc.parameters(), ref_grads):
            torch.testing.assert_close(p.grad, r, rtol=1e-10, atol=1e-12)
    # SupCon's per-anchor output with unit weights through weighted_mean equals its own "mean" reduction
    z = torch.stack([enc(x1), enc(x2)], 1)
    per_anchor = SupConLoss(temperature=0.5, base_temperature=0.5, reduction="none")(z)
    torch.testing.assert_close(
        weighted_mean(per_anchor, torch.ones(10)), SupConLoss(temperature=0.5, base_temperature=0.5)(z)
    )
    # and with weights it is the explicit weighted average
    w = torch.linspace(0.5, 1.5, 10, dtype=torch.float64)
    torch.testing.assert_close(weighted_mean(per_anchor, w), (per_anchor * w).sum() / (2 * w.sum()))
    with pytest.raises(ValueError, match="weights must have shape"):
        weighted_mean(per_anchor, torch.ones(3))


@pytest.mark.cuda
def test_scorer_and_curator_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    ext = nn.Sequential(nn.Flatten(), nn.Linear(12, 7))  # built on CPU: the scorer moves it to the input device
    scorer = FRDScorer(ext, mode="pairwise")
    x1 = torch.randn(16, 3, 4, device="cuda")
    x2 = x1 + 0.1 * torch.randn(16, 3, 4, device="cuda")
    x2[5] += 5.0
    s = scorer.score_pairs(x1, x2)
    assert s.device.type == "cuda"
    torch.testing.assert_close(s.cpu(), discrete_frechet_distance(ext.cpu()(x1.cpu()), ext(x2.cpu())))
    ext.cuda()
    for policy, kw in (("drop", {"quantile": 0.9}), ("reweight", {})):
        res = Curator(scorer, policy, **kw).select(x1, x2)
        k1, k2, w = apply_curation(x1.flatten(1), x2.flatten(1), res)
        assert k1.device.type == "cuda" and (w is None or w.device.type == "cuda")
        if policy == "drop":
            assert not bool(res.keep[5]) and int(res.keep.sum()) == 15
    gauss = FRDScorer(ext, mode="gaussian")
    torch.testing.assert_close(
        gauss.score_batch(x1, x2).cpu(), gaussian_frechet_distance(ext(x1.flatten(1)).cpu(), ext(x2.flatten(1)).cpu())
    )


def test_bench_step_share_quick_runs(capsys):
    """`batchmates bench curation` measures the simclr step with and without curation (smoke size) and prints
    the share curation adds."""
    from batchmates.bench.curation import STEP_CASES, simclr_step_share

    rows = simclr_step_share("cpu", quick=True)
    assert [r.impl for r in rows][:4] == [impl for impl, _ in STEP_CASES] and len(rows) == 6
    assert all(math.isfinite(r.time_ms) and r.time_ms > 0 for r in rows)
    for r in rows[1:4]:
        assert r.extra["added_share"] == pytest.approx(r.extra["added_ms"] / rows[0].time_ms)
        assert math.isfinite(r.extra["added_ms"]) and r.extra["target_max_share"] == 0.10
    for r in rows[4:]:
        assert r.extra["share_of_plain_step"] == pytest.approx(r.time_ms / rows[0].time_ms)
    assert "curation step share" in capsys.readouterr().out
