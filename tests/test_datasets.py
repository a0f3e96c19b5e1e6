"""batchmates.data.datasets and batchmates.data.loaders: real data, IDX parsing, errors, resumable loaders."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from batchmates.data import (
    DatasetNotFoundError,
    InMemoryBatchLoader,
    InMemoryImages,
    describe_datasets,
    load_dataset,
    make_loader,
    read_idx,
)
from batchmates.data.datasets import fashion_mnist as ds  # the module that reads FASHION_MNIST_SYSTEM_DIR

torch.set_num_threads(1)


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No $BATCHMATES_DATA, an empty download cache and an empty system Fashion-MNIST folder."""
    monkeypatch.delenv("BATCHMATES_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system" / "fashion-mnist")
    return tmp_path


def _write_idx(path: Path, arr: np.ndarray, *, gz: bool = True, magic: bytes | None = None) -> None:
    head = magic if magic is not None else bytes([0, 0, 0x08, arr.ndim])
    payload = head + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _write_fashion(folder: Path, n_train: int = 12, n_test: int = 6, gz: bool = True) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, arr in arrays.items():
        _write_idx(folder / name, arr, gz=gz)
    return arrays


# ------------------------------------------------------------------------------------------------ digits
def test_digits_split_is_fixed_stratified_and_scaled():
    from sklearn.datasets import load_digits

    a, b = load_dataset("digits"), load_dataset("digits")
    assert (len(a.train), len(a.test)) == (1347, 450)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.train.images.dtype == torch.uint8 and a.train.labels.dtype == torch.int64
    assert a.train.images.shape[1:] == (1, 8, 8) and (a.in_channels, a.image_size, a.num_classes) == (1, 8, 10)
    assert int(a.train.images.max()) == 255 and int(a.train.images.min()) == 0
    assert a.hflip is False
    # stratified: each class's test share is within one image of 25 %
    raw = load_digits()
    for c in range(10):
        n_c = int((raw.target == c).sum())
        assert abs(int((a.test.labels == c).sum()) - 0.25 * n_c) <= 1.0
    # the union of both splits is the whole data set, pixel values 0..16 mapped linearly to 0..255
    all_imgs = torch.cat([a.train.images, a.test.images]).reshape(-1, 64).double()
    expected = torch.from_numpy(np.rint(raw.images.reshape(-1, 64) * 255 / 16))
    assert sorted(map(tuple, all_imgs.tolist())) == sorted(map(tuple, expected.tolist()))
    # mean/std are the training set's
    x = a.train.images.double() / 255
    assert a.mean[0] == pytest.approx(x.mean().item(), abs=1e-4)
    assert a.std[0] == pytest.approx(x.std(unbiased=False).item(), abs=1e-4)


def test_digits_resize():
    d = load_dataset("digits", image_size=16)
    assert d.train.images.shape[1:] == (1, 16, 16) and d.image_size == 16 and d.train.images.dtype == torch.uint8


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_dataset("mnist-ish")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=0)


# ------------------------------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    _write_idx(tmp_path / "x-idx3-ubyte", arr, gz=gz)
    out = read_idx(tmp_path / ("x-idx3-ubyte.gz" if gz else "x-idx3-ubyte"))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    arr = np.zeros((2, 2, 2))
    _write_idx(tmp_path / "bad", arr, gz=False, magic=b"\x12\x34\x08\x03")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    good = tmp_path / "trunc"
    _write_idx(good, arr, gz=False)
    good.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(good)
    _write_idx(tmp_path / "ok", arr, gz=False)
    with pytest.raises(ValueError, match="expected 1"):
        read_idx(tmp_path / "ok", expect_ndim=1)


