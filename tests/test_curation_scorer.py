"""FRDScorer (batchmates.curation.scorer): the honest modes (discrete Fréchet and squared L2 per pair, Gaussian FRD
per batch only), frozen torchvision ResNet weights from a local file, and the online encoder's separate forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchmates.curation import Curator, FRDScorer, discrete_frechet_distance, gaussian_frechet_distance

torch.set_num_threads(1)


def test_scorer_modes_use_the_frechet_functions():
    torch.manual_seed(0)
    ext = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.BatchNorm1d(7)).double()
    ext.train()
    scorer = FRDScorer(ext, mode="pairwise")
    assert not ext.training and not any(p.requires_grad for p in ext.parameters())
    x1 = torch.randn(6, 3, 4, dtype=torch.float64)
    x2 = torch.randn(6, 3, 4, dtype=torch.float64)
    f1, f2 = ext(x1), ext(x2)
    torch.testing.assert_close(scorer.score_pairs(x1, x2), discrete_frechet_distance(f1, f2))
    torch.testing.assert_close(scorer.score_batch(x1, x2), discrete_frechet_distance(f1, f2).mean())
    # a pair's score does not depend on its batch mates (eval mode, no batch statistics)
    torch.testing.assert_close(scorer.score_pairs(x1[:2], x2[:2]), scorer.score_pairs(x1, x2)[:2])
    gauss = FRDScorer(ext, mode="gaussian", preprocess=lambda x: x * 2)
    torch.testing.assert_close(gauss.score_batch(x1, x2), gaussian_frechet_distance(ext(2 * x1), ext(2 * x2)))
    # the Gaussian FRD has no per-pair score (it used to return the squared L2 distance under that name)
    with pytest.raises(ValueError, match="no per-pair score.*mode='sq-l2'"):
        gauss.score_pairs(x1, x2)
    with pytest.raises(ValueError, match="no per-pair score"):
        Curator(gauss, quantile=0.5).select(x1, x2)
    sq = FRDScorer(ext, mode="sq-l2", preprocess=lambda x: x * 2)
    g1, g2 = ext(2 * x1), ext(2 * x2)
    ref_sq = torch.tensor([float(((g1[i] - g2[i]) ** 2).sum()) for i in range(6)], dtype=torch.float64)
    torch.testing.assert_close(sq.score_pairs(x1, x2), ref_sq)
    torch.testing.assert_close(sq.score_batch(x1, x2), ref_sq.mean())
    ext.train()  # e.g. a parent module's .train(); scoring still runs in eval mode
    torch.testing.assert_close(scorer.score_pairs(x1, x2), discrete_frechet_distance(f1, f2))
    assert not ext.training
    with pytest.raises(ValueError, match="mode must be one of.*'sq-l2'"):
        FRDScorer(ext, mode="fid")
    with pytest.raises(TypeError, match="nn.Module"):
        FRDScorer(lambda x: x)
    # works as a Curator scorer
    res = Curator(scorer, quantile=0.5).select(x1, x2)
    assert int(res.keep.sum()) == 3


def test_from_torchvision_resnet_missing_file_is_clear(tmp_path):
    missing = tmp_path / "nope" / "resnet18.pth"
    with pytest.raises(FileNotFoundError) as info:
        FRDScorer.from_torchvision_resnet(missing, arch="resnet18")
    msg = str(info.value)
    assert str(missing) in msg and "never downloads" in msg and "download.pytorch.org" in msg
    with pytest.raises(ValueError, match="arch must be"):
        FRDScorer.from_torchvision_resnet(missing, arch="resnet34")


def test_from_torchvision_resnet_loads_local_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=1000)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    scorer = FRDScorer.from_torchvision_resnet(path, output="pool")
    loaded = dict(scorer.extractor.named_parameters())
    assert torch.equal(loaded["conv1.weight"], model.conv1.weight)
    x = torch.randn(2, 3, 32, 32)
    assert scorer.features(x).shape == (2, 512)
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="state_dict"):
        FRDScorer.from_torchvision_resnet(bad)


def test_from_online_encoder_restores_modes_and_state():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3))
    enc.train()
    enc[2].eval()  # mixed modes must come back exactly
    before = {m: m.training for m in enc.modules()}
    running = enc[1].running_mean.clone()
    scorer = FRDScorer.from_online_encoder(enc)
    x1, x2 = torch.randn(8, 5), torch.randn(8, 5)
    s = scorer.score_pairs(x1, x2)
    assert {m: m.training for m in enc.modules()} == before
    assert torch.equal(enc[1].running_mean, running)  # scored in eval mode: BN stats untouched
    assert all(p.requires_grad for p in enc.parameters()) and not s.requires_grad
    enc.eval()
    torch.testing.assert_close(s, discrete_frechet_distance(enc(x1), enc(x2)))
    enc.train()

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    boom = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        FRDScorer.from_online_encoder(boom).score_pairs(x1, x2)
    assert boom.training  # restored even when the forward fails
