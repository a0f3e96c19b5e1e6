"""Issue 11 acceptance: timm/torchvision backbones (with offline weights) through every method and the CLI, the
backbone recorded and rebuilt without its weight file, `batchmates export` loading strictly into timm, and
`batchmates embed` reproducing eval's kNN accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from batchmates.cli import main
from batchmates.config import ConfigError, DataInfo, RunConfig
from batchmates.data import load_dataset
from batchmates.methods import Method, get_method
from batchmates.training.evaluate import knn_accuracy

FAST = ["--threads", "1", "--no-progress", "--epochs", "1"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def supcon_run(tmp_path_factory) -> Path:
    """`batchmates train --method supcon --backbone timm:resnet18 --data digits --epochs 1` (3 steps)."""
    out = tmp_path_factory.mktemp("byo") / "supcon"
    assert main(["train", "--method", "supcon", "--backbone", "timm:resnet18", "--data", "digits", "--max-steps", "3",
                 "--out", str(out), *FAST]) == 0
    return out


def _batch(digits, n: int = 16):
    return digits.train.images[:n], digits.train.labels[:n]


_EXTRA = {"cc": {"attn_layer": "se"}}
# every method on timm; on torchvision those that reach into the blocks (stages, SE gates, BA2M) and ce
_CASES = [("timm", m) for m in ("ce", "supcon", "simclr", "barlow", "swav", "btn", "cc", "ba2m", "batchformer")] + [
    ("torchvision", m) for m in ("ce", "btn", "cc", "ba2m")]
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


@pytest.mark.parametrize("source, method", _CASES)
def test_every_method_trains_a_step_on_a_foreign_resnet(digits, method, source) -> None:
    extra = _EXTRA.get(method, {})
    torch.manual_seed(0)
    cfg = RunConfig(method=method, backbone=f"{source}:resnet18", batch_size=16, **extra).resolve()
    model = get_method(method)(cfg, DataInfo.from_splits(digits))
    assert model.resolved_config.backbone_spec["source"] == source
    model.train()
    loss = model.training_step(_batch(digits), 0)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_pretrained_weights_load_and_the_run_rebuilds_without_the_file(tmp_path, digits) -> None:
    torch.manual_seed(3)
    src = timm.create_model("resnet18", num_classes=10, in_chans=3)  # an RGB checkpoint with its classifier
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(weights))
    cfg = RunConfig(method="ce", backbone="timm:resnet18", pretrained_path=str(weights), batch_size=16).resolve()
    model = get_method("ce")(cfg, DataInfo.from_splits(digits))
    got = model.backbone.model.state_dict()
    torch.testing.assert_close(got["layer3.0.conv1.weight"], src.state_dict()["layer3.0.conv1.weight"])
    # a grey image through the summed RGB filters = the RGB network on the image repeated three times
    x = digits.test.images[:4].float() / 255
    src.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.eval()(x), src.eval()(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)

    out = tmp_path / "run"
    assert main(["train", "--method", "ce", "--backbone", "timm:resnet18", "--pretrained-path", str(weights),
                 "--data", "digits", "--max-steps", "2", "--protocol", "accuracy", "--out", str(out), *FAST]) == 0
    recorded = RunConfig.from_yaml(str(out / "config.yaml"))
    assert recorded.backbone_spec["name"] == "resnet18" and recorded.backbone_spec["in_channels"] == 1
    weights.unlink()  # eval, from_checkpoint and resume rebuild from the spec; the weights come from last.ckpt
    before = json.loads((out / "metrics.json").read_text())["test_acc"]
    assert main(["eval", str(out), "--protocol", "accuracy"]) == 0
    assert json.loads((out / "metrics.json").read_text())["eval"]["accuracy"]["top1"] == pytest.approx(before)
    assert main(["train", "--resume", str(out), "--no-progress", "--threads", "1"]) == 0


def test_ce_on_torchvision_resnet18_with_ba2m_trains(tmp_path) -> None:
    out = tmp_path / "ba2m"
    assert main(["train", "--method", "ce", "--backbone", "torchvision:resnet18", "--attn-layer", "ba2m",
                 "--data", "digits", "--max-steps", "3", "--protocol", "accuracy", "--out", str(out), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["steps"] == 3 and np.isfinite(metrics["curve"][0]["train_loss"])
    from batchmates.nn import BA2M

    model = Method.from_checkpoint(out)
    assert sum(isinstance(m, BA2M) for m in model.modules()) == 8  # one per residual block of a ResNet-18


def test_ba2m_on_a_model_without_residual_blocks_is_a_config_error(digits) -> None:
    cfg = RunConfig(method="ba2m", backbone="timm:vit_tiny_patch16_224", backbone_kwargs={"patch_size": 4,
                    "depth": 1}, batch_size=16).resolve()
    with pytest.raises(ConfigError, match="no timm or torchvision ResNet residual block.*--backbone"):
        get_method("ba2m")(cfg, DataInfo.from_splits(digits))


def test_ibaformer_on_a_timm_vit_keeps_the_pretrained_model_in_independent_eval(tmp_path, digits) -> None:
    kw = {"patch_size": 4, "depth": 2}
    torch.manual_seed(1)
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, img_size=8, **kw)
    weights = tmp_path / "vit.pt"
    torch.save(plain.state_dict(), weights)
    cfg = RunConfig(method="ibaformer", backbone="timm:vit_tiny_patch16_224", backbone_kwargs=kw,
                    pretrained_path=str(weights), batch_size=16, options={"iba_blocks": "all"}).resolve()
    model = get_method("ibaformer")(cfg, DataInfo.from_splits(digits)).eval()
    from batchmates.nn.ibaformer_convert import TimmIntraBatchAttention

    assert all(isinstance(b.attn, TimmIntraBatchAttention) for b in model.backbone.model.blocks)
    x = model.normalize(digits.test.images[:6])
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), plain.eval()(x), rtol=1e-5, atol=1e-5)
    model.train()
    loss = model.training_step(_batch(digits), 0)
    assert torch.isfinite(loss)


def test_export_loads_strictly_into_timm_and_gives_the_same_features(supcon_run, digits) -> None:
    assert main(["export", str(supcon_run)]) == 0
    weights = supcon_run / "export" / "backbone.safetensors"
    net = timm.create_model("resnet18", num_classes=0, in_chans=1)
    net.load_state_dict(load_file(str(weights)), strict=True)
    model = Method.from_checkpoint(supcon_run)
    x = model.normalize(digits.test.images[:8])
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model.embed(x), rtol=1e-5, atol=1e-5)
    card = json.loads((supcon_run / "export" / "backbone.json").read_text())
    metrics = json.loads((supcon_run / "metrics.json").read_text())
    assert card["spec"]["name"] == "resnet18" and card["in_channels"] == 1 and card["image_size"] == 8
    assert card["mean"] == list(model.info.mean) and card["metrics"]["test_acc"] == metrics["test_acc"]
    assert card["run"]["method"] == "supcon"


def test_embed_reproduces_eval_knn_accuracy(supcon_run, tmp_path) -> None:
    assert main(["embed", str(supcon_run), "--split", "train", "--out", str(tmp_path / "train.npz")]) == 0
    assert main(["embed", str(supcon_run), "--split", "test", "--out", str(tmp_path / "test.npy")]) == 0
    pq = pytest.importorskip("pyarrow.parquet")
    assert main(["embed", str(supcon_run), "--split", "test", "--out", str(tmp_path / "test.parquet")]) == 0
    table = pq.read_table(tmp_path / "test.parquet")
    np.testing.assert_array_equal(np.stack(table["features"].to_numpy(zero_copy_only=False)),
                                  np.load(tmp_path / "test.npy"))
    train = np.load(tmp_path / "train.npz")
    test_f, test_y = np.load(tmp_path / "test.npy"), np.load(tmp_path / "test.labels.npy")
    assert train["features"].shape == (1347, 512) and test_f.shape == (450, 512)
    got = knn_accuracy(*(torch.from_numpy(a) for a in (train["features"], train["labels"], test_f, test_y)),
                       num_classes=10)
    want = json.loads((supcon_run / "metrics.json").read_text())["eval"]["knn"]
    assert got == pytest.approx(want, abs=1e-9)


def test_export_and_embed_refuse_bad_arguments(supcon_run, tmp_path, capsys) -> None:
    assert main(["export", str(supcon_run), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert main(["embed", str(supcon_run), "--data", "fashion-mnist-typo", "--out", str(tmp_path / "e.npz")]) == 2
    assert main(["embed", str(supcon_run), "--out", str(tmp_path / "e.csv")]) == 2
    assert ".npy, .npz or .parquet" in capsys.readouterr().err


@pytest.mark.slow
def test_onnx_export_of_a_run_matches_the_model(supcon_run, digits) -> None:
    ort = pytest.importorskip("onnxruntime")
    assert main(["export", str(supcon_run), "--format", "onnx"]) == 0
    model = Method.from_checkpoint(supcon_run)
    x = model.normalize(digits.test.images[:5])
    got = ort.InferenceSession(str(supcon_run / "export" / "backbone.onnx")).run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, model.embed(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    card = json.loads((supcon_run / "export" / "backbone.onnx.json").read_text())
    assert card["input"]["shape"] == ["N", 1, 8, 8] and card["std"] == list(model.info.std)


def test_export_of_an_ibaformer_timm_vit_rebuilds_with_its_conversion(tmp_path, digits) -> None:
    from batchmates.export import load_exported_backbone

    out = tmp_path / "iba"
    assert main(["train", "--method", "ibaformer", "--backbone", "timm:vit_tiny_patch16_224", "--backbone-kwarg",
                 "patch_size=4", "--backbone-kwarg", "depth=2", "--data", "digits", "--max-steps", "2",
                 "--protocol", "accuracy", "--out", str(out), *FAST]) == 0
    assert main(["export", str(out)]) == 0
    card = json.loads((out / "export" / "backbone.json").read_text())
    assert card["spec"]["to_ibaformer"]["blocks"] == [0, 1]  # iba_blocks=last2 of depth 2
    again = load_exported_backbone(out / "export" / "backbone.safetensors").eval()
    model = Method.from_checkpoint(out)
    x = model.normalize(digits.test.images[:6])
    with torch.no_grad():
        torch.testing.assert_close(again(x), model.embed(x))


def test_a_rerun_with_an_own_backbone_drops_the_recorded_foreign_spec(digits) -> None:
    spec = {"source": "timm", "name": "resnet18", "in_channels": 1, "image_size": 8}
    cfg = RunConfig(method="ce", backbone="cnn", backbone_spec=spec).resolve()  # e.g. --config old.yaml --backbone cnn
    assert get_method("ce")(cfg, DataInfo.from_splits(digits)).resolved_config.backbone_spec is None
