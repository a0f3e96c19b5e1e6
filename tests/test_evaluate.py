"""Evaluation protocols: weighted kNN against a brute-force reference, the linear probe, and `batchmates eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from batchmates.cli import main
from batchmates.training.evaluate import knn_accuracy, knn_classify, linear_probe


def _brute_force_knn(train, train_y, test, k, T, C):
    """Reference written independently: loop over test points, sort all cosine similarities, vote exp(sim/T)."""
    preds = []
    for q in test:
        sims = [float(torch.dot(q, t) / (q.norm() * t.norm())) for t in train]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * C
        for i in order:
            votes[int(train_y[i])] += math.exp(sims[i] / T)
        preds.append(max(range(C), key=lambda c: votes[c]))
    return torch.tensor(preds)


@pytest.mark.parametrize("k", [1, 5, 20, 200])
def test_knn_matches_brute_force(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    train = torch.randn(60, 6, generator=g, dtype=torch.float64)
    train_y = torch.randint(0, 4, (60,), generator=g)
    test = torch.randn(25, 6, generator=g, dtype=torch.float64)
    got = knn_classify(train, train_y, test, k=k, temperature=0.07, num_classes=4, chunk=7)
    assert torch.equal(got, _brute_force_knn(train, train_y, test, min(k, 60), 0.07, 4))


def test_knn_accuracy_keys_and_perfect_on_separated_clusters() -> None:
    centers = torch.eye(3) * 10
    g = torch.Generator().manual_seed(0)
    y = torch.arange(90) % 3
    x = centers[y] + torch.randn(90, 3, generator=g)
    acc = knn_accuracy(x[:60], y[:60], x[60:], y[60:], num_classes=3)
    assert set(acc) == {"k20", "k200"} and acc["k20"] == 1.0


def test_knn_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="same D"):
        knn_classify(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 4))
    with pytest.raises(ValueError, match="train_labels"):
        knn_classify(torch.randn(5, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 3))


def test_linear_probe_learns_a_linear_rule() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 5, generator=g)
    x = torch.randn(600, 8, generator=g) * 3 + 7  # unstandardised on purpose
    y = ((x - 7) @ w).argmax(1)
    res = linear_probe(x[:400], y[:400], x[400:], y[400:], num_classes=5)
    assert res["top1"] > 0.85 and res["train_top1"] > 0.9  # chance is 0.2
    assert linear_probe(x[:400], y[:400], x[400:], y[400:], num_classes=5) == res  # deterministic


def test_eval_command_merges_into_metrics(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--method", "ce", "--data", "digits", "--epochs", "1", "--batch-size", "64", "--threads",
                 "1", "--no-progress", "--protocol", "accuracy", "--out", str(run)]) == 0
    before = json.loads((run / "metrics.json").read_text())
    assert set(before["eval"]) == {"accuracy"}
    assert main(["eval", str(run), "--protocol", "knn", "--protocol", "linear", "--corruptions", "--kind",
                 "gaussian_noise", "--kind", "invert", "--severity", "1", "--severity", "5"]) == 0
    after = json.loads((run / "metrics.json").read_text())
    ev = after["eval"]
    assert after["test_acc"] == before["test_acc"] and ev["accuracy"] == before["eval"]["accuracy"]
    assert ev["knn"]["k20"] > 0.3 and ev["linear"]["top1"] > 0.3
    c = ev["corruptions"]
    assert set(c) == {"gaussian_noise", "invert", "mean"} and set(c["invert"]) == {"1", "5"}
    assert c["invert"]["5"] < ev["accuracy"]["top1"]  # fully inverted digits are out of distribution
    assert math.isclose(c["mean"], sum(c[k][s] for k in ("gaussian_noise", "invert") for s in ("1", "5")) / 4)
    assert "merged into" in capsys.readouterr().out
    assert main(["eval", str(run), "--corruptions", "--kind", "nope"]) == 2


class _LeftRight(torch.nn.Module):
    """A 'method' whose classifier reads the left and right halves of the image with different weights."""

    has_classifier = True

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 3)
        torch.manual_seed(0)
        torch.nn.init.normal_(self.lin.weight)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@pytest.mark.parametrize("hflip", [True, False])
def test_flip_tta_is_reported_beside_top1_only_where_flips_keep_labels(hflip: bool) -> None:
    from batchmates.data import DatasetSplits, InMemoryImages
    from batchmates.training.evaluate import classifier_accuracy, evaluate_model

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (64,), generator=g)
    ds = InMemoryImages(images, labels)
    splits = DatasetSplits("toy", ds, ds, 3, 1, 4, (0.5,), (0.5,), ("a", "b", "c"), hflip=hflip)
    model = _LeftRight()
    with torch.no_grad():  # by hand: mean softmax of each image and its mirror image
        x = images.float() / 255
        p = model.lin(x.flatten(1)).softmax(1) + model.lin(x.flip(-1).flatten(1)).softmax(1)
        plain = float((model.lin(x.flatten(1)).argmax(1) == labels).float().mean())
    want = float((p.argmax(1) == labels).float().mean())
    assert want != plain  # the toy model is asymmetric: TTA changes predictions
    assert classifier_accuracy(model, ds, batch_size=10, flip_tta=True) == pytest.approx(want)
    acc = evaluate_model(model, splits, ["accuracy"], batch_size=10)["accuracy"]
    assert acc["top1"] == pytest.approx(plain)  # the headline accuracy never includes TTA
    assert ("top1_flip_tta" in acc) is hflip
    if hflip:
        assert acc["top1_flip_tta"] == pytest.approx(want)
