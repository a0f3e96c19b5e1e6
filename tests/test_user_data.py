"""Bring your own data (issue 11): --image-size for every dataset, unlabelled image folders for self-supervised
pretraining (supervised methods refuse them), a user's torch Dataset (labelled or not) and a user's nn.Module
backbone through the API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from batchmates.cli import main
from batchmates.config import ConfigError, RunConfig
from batchmates.data import load_dataset
from batchmates.data.datasets.custom import splits_from_datasets, to_uint8_image
from batchmates.methods import Method
from batchmates.training.evaluate import classifier_accuracy
from batchmates.training.run import train

FAST = dict(epochs=1, max_steps=2, threads=1, progress=False)


class Digits(torch.utils.data.Dataset):
    """digits as a user would hand them over: float images in [0, 1] (and labels, unless unlabelled)."""

    def __init__(self, split: str, labelled: bool = True) -> None:
        ds = getattr(load_dataset("digits"), split)
        self.images, self.labels, self.labelled = ds.images.float() / 255, ds.labels, labelled

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return (self.images[i], int(self.labels[i])) if self.labelled else self.images[i]


def test_image_size_resizes_every_split_and_eval_reloads_at_that_size(tmp_path) -> None:
    out = tmp_path / "ce16"
    assert main(["train", "--method", "ce", "--data", "digits", "--image-size", "16", "--max-steps", "3",
                 "--epochs", "1", "--threads", "1", "--no-progress", "--protocol", "accuracy", "--out", str(out)]) == 0
    model = Method.from_checkpoint(out)
    assert model.info.image_size == 16 and model.cfg.image_size == 16
    before = json.loads((out / "metrics.json").read_text())["test_acc"]
    assert main(["eval", str(out), "--protocol", "accuracy"]) == 0  # loads digits at 16 px again
    assert json.loads((out / "metrics.json").read_text())["eval"]["accuracy"]["top1"] == pytest.approx(before)


def _folder(root, n: int = 12):
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / "a" if i % 2 else root / "b" / "deeper"  # any layout; searched recursively
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_unlabelled_folder_pretrains_self_supervised_and_refuses_supervised(tmp_path, capsys) -> None:
    root = _folder(tmp_path / "photos")
    splits = load_dataset(f"imagefolder-unlabeled:{root}", image_size=16)
    assert (len(splits.train), len(splits.test), splits.num_classes) == (11, 1, 0)
    x, y = splits.train[0]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 16, 16) and y == -1
    code = main(["train", "--method", "ce", "--data", f"imagefolder-unlabeled:{root}", "--out", str(tmp_path / "ce")])
    assert code == 2 and "has none" in capsys.readouterr().err and not (tmp_path / "ce").exists()
    out = tmp_path / "simclr"
    assert main(["train", "--method", "simclr", "--data", f"imagefolder-unlabeled:{root}", "--image-size", "16",
                 "--batch-size", "4", "--max-steps", "2", "--epochs", "1", "--threads", "1", "--no-progress",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["test_acc"] is None
    assert metrics["curve"][0]["rankme"] == pytest.approx(1.0, abs=1e-5)  # one held-out image: one direction
    assert "knn_acc" not in metrics["curve"][0]


def test_a_users_labelled_dataset_trains_and_reloads(tmp_path) -> None:
    cfg = RunConfig(method="ce", out=str(tmp_path / "mine"), eval_protocols=["accuracy"], **FAST)
    metrics = train(cfg, train_dataset=Digits("train"), test_dataset=Digits("test"), verbose=False)
    saved = RunConfig.from_yaml(str(tmp_path / "mine" / "config.yaml"))
    assert saved.data == "custom:digits" and metrics["finished"]
    model = Method.from_checkpoint(tmp_path / "mine")
    assert (model.info.num_classes, model.info.in_channels, model.info.image_size) == (10, 1, 8)
    test = splits_from_datasets(Digits("train"), Digits("test")).test
    assert torch.equal(test.images, load_dataset("digits").test.images)  # [0, 1] floats back to the same uint8
    assert classifier_accuracy(model, test) == pytest.approx(metrics["test_acc"])
    with pytest.raises(FileNotFoundError, match="cannot be loaded by name"):
        load_dataset("custom:digits")


def test_an_interrupted_run_on_a_users_dataset_resumes_with_it(tmp_path) -> None:
    from batchmates.options import RunError
    from batchmates.training import resume

    class Other(Digits):
        pass

    out = tmp_path / "mine"
    cfg = RunConfig(method="ce", out=str(out), eval_protocols=["accuracy"], checkpoint_every_n_steps=1,
                    **{**FAST, "max_steps": 2})
    train(cfg, train_dataset=Digits("train"), test_dataset=Digits("test"), verbose=False)
    (out / "metrics.json").unlink()  # as if killed after its step-2 checkpoint
    with pytest.raises(RunError, match=r"torch Dataset of yours \(custom:digits\); pass the same ones back"):
        resume(str(out), verbose=False)
    with pytest.raises(RunError, match="trained on 'custom:digits', but train_dataset is 'custom:other'"):
        resume(str(out), verbose=False, train_dataset=Other("train"), test_dataset=Other("test"))
    metrics = resume(str(out), verbose=False, train_dataset=Digits("train"), test_dataset=Digits("test"))
    assert metrics["finished"] and metrics["resumed"] and metrics["steps"] == 2 and metrics["data"] == "custom:digits"
    assert metrics["test_acc"] > 0.1


def test_a_users_unlabelled_dataset_trains_ssl_only(tmp_path) -> None:
    cfg = RunConfig(method="simclr", batch_size=32, out=str(tmp_path / "u"), **FAST)
    metrics = train(cfg, train_dataset=Digits("train", labelled=False), verbose=False)
    assert metrics["test_acc"] is None and metrics["curve"][0]["rankme"] > 1.0
    with pytest.raises(ConfigError, match="has none"):
        train(cfg.replace(method="ce", out=str(tmp_path / "ce")), train_dataset=Digits("train", labelled=False))


def test_a_users_module_as_backbone(tmp_path) -> None:
    import torchvision

    torch.manual_seed(0)
    cfg = RunConfig(method="ce", out=str(tmp_path / "tv"), image_size=16, eval_protocols=["accuracy"], **FAST)
    metrics = train(cfg, backbone=torchvision.models.resnet18(), verbose=False)
    with pytest.raises(ConfigError, match="backbone=MODULE"):
        Method.from_checkpoint(tmp_path / "tv")
    model = Method.from_checkpoint(tmp_path / "tv", backbone=torchvision.models.resnet18())
    test = load_dataset("digits", image_size=16).test
    assert classifier_accuracy(model, test) == pytest.approx(metrics["test_acc"])


@pytest.mark.parametrize("image, want", [
    (np.full((4, 5), 7, dtype=np.uint8), (1, 4, 5)),
    (np.zeros((4, 5, 3), dtype=np.uint8), (3, 4, 5)),
    (torch.ones(3, 6, 6), (3, 6, 6)),
    (Image.new("L", (5, 4)), (1, 4, 5)),
])
def test_user_images_become_uint8_chw(image, want) -> None:
    t = to_uint8_image(image)
    assert t.dtype == torch.uint8 and tuple(t.shape) == want
    if isinstance(image, torch.Tensor):
        assert int(t.max()) == 255
