"""batchmates.data.corruptions: deterministic, severity-monotone domain shifts."""

from __future__ import annotations

import pytest
import torch

from batchmates.data import CORRUPTIONS, corrupt

torch.set_num_threads(1)


def _images(size: int = 16, ch: int = 3, n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(n, ch, size // 4, size // 4, generator=g)
    smooth = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    lo = smooth.amin(dim=(1, 2, 3), keepdim=True)
    hi = smooth.amax(dim=(1, 2, 3), keepdim=True)
    return ((smooth - lo) / (hi - lo) * 230 + 15).round().to(torch.uint8)  # structured, spans 15..245


def _dist(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).square().mean().sqrt().item()


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_deterministic_dtype_shape(kind):
    x = _images()
    a, b = corrupt(x, kind, 3, seed=0), corrupt(x.clone(), kind, 3, seed=0)
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    assert not torch.equal(a, x)
    assert torch.equal(x, _images())  # input untouched


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("size,ch", [(8, 1), (28, 1), (32, 3)])
def test_distance_grows_with_severity(kind, size, ch):
    x = _images(size, ch)
    d = [_dist(corrupt(x, kind, s), x) for s in range(1, 6)]
    assert d[0] > 0 and all(b > a for a, b in zip(d, d[1:])), d


def test_seed_changes_random_kinds_only():
    x = _images()
    for kind in ("gaussian_noise", "elastic"):
        assert not torch.equal(corrupt(x, kind, 2, seed=0), corrupt(x, kind, 2, seed=1))
    for kind in ("gaussian_blur", "contrast", "invert"):
        assert torch.equal(corrupt(x, kind, 2, seed=0), corrupt(x, kind, 2, seed=1))


def test_known_values():
    x = _images()
    torch.testing.assert_close(corrupt(x, "invert", 5), 255 - x)
    inv1 = corrupt(x, "invert", 1)
    assert torch.equal(inv1, torch.where(x >= 224, 255 - x, x))
    c = corrupt(x, "contrast", 5).double()
    m = x.double().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(c, ((x.double() - m) * 0.15 + m).round(), atol=1.0, rtol=0)
    # a constant image is unchanged by blur and contrast
    flat = torch.full((2, 1, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(corrupt(flat, "gaussian_blur", 5), flat) and torch.equal(corrupt(flat, "contrast", 5), flat)
    # noise has the stated standard deviation (severity 5: 0.10 in [0, 1] units)
    mid = torch.full((4, 1, 32, 32), 128, dtype=torch.uint8)
    std = (corrupt(mid, "gaussian_noise", 5).double() - 128).std().item() / 255
    assert std == pytest.approx(0.10, rel=0.1)


def test_validation():
    x = _images()
    with pytest.raises(ValueError, match="kind"):
        corrupt(x, "snow", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "contrast", 0)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "contrast", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(x.float(), "contrast", 1)
