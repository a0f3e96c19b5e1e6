"""Watch it learn (issue 11): RankMe and the spread against independent computations, the collapse warning, and a
SwAV run that shows kNN accuracy per epoch in metrics.csv (and TensorBoard)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from batchmates.cli import main
from batchmates.config import DataInfo, RunConfig
from batchmates.data import load_dataset
from batchmates.methods import get_method
from batchmates.training.monitor import EmbeddingMonitor, feature_spread, rankme


def _rankme_numpy(f: np.ndarray) -> float:
    s = np.linalg.svd(f, compute_uv=False)
    p = s / s.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


def test_rankme_matches_its_definition_and_counts_directions() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(200, 32, generator=g)
    assert rankme(f) == pytest.approx(_rankme_numpy(f.numpy().astype(np.float64)), rel=1e-9)
    # 4 orthogonal directions with equal weight: RankMe = 4 (up to the 1e-7 smoothing)
    q, _ = torch.linalg.qr(torch.randn(32, 4, generator=g, dtype=torch.float64))
    codes = torch.randn(200, 4, generator=g, dtype=torch.float64)
    u, _, _ = torch.linalg.svd(codes, full_matrices=False)
    assert rankme(u @ q.T) == pytest.approx(4.0, rel=1e-4)
    assert rankme(torch.ones(50, 32)) == pytest.approx(1.0, abs=1e-4)


def test_feature_spread_is_zero_for_identical_embeddings_and_about_one_for_isotropic_ones() -> None:
    assert feature_spread(torch.ones(64, 16) * 3) == pytest.approx(0.0, abs=1e-12)
    iso = torch.randn(20000, 16, generator=torch.Generator().manual_seed(1))
    assert feature_spread(iso) == pytest.approx(1.0, abs=0.02)


def test_collapse_warning_on_a_falling_rank_and_on_identical_embeddings() -> None:
    mon = EmbeddingMonitor(1)
    assert mon.collapse_message({"rankme": 20.0, "feat_std": 0.5}, 128) is None
    assert mon.collapse_message({"rankme": 12.0, "feat_std": 0.5}, 128) is None  # above half of the best (20)
    assert "RankMe 9.00" in mon.collapse_message({"rankme": 9.0, "feat_std": 0.5}, 128)
    assert "spread" in EmbeddingMonitor(1).collapse_message({"rankme": 30.0, "feat_std": 0.01}, 128)


def test_monitor_measures_and_warns_for_a_collapsed_model() -> None:
    splits = load_dataset("digits")
    cfg = RunConfig(method="simclr", batch_size=32).resolve()
    model = get_method("simclr")(cfg, DataInfo.from_splits(splits))
    mon = EmbeddingMonitor(1, max_train=300, max_test=100)
    stats = mon.measure(model, splits.train, splits.test, 10)
    assert set(stats) == {"rankme", "feat_std", "knn_acc"} and 0.0 <= stats["knn_acc"] <= 1.0
    assert mon.collapse_message(stats, model.backbone.feature_dim) is None  # a random CNN is not collapsed
    model.embed = lambda x: torch.ones(x.shape[0], 8)  # every image on one point
    stats = mon.measure(model, splits.train, splits.test, 10)
    assert stats["feat_std"] < 1e-6 and mon.collapse_message(stats, 8) is not None


def test_swav_run_shows_knn_accuracy_per_epoch(tmp_path) -> None:
    out = tmp_path / "swav"
    # 2 epochs of 5 steps at batch 256; --monitor-every -1 (default) watches swav every epoch
    assert main(["train", "--method", "swav", "--data", "digits", "--epochs", "2", "--batch-size", "256",
                 "--threads", "1", "--no-progress", "--protocol", "knn", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    knn = [float(r["knn_acc"]) for r in rows]
    assert all(0.1 < k <= 1.0 for k in knn) and all(float(r["rankme"]) > 1.0 for r in rows)
    # the last epoch's check is the final kNN evaluation (same weights, all of digits' images, k=20)
    metrics = json.loads((out / "metrics.json").read_text())
    assert knn[-1] == pytest.approx(metrics["eval"]["knn"]["k20"], abs=1e-5)
    assert metrics["curve"][-1]["knn_acc"] == pytest.approx(knn[-1], abs=1e-5)
    events = b"".join(p.read_bytes() for p in (out / "tb").rglob("events.out.tfevents.*"))
    assert b"monitor/knn_acc" in events and b"monitor/rankme" in events


def test_monitor_every_two_epochs_keeps_the_columns_and_logs_csv(tmp_path) -> None:
    out = tmp_path / "ce"
    assert main(["train", "--method", "ce", "--data", "digits", "--epochs", "2", "--batch-size", "256",
                 "--monitor-every", "2", "--logger", "csv", "--threads", "1", "--no-progress",
                 "--protocol", "accuracy", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert math.isnan(float(rows[0]["knn_acc"])) and 0.0 < float(rows[1]["knn_acc"]) <= 1.0
    logged = (out / "logs" / "metrics.csv").read_text()
    assert "monitor/knn_acc" in logged and "train/loss_epoch" in logged
    assert not (out / "tb").exists()


def test_wandb_logger_without_wandb_is_a_clear_error(tmp_path, capsys) -> None:
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    code = main(["train", "--method", "ce", "--logger", "wandb", "--out", str(tmp_path / "w"), "--no-progress"])
    assert code == 2 and "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