@pytest.mark.parametrize("sub", ["", "fashion-mnist", "FashionMNIST/raw"])
def test_fashion_from_data_dir(isolated, sub):
    root = isolated / "data"
    arrays = _write_fashion(root / sub if sub else root)
    f = load_dataset("fashion-mnist", data_dir=root)
    assert f.train.images.shape == (12, 1, 28, 28) and f.test.images.shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(f.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(f.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert f.num_classes == 10 and f.classes[0] == "T-shirt/top" and f.hflip is True


def test_fashion_from_env_and_uncompressed(isolated, monkeypatch):
    env = isolated / "env"
    _write_fashion(env / "fashion-mnist", gz=False)
    monkeypatch.setenv("BATCHMATES_DATA", str(env))
    assert len(load_dataset("fashion-mnist").train) == 12


def test_fashion_mismatched_counts(isolated):
    root = isolated / "data"
    _write_fashion(root)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    _write_idx(root / "t10k-labels-idx1-ubyte", np.arange(5), gz=True)
    with pytest.raises(ValueError, match="6 images but 5 labels"):
        load_dataset("fashion-mnist", data_dir=root)


def test_fashion_missing_message_lists_places_and_fixes(isolated):
    empty = isolated / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=empty)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for place in (empty, empty / "fashion-mnist"):
        assert str(place) in msg
    # an explicit data_dir is the only place looked: no silent fall-back to another copy (issue 12)
    assert str(ds.FASHION_MNIST_SYSTEM_DIR) not in msg and str(isolated / "cache") not in msg
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist")
    msg = str(info.value)
    for place in (ds.FASHION_MNIST_SYSTEM_DIR, isolated / "cache"):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--download" in msg and "--data-dir" in msg


def test_cifar_missing_message(isolated):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py") as info:
        load_dataset("cifar10", data_dir=isolated / "nothing")
    assert str(isolated / "nothing") in str(info.value) and "--download" in str(info.value)


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist); CI installs it",
)
def test_real_fashion_mnist_shapes(monkeypatch):
    monkeypatch.delenv("BATCHMATES_DATA", raising=False)
    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIR", Path("/usr/share/datasets/fashion-mnist"))
    f = load_dataset("fashion-mnist")
    assert f.train.images.shape == (60000, 1, 28, 28) and f.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(f.train.labels).tolist() == [6000] * 10
    assert f.mean[0] == pytest.approx(0.2860, abs=1e-3) and f.std[0] == pytest.approx(0.3530, abs=1e-3)


def test_describe_datasets(isolated):
    root = isolated / "data"
    _write_fashion(root, n_train=7, n_test=3)
    rows = {r["name"]: r for r in describe_datasets(root)}
    for name in ("digits", "fashion-mnist", "cifar10", "cifar100", "stl10", "flowers102"):
        assert set(rows[name]) >= {"name", "present", "location", "size", "how"}
    assert rows["fashion-mnist"]["present"] and "7 train / 3 test" in rows["fashion-mnist"]["size"]
    assert rows["fashion-mnist"]["location"] == str(root)
    assert rows["digits"]["present"] and "1347 train / 450 test" in rows["digits"]["size"]
    assert not rows["cifar10"]["present"] and str(root) in rows["cifar10"]["location"]
    assert "--download" in rows["cifar10"]["how"]
    empty_rows = {r["name"]: r for r in describe_datasets(isolated / "none")}
    assert not empty_rows["fashion-mnist"]["present"] and "apt-get" in empty_rows["fashion-mnist"]["how"]


def test_imagefolder_split_and_decoding(tmp_path):
    from PIL import Image

    for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.new("RGB", (20 + i, 12), color).save(tmp_path / c / f"{i}.png")
    d = load_dataset(f"imagefolder:{tmp_path}", image_size=8)
    assert (len(d.train), len(d.test), d.num_classes, d.classes) == (8, 2, 2, ("cat", "dog"))
    labels = sorted(int(d.test[i][1]) for i in range(len(d.test)))
    assert labels == [0, 1]  # stratified
    img, label = d.train[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 8, 8)
    assert img[0].float().mean() > 250 if label == 0 else img[2].float().mean() > 250
    loader = make_loader(d.train, batch_size=4, num_workers=0)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.uint8 and labels.dtype == torch.int64


# ------------------------------------------------------------------------------------------------ loaders
def _toy(n: int = 23) -> InMemoryImages:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return InMemoryImages(images, torch.arange(n))


def _epoch(loader) -> list[list[int]]:
    return [labels.tolist() for _, labels in loader]


def test_loader_permutation_is_a_function_of_seed_and_epoch():
    a, b = InMemoryBatchLoader(_toy(), 5, seed=3), InMemoryBatchLoader(_toy(), 5, seed=3)
    e0 = _epoch(a)
    assert e0 == _epoch(b) and len(e0) == len(a) == 5
    assert sorted(sum(e0, [])) == list(range(23))  # a permutation, last batch partial
    e1 = _epoch(a)  # auto-advance after a full pass
    assert e1 != e0 and sorted(sum(e1, [])) == list(range(23))
    b.set_epoch(1)
    assert _epoch(b) == e1
    b.set_epoch(0)
    assert _epoch(b) == e0
    assert _epoch(InMemoryBatchLoader(_toy(), 5, seed=4)) != e0
    ordered = InMemoryBatchLoader(_toy(), 5, shuffle=False, drop_last=True)
    assert len(ordered) == 4 and _epoch(ordered) == [list(range(i, i + 5)) for i in range(0, 20, 5)]
    # images travel with their labels
    images, labels = next(iter(InMemoryBatchLoader(_toy(), 5, seed=1)))
    assert torch.equal(images[:, 0, 0, 0].long(), labels) and images.dtype == torch.uint8


