"""Export: backbone weights that load strictly into the original timm/torchvision model or create_backbone,
the JSON card, ONNX (checked with onnx.checker and onnxruntime), and embeddings files."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file

from batchmates.export import (
    backbone_spec,
    card_path,
    export_backbone,
    export_onnx,
    load_exported_backbone,
    write_embeddings,
)
from batchmates.models import create_backbone

META = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "metrics": {"knn_top1": 0.71}}


def _trained_like(net: torch.nn.Module) -> torch.nn.Module:
    """Run a few training forwards so BatchNorm statistics differ from their initial values."""
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(8, net.in_channels, 32, 32) * 2 + 1)
    return net.eval()


def test_timm_backbone_loads_strictly_into_timm_and_gives_the_same_features(tmp_path) -> None:
    torch.manual_seed(0)
    net = _trained_like(create_backbone("timm:resnet18", in_channels=3, image_size=32))
    card = export_backbone(net, tmp_path / "bb.safetensors", metadata=META)
    plain = timm.create_model("resnet18", pretrained=False, num_classes=0)
    plain.load_state_dict(load_file(str(tmp_path / "bb.safetensors")), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), net(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_exported_backbone(tmp_path / "bb.safetensors").eval()(x), net(x))
    info = json.loads(card.read_text())
    assert card == card_path(tmp_path / "bb.safetensors") == tmp_path / "bb.json"
    assert info["spec"]["source"] == "timm" and info["spec"]["name"] == "resnet18" and info["keys"] == "timm"
    assert info["feature_dim"] == 512 and info["in_channels"] == 3 and info["image_size"] == 32
    assert info["mean"] == META["mean"] and info["metrics"] == META["metrics"]
    assert "timm.create_model('resnet18', num_classes=0" in info["load"]


def test_torchvision_backbone_loads_strictly_into_torchvision(tmp_path) -> None:
    torch.manual_seed(0)
    net = _trained_like(create_backbone("torchvision:resnet18", in_channels=3, image_size=32))
    export_backbone(net, tmp_path / "tv.safetensors")
    plain = torchvision.models.resnet18()
    plain.fc = torch.nn.Identity()
    plain.load_state_dict(load_file(str(tmp_path / "tv.safetensors")), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), net(x), rtol=1e-5, atol=1e-5)


def test_own_backbone_with_ba2m_loads_strictly_into_create_backbone(tmp_path) -> None:
    torch.manual_seed(0)
    net = create_backbone("cnn", in_channels=3, image_size=32, attn_layer="ba2m")
    _trained_like(net)
    spec = backbone_spec(net, name="cnn", attn_layer="ba2m")
    export_backbone(net, tmp_path / "cnn.safetensors", metadata=META, spec=spec)
    fresh = create_backbone("cnn", in_channels=3, image_size=32, attn_layer="ba2m")
    fresh.load_state_dict(load_file(str(tmp_path / "cnn.safetensors")), strict=True)
    again = load_exported_backbone(tmp_path / "cnn.json")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), net(x))
        torch.testing.assert_close(again.eval()(x), net(x))
    assert int(again.stages[0][-1].n_train) == 8  # BA2M's training batch size travelled with the weights


def test_export_refuses_bad_arguments(tmp_path) -> None:
    net = create_backbone("cnn", in_channels=1, image_size=8)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export_backbone(net, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"\['feature_dim'\] are reserved"):
        export_backbone(net, tmp_path / "x.safetensors", metadata={"feature_dim": 3})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        export_backbone(net, tmp_path / "x.safetensors", metadata={"bad": object()})
    assert not (tmp_path / "x.safetensors").exists()
    export_backbone(net, tmp_path / "anon.safetensors")  # no name: the card says how to load it by hand
    with pytest.raises(ValueError, match="cannot be rebuilt automatically"):
        load_exported_backbone(tmp_path / "anon.safetensors")


@pytest.mark.parametrize("name", ["cnn", "timm:resnet18"])
def test_onnx_matches_pytorch_with_a_dynamic_batch(name, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    attn = "ba2m" if name == "cnn" else "none"
    net = _trained_like(create_backbone(name, in_channels=3, image_size=32, attn_layer=attn))
    path = export_onnx(net, tmp_path / "bb.onnx", image_size=32, in_channels=3)
    onnx.checker.check_model(str(path))
    x = torch.randn(5, 3, 32, 32)  # another batch size than the 2 it was traced with
    got = ort.InferenceSession(str(path)).run(["features"], {"images": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, net(x).numpy(), rtol=1e-4, atol=1e-4)
    assert net.training is False and (name != "cnn" or net.stages[0][-1].check_finite is None)  # a copy exported


def test_onnx_without_the_extra_names_the_install(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'batchmates\[export\]'"):
        export_onnx(create_backbone("cnn", in_channels=1, image_size=8), tmp_path / "m.onnx", image_size=8,
                    in_channels=1)


def test_embeddings_npy_and_npz_round_trip(tmp_path) -> None:
    f = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    files = write_embeddings(f, y, tmp_path / "e.npy")
    assert files == [tmp_path / "e.npy", tmp_path / "e.labels.npy"]
    feats = np.load(files[0])
    assert feats.dtype == np.float32 and feats.shape == (6, 4)
    np.testing.assert_allclose(feats, f.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(np.load(files[1]), y.numpy())
    write_embeddings(f, None, tmp_path / "u.npz")
    with np.load(tmp_path / "u.npz") as z:
        assert sorted(z.files) == ["features"]
    write_embeddings(f, y, tmp_path / "l.npz")
    with np.load(tmp_path / "l.npz") as z:
        np.testing.assert_array_equal(z["labels"], y.numpy())
    with pytest.raises(ValueError, match=r"labels must have shape \[N\] = \[6\]"):
        write_embeddings(f, y[:3], tmp_path / "bad.npy")
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        write_embeddings(f[0], None, tmp_path / "bad.npy")
    with pytest.raises(ValueError, match=r"\.npy, \.npz or \.parquet"):
        write_embeddings(f, y, tmp_path / "e.csv")


def test_embeddings_parquet(monkeypatch, tmp_path) -> None:
    f, y = torch.randn(5, 3), torch.arange(5)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        write_embeddings(f, y, tmp_path / "e.parquet")
        table = pq.read_table(tmp_path / "e.parquet")
        np.testing.assert_allclose(np.stack(table.column("features").to_pylist()), f.numpy(), rtol=1e-6)
        assert table.column("labels").to_pylist() == y.tolist()
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        write_embeddings(f, y, tmp_path / "x.parquet")
