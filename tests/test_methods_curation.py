"""Per-pair batch curation (The Bad Batches, arXiv:2403.19579) wired into simclr / supcon / barlow: a curated CLI
run logs the dropped fraction; a threshold dropping nothing is exactly the uncurated step (per-pair and batch
kinds); dropped pairs leave the loss exactly; reweight and resample do what they say; the curated loss is exact on
2 gloo ranks; frozen extractors work. The batch-level policy has its own file (test_methods_batch_curation.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from batchmates import cli
from batchmates.curation import Curator, gaussian_frechet_distance
from batchmates.methods import DataInfo, get_method
from batchmates.testing import Shard, ddp_average_grads
from batchmates.training.config import RunConfig

DIGITS = DataInfo(name="digits", num_classes=10, in_channels=1, image_size=8, mean=(0.26,), std=(0.37,),
                  train_size=1347, hflip=False)


def make(method: str, seed: int = 0, **opts):
    cls = get_method(method)
    cfg = RunConfig(method=method, data="digits", options=opts).resolve(cls)
    torch.manual_seed(seed)
    return cls(cfg, DIGITS)


def batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % 5


def test_cli_curated_simclr_logs_dropped_fraction(tmp_path: Path) -> None:
    out = tmp_path / "cur"
    argv = ["train", "--method", "simclr", "--data", "digits", "--epochs", "1", "--max-steps", "6", "--batch-size",
            "64", "--threads", "1", "--no-progress", "--protocol", "knn", "--protocol", "linear",
            "--curate", "frd-pairwise", "--opt", "curate_policy=drop", "--opt", "curate_quantile=0.75",
            "--out", str(out)]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["test_acc"] > 0.3  # chance 0.1
    row = metrics["curve"][-1]
    assert abs(row["frac_dropped"] - 0.25) < 0.02  # keep ceil(0.75 * 64) = 48 of 64 (ties kept)
    assert row["curate_score"] > 0
    assert "frac_dropped" in (out / "metrics.csv").read_text().splitlines()[0]
    assert RunConfig.from_yaml(str(out / "config.yaml")).options["curate"] == "frd-pairwise"


@pytest.mark.parametrize("method, curate", [("simclr", "frd-pairwise"), ("supcon", "pair-sq-l2"),
                                            ("barlow", "frd-pairwise"), ("simclr", "frd-batch"),
                                            ("barlow", "frd-batch")])
def test_threshold_dropping_nothing_is_exactly_uncurated(method: str, curate: str) -> None:
    x, y = batch(32)
    plain = make(method)
    cur = make(method, curate=curate, curate_threshold=1e30)
    assert cur.curating and not plain.curating
    results = []
    for model in (plain, cur):
        torch.manual_seed(123)
        loss, extra = model.compute_loss((x, y))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], extra))
    assert torch.equal(results[0][0], results[1][0])
    assert len(results[0][1]) == len(results[1][1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert results[1][2]["frac_dropped"] == 0.0 and results[0][2] == {}
    # scoring added no forward: the BN running stats are those of the one training forward, as uncurated
    assert cur.backbone.training
    for (n1, b1), (_, b2) in zip(plain.backbone.named_buffers(), cur.backbone.named_buffers()):
        assert torch.equal(b1, b2), n1


@pytest.mark.parametrize("method", ["simclr", "supcon", "barlow"])
def test_drop_removes_exactly_the_dropped_pairs(method: str) -> None:
    x, y = batch(24, seed=1)
    model = make(method, curate="frd-pairwise", curate_threshold=1.0)
    assert model.curation_scorer is None  # online drop: scored from the training forward's features
    fixed = torch.linspace(0, 2, 24)[torch.randperm(24, generator=torch.Generator().manual_seed(3))]
    seen = []
    model.online_pair_scores = lambda spaces: seen.append(spaces) or fixed.clone()
    keep = fixed <= 1.0
    torch.manual_seed(7)
    loss, extra = model.compute_loss((x, y))
    assert extra["frac_dropped"] == pytest.approx(float((~keep).float().mean()))
    torch.manual_seed(7)  # same views, by hand: the loss of the kept pairs only
    v1, v2 = model.train_views(x)
    if method == "barlow":
        z1, z2 = model.project(v1), model.project(v2)
        ref = model.loss_fn(z1[keep], z2[keep])
    else:
        z = model.project(torch.cat([v1, v2]))
        z1, z2 = z[:24][keep], z[24:][keep]
        labels = y[keep] if method == "supcon" else None
        ref = model.loss_fn(torch.stack([z1, z2], 1), labels)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    # the scores were asked for on the detached backbone and projector features of that same forward
    (h1, h2), (p1, p2) = seen[0]
    assert not h1.requires_grad and h1.shape == (24, model.backbone.feature_dim)
    z_ref = (z1, z2) if method == "barlow" else (z[:24], z[24:])
    assert torch.equal(p1, z_ref[0].detach()) and torch.equal(p2, z_ref[1].detach())


def test_reweight_is_weighted_mean_of_per_anchor_losses() -> None:
    x, y = batch(16, seed=2)
    model = make("supcon", curate="pair-sq-l2", curate_policy="reweight", curate_temperature=0.5)
    scores = torch.linspace(0, 3, 16)
    model.online_pair_scores = lambda spaces: scores.clone()
    torch.manual_seed(5)
    loss, extra = model.compute_loss((x, y))
    assert extra["frac_dropped"] == 0.0
    torch.manual_seed(5)
    v1, v2 = model.train_views(x)
    z = model.project(torch.cat([v1, v2]))
    per_anchor = model.loss_per_anchor(torch.stack([z[:16], z[16:]], 1), y)  # [2, 16]
    zs = (scores - scores.mean()) / scores.std(unbiased=False)  # the curator standardises (biased std)
    w = 16 * torch.softmax(-zs / 0.5, 0)
    ref = (per_anchor * w).sum() / (2 * w.sum())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, per_anchor.mean())  # the weights matter


def test_resample_replaces_only_bad_pairs_with_fresh_views() -> None:
    x, _ = batch(12, seed=3)
    model = make("simclr", curate="frd-pairwise", curate_policy="resample", curate_threshold=1.0)
    first = torch.tensor([0.0, 5.0] * 6)  # odd pairs are bad; fresh views score 0 (good)
    model.curator = Curator(lambda a, b: first.clone() if a.shape[0] == 12 else torch.zeros(a.shape[0]),
                            "resample", threshold=1.0)
    torch.manual_seed(0)
    v1, v2 = model.train_views(x)
    n1, n2, result = model.curate_views(x, v1, v2)
    bad = first > 1.0
    assert bool(result.keep.all()) and result.stats["fraction_dropped"] == 0.0
    assert torch.equal(n1[~bad], v1[~bad]) and torch.equal(n2[~bad], v2[~bad])
    assert not torch.equal(n1[bad], v1[bad])


# ------------------------------------------------------------------------------------------ distributed (gloo)
B, F_DIM = 16, 128


def _ddp_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    h1 = torch.randn(B, F_DIM, generator=g, dtype=torch.float64)
    h2 = h1 + 0.5 * torch.randn(B, F_DIM, generator=g, dtype=torch.float64)
    return h1, h2, torch.arange(B) % 3


def _curated_losses(h1: torch.Tensor, h2: torch.Tensor, y: torch.Tensor) -> dict:
    """Loss and head/projector-input gradients of the curated (drop, quantile 0.6) simclr, supcon, barlow."""
    out = {}
    for method in ("simclr", "supcon", "barlow"):
        model = make(method, seed=0, curate="frd-pairwise", curate_quantile=0.6).double()
        model.curator = Curator(lambda a, b: (a - b).square().sum(1), "drop", quantile=0.6)
        a, b = h1.clone().requires_grad_(True), h2.clone().requires_grad_(True)
        result = model.curator.select(a.detach(), b.detach())
        if method == "barlow":  # the loss on the projector outputs (no BatchNorm across ranks in this check)
            loss = model.barlow_loss(a, b, result)
            params: list[torch.Tensor] = []
        else:
            z1 = torch.nn.functional.normalize(model.head(a), dim=1)
            z2 = torch.nn.functional.normalize(model.head(b), dim=1)
            loss = model.contrastive_loss(z1, z2, y if method == "supcon" else None, result)
            params = list(model.head.parameters())
        loss.backward()
        ddp_average_grads(model)
        out[method] = {"loss": loss.detach(), "keep": result.keep, "grad_a": a.grad, "grad_b": b.grad,
                       "params": [p.grad.clone() for p in params]}
    return out


def _curation_shard(shard: Shard) -> dict:
    h1, h2, y = _ddp_data()
    rows = shard.rows
    out = {}
    for method, r in _curated_losses(h1[rows], h2[rows], y[rows]).items():
        out[f"{method} loss"], out[f"{method} params"], out[f"{method} keep"] = r["loss"], r["params"], r["keep"]
        # Input gradients: every rank back-propagates its copy of the global loss and the gather's backward sums
        # them, so a rank's features receive W x the single-process gradient (DDP then averages parameter grads).
        out[f"{method} grad_a"], out[f"{method} grad_b"] = r["grad_a"] / shard.world, r["grad_b"] / shard.world
    return out


def test_curated_losses_exact_on_two_gloo_ranks(ddp_contract) -> None:
    h1, h2, y = _ddp_data()
    ref = _curated_losses(h1, h2, y)
    methods = list(ref)
    per_sample = [f"{m} {k}" for m in methods for k in ("keep", "grad_a", "grad_b")]
    # gradients within rtol 1e-8, atol 1e-10 (the loss is checked tighter below); keep (bool) exactly
    run = ddp_contract(_curation_shard, B, concat=per_sample, rtol=1e-8, atol=1e-10)
    assert run.splits == (9, 7)
    ranks = run.ranks
    for method, r in ref.items():
        keep = torch.cat([res[f"{method} keep"] for res in ranks])
        assert torch.equal(keep, r["keep"])  # the global quantile rule, applied identically
        assert int(keep.sum()) == 10
        assert int(ranks[0][f"{method} keep"].sum()) != int(ranks[1][f"{method} keep"].sum())  # uneven kept counts
        for res in ranks:
            torch.testing.assert_close(res[f"{method} loss"], r["loss"], rtol=1e-10, atol=1e-12)
        ga = torch.cat([res[f"{method} grad_a"] for res in ranks])
        torch.testing.assert_close(ga, r["grad_a"], rtol=1e-8, atol=1e-10)
        assert bool((r["grad_a"][~r["keep"]] == 0).all())  # dropped pairs get no gradient


def test_frozen_extractors_resnet_file_and_finished_run(tmp_path: Path) -> None:
    import torchvision  # a dependency of the resnet18:PATH extractor itself
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    x, y = batch(16, seed=4)
    model = make("simclr", curate="frd-pairwise", curate_extractor=f"resnet18:{path}", curate_image_size=16)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 1_000_000  # the frozen ResNet-18 (11M) is not part of the method's parameters
    torch.manual_seed(0)
    loss, extra = model.compute_loss((x, y))
    assert torch.isfinite(loss) and extra["frac_dropped"] == pytest.approx(0.25)
    assert not any(p.requires_grad for p in model.curator.scorer.extractor.parameters())
    # a finished batchmates run as the extractor (its embed features), dataset shape checked
    run = tmp_path / "run"
    assert cli.main(["train", "--method", "supcon", "--data", "digits", "--epochs", "1", "--max-steps", "2",
                     "--batch-size", "32", "--threads", "1", "--no-progress", "--protocol", "knn",
                     "--out", str(run)]) == 0
    model = make("barlow", curate="pair-sq-l2", curate_extractor=f"run:{run}")
    torch.manual_seed(0)
    loss, extra = model.compute_loss((x, y))
    assert torch.isfinite(loss) and extra["frac_dropped"] == pytest.approx(0.25)
    # the batch-level policy with the same frozen extractor: its score is the Gaussian FRD of the run's features
    model = make("simclr", curate="frd-batch", curate_extractor=f"run:{run}", curate_threshold=1e30)
    torch.manual_seed(0)
    loss, extra = model.compute_loss((x, y))
    torch.manual_seed(0)
    v1, v2 = model.train_views(x)
    ext = model.curation_scorer
    ref = gaussian_frechet_distance(ext.features(v1), ext.features(v2))
    assert torch.isfinite(loss) and extra["curate_score"] == pytest.approx(float(ref), rel=1e-12)