def test_loader_state_dict_resumes_mid_epoch_exactly():
    full = InMemoryBatchLoader(_toy(), 4, seed=7)
    full.set_epoch(2)
    expected = _epoch(full)
    run = InMemoryBatchLoader(_toy(), 4, seed=7)
    run.set_epoch(2)
    it = iter(run)
    seen = [next(it)[1].tolist() for _ in range(3)]
    state = run.state_dict()
    assert state["epoch"] == 2 and state["batches_yielded"] == 3
    resumed = InMemoryBatchLoader(_toy(), 4, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # Lightning re-announces the epoch after restoring: must not rewind
    assert seen + _epoch(resumed) == expected
    assert _epoch(resumed) == _epoch(full)  # and then continues with epoch 3 like the uninterrupted one
    # a state saved at the end of an epoch resumes with the next epoch
    end = InMemoryBatchLoader(_toy(), 4, seed=7)
    end.load_state_dict({**state, "batches_yielded": len(end)})
    check = InMemoryBatchLoader(_toy(), 4, seed=7)
    check.set_epoch(3)
    assert _epoch(end) == _epoch(check)
    with pytest.raises(ValueError, match="batch_size"):
        InMemoryBatchLoader(_toy(), 5, seed=7).load_state_dict(state)


def test_loader_rank_split_is_disjoint_covering_and_matches_global_batches():
    n, b, w = 24, 3, 2
    single = _epoch(InMemoryBatchLoader(_toy(n), b * w, seed=5))
    ranks = [_epoch(InMemoryBatchLoader(_toy(n), b, seed=5, num_replicas=w, rank=r)) for r in range(w)]
    flat = [sum(r, []) for r in ranks]
    assert set(flat[0]).isdisjoint(flat[1]) and sorted(flat[0] + flat[1]) == list(range(n))
    for k, batch in enumerate(single):  # rank batches k together = single-process batch k
        assert sorted(ranks[0][k] + ranks[1][k]) == sorted(batch)
    # uneven: pad repeats, drop trims; all ranks get the same number of batches
    pad = [InMemoryBatchLoader(_toy(23), 4, seed=0, num_replicas=3, rank=r) for r in range(3)]
    drop = [InMemoryBatchLoader(_toy(23), 4, seed=0, num_replicas=3, rank=r, even="drop") for r in range(3)]
    pad_flat = [sum(_epoch(p), []) for p in pad]
    assert [len(f) for f in pad_flat] == [8, 8, 8] and set(sum(pad_flat, [])) == set(range(23))
    drop_flat = [sum(_epoch(p), []) for p in drop]
    assert [len(f) for f in drop_flat] == [7, 7, 7] and len(set(sum(drop_flat, []))) == 21
    with pytest.raises(ValueError, match="rank"):
        InMemoryBatchLoader(_toy(), 4, num_replicas=2, rank=2)


def test_loader_reads_rank_and_world_from_batchmates_distributed(monkeypatch):
    from batchmates import distributed as bm_dist

    loader = InMemoryBatchLoader(_toy(20), 5, seed=11)  # built outside; rank/world are read at iteration time
    got = []
    for r in range(2):
        monkeypatch.setattr(bm_dist, "world_size", lambda: 2)
        monkeypatch.setattr(bm_dist, "rank", lambda r=r: r)
        loader.set_epoch(0)
        assert len(loader) == 2
        got.append(sum(_epoch(loader), []))
    assert set(got[0]).isdisjoint(got[1]) and sorted(got[0] + got[1]) == list(range(20))
    assert got[1] == sum(_epoch(InMemoryBatchLoader(_toy(20), 5, seed=11, num_replicas=2, rank=1)), [])


def test_loader_validation():
    with pytest.raises(TypeError, match="InMemoryImages"):
        InMemoryBatchLoader(torch.zeros(3), 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        InMemoryBatchLoader(_toy(), 0)
    with pytest.raises(ValueError, match="uint8"):
        InMemoryImages(torch.zeros(2, 1, 2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="labels"):
        InMemoryImages(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3))


def test_loader_resumes_inside_lightning_fit(tmp_path):
    """Kill-free mid-epoch resume through Lightning's own checkpoint/restore of loader state."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Rec(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)
            self.seen: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            images, labels = batch
            self.seen.append(labels.tolist())
            return self.lin(images.float().flatten(1)).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def fit(ckpt=None, callbacks=()):
        model = Rec()
        trainer = L.Trainer(
            max_epochs=2,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=bool(callbacks),
            callbacks=list(callbacks),
            default_root_dir=tmp_path,
        )
        trainer.fit(model, train_dataloaders=InMemoryBatchLoader(_toy(23), 4, seed=2), ckpt_path=ckpt)
        return model.seen

    cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1, filename="{step}")
    full = fit(callbacks=[cb])  # 6 batches per epoch; step 8 is batch 2 of epoch 1
    assert len(full) == 12 and full[:6] != full[6:]
    resumed = fit(ckpt=str(tmp_path / "step=8.ckpt"))
    assert resumed == full[8:]
