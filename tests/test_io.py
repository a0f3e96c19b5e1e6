"""Atomic writes: an interrupted write leaves the previous file intact and no temporary file behind."""

from __future__ import annotations

import json
import os

import pytest
import torch

from batchmates.training.io import (
    atomic_open,
    atomic_save_torch,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
)


def _leftovers(d) -> list[str]:
    return [n for n in os.listdir(d) if n.endswith(".tmp")]


def test_text_json_bytes_roundtrip(tmp_path) -> None:
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_json(tmp_path / "m.json", {"acc": torch.tensor(0.5), "xs": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"acc": 0.5, "xs": [1, 2]}
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic_save_torch({"w": torch.arange(3)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt")["w"], torch.arange(3))
    assert read_json(tmp_path / "missing.json", default={"x": 1}) == {"x": 1}
    assert _leftovers(tmp_path) == []


def test_exception_mid_write_keeps_previous_file(tmp_path) -> None:
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"acc": 0.9})
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_open(path, "w") as f:
            f.write('{"acc": 0.1, "half')  # a partial document reaches the temp file ...
            f.flush()
            raise RuntimeError("crash")  # ... and the process fails before the rename
    assert json.loads(path.read_text()) == {"acc": 0.9}
    assert _leftovers(tmp_path) == []


def test_unserialisable_json_never_touches_the_file(tmp_path) -> None:
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"acc": 0.9})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"acc": 0.9}
    assert _leftovers(tmp_path) == []


def test_failing_torch_save_keeps_previous_checkpoint(tmp_path) -> None:
    path = tmp_path / "last.ckpt"
    atomic_save_torch({"step": 1}, path)

    def broken_save(obj, f) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save_torch({"step": 2}, path, save=broken_save)
    assert torch.load(path) == {"step": 1}
    assert _leftovers(tmp_path) == []


def test_bad_mode_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "x", "a"):
            pass
