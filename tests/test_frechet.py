"""Discrete and Gaussian Fréchet distances (batchmates.curation.frechet) against independent references."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import scipy.linalg
import torch

from batchmates.curation import (
    discrete_frechet_distance,
    discrete_frechet_distance_all_pairs,
    gaussian_frechet_distance,
)

torch.set_num_threads(1)


def reference_frechet(p: list[float], q: list[float]) -> float:
    """Textbook discrete Fréchet recurrence, plain Python, full table, row by row."""
    n, m = len(p), len(q)
    c = [[math.inf] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            d = abs(p[i] - q[j])
            if i == 0 and j == 0:
                c[i][j] = d
                continue
            best = min(
                c[i - 1][j] if i > 0 else math.inf,
                c[i - 1][j - 1] if i > 0 and j > 0 else math.inf,
                c[i][j - 1] if j > 0 else math.inf,
            )
            c[i][j] = max(best, d)
    return c[n - 1][m - 1]


def reference_gaussian(x: np.ndarray, y: np.ndarray) -> float:
    """FID formula with scipy's (non-symmetric) sqrtm, as in the common FID code."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("seed", range(4))
def test_discrete_matches_reference_varied_lengths(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lengths = [(1, 1), (1, 5), (6, 1), (2, 2), (7, 7), (3, 11), (12, 4), (rng.randint(1, 20), rng.randint(1, 20))]
    for d1, d2 in lengths:
        p = torch.randn(5, d1, generator=gen, dtype=torch.float64)
        q = torch.randn(5, d2, generator=gen, dtype=torch.float64) * 1.5 + 0.3
        out = discrete_frechet_distance(p, q)
        assert out.shape == (5,) and out.dtype == torch.float64
        expected = torch.tensor(
            [reference_frechet(p[r].tolist(), q[r].tolist()) for r in range(5)], dtype=torch.float64
        )
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12, msg=f"D1={d1}, D2={d2}")


def test_discrete_with_ties_and_integer_like_values():
    # Many equal distances stress the min/max bookkeeping at diagonal borders.
    gen = torch.Generator().manual_seed(3)
    p = torch.randint(0, 3, (20, 9), generator=gen).double()
    q = torch.randint(0, 3, (20, 13), generator=gen).double()
    out = discrete_frechet_distance(p, q)
    expected = [reference_frechet(p[r].tolist(), q[r].tolist()) for r in range(20)]
    assert out.tolist() == expected


def test_discrete_symmetric_zero_on_identical_and_nonnegative():
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(16, 9, generator=gen, dtype=torch.float64)
    q = torch.randn(16, 14, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(discrete_frechet_distance(p, q), discrete_frechet_distance(q, p), rtol=0, atol=0)
    assert torch.equal(discrete_frechet_distance(p, p), torch.zeros(16, dtype=torch.float64))
    assert (discrete_frechet_distance(p, q) > 0).all()


def test_discrete_triangle_inequality():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(64, 5, generator=gen, dtype=torch.float64) * 2
    c = torch.randn(64, 11, generator=gen, dtype=torch.float64) - 1
    ab, bc, ac = discrete_frechet_distance(a, b), discrete_frechet_distance(b, c), discrete_frechet_distance(a, c)
    assert (ac <= ab + bc + 1e-12).all()
    assert (ab <= ac + bc + 1e-12).all()


def test_discrete_float32_matches_float64_and_no_nan():
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(32, 40, generator=gen, dtype=torch.float64) * 100
    q = torch.randn(32, 33, generator=gen, dtype=torch.float64) * 100
    out64 = discrete_frechet_distance(p, q)
    out32 = discrete_frechet_distance(p.float(), q.float())
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=1e-4)
    # half inputs are upcast, large values and constant curves stay finite
    half = discrete_frechet_distance(p.half(), q.half())
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    const = discrete_frechet_distance(torch.full((3, 7), 1e30), torch.full((3, 2), -1e30))
    assert torch.isfinite(const).all()
    torch.testing.assert_close(const, torch.full((3,), 2e30))


def test_discrete_does_not_depend_on_other_pairs():
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(10, 12, generator=gen, dtype=torch.float64)
    q = torch.randn(10, 12, generator=gen, dtype=torch.float64)
    full = discrete_frechet_distance(p, q)
    perm = torch.randperm(10, generator=gen)
    torch.testing.assert_close(discrete_frechet_distance(p[perm], q[perm]), full[perm], rtol=0, atol=0)
    torch.testing.assert_close(discrete_frechet_distance(p[3:4], q[3:4]), full[3:4], rtol=0, atol=0)


def test_discrete_empty_batch():
    out = discrete_frechet_distance(torch.zeros(0, 5), torch.zeros(0, 3))
    assert out.shape == (0,)


@pytest.mark.parametrize(
    ("p", "q", "err", "match"),
    [
        (torch.zeros(3), torch.zeros(3), ValueError, r"\[P, D\]"),
        (torch.zeros(3, 4), torch.zeros(2, 4), ValueError, "same number of curves"),
        (torch.zeros(3, 0), torch.zeros(3, 4), ValueError, "at least one point"),
        (torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 2), ValueError, "NaN or Inf"),
        ([[0.0]], torch.zeros(1, 1), TypeError, "torch.Tensor"),
        (torch.zeros(2, 2, dtype=torch.complex64), torch.zeros(2, 2), TypeError, "real"),
    ],
)
def test_discrete_validation(p, q, err, match):
    with pytest.raises(err, match=match):
        discrete_frechet_distance(p, q)


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_all_pairs_equals_loop(chunk_size):
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    b = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    out = discrete_frechet_distance_all_pairs(a, b, chunk_size=chunk_size)
    assert out.shape == (5, 4)
    for m in range(5):
        loop = discrete_frechet_distance(a[m : m + 1].expand(4, -1), b)
        torch.testing.assert_close(out[m], loop, rtol=0, atol=0)
    with pytest.raises(ValueError, match="chunk_size"):
        discrete_frechet_distance_all_pairs(a, b, chunk_size=0)


def test_gaussian_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for n, m, d in [(200, 150, 5), (64, 80, 12)]:
        mix = rng.standard_normal((d, d))
        x = rng.standard_normal((n, d)) @ mix
        y = rng.standard_normal((m, d)) @ (mix + 0.5 * rng.standard_normal((d, d))) + 0.7
        ours = gaussian_frechet_distance(torch.from_numpy(x), torch.from_numpy(y))
        assert ours.dtype == torch.float64 and ours.dim() == 0
        assert ours.item() == pytest.approx(reference_gaussian(x, y), rel=1e-8, abs=1e-8)
    # float32 inputs are computed in float64 as well
    xf = torch.from_numpy(x).float()
    yf = torch.from_numpy(y).float()
    ref32 = reference_gaussian(xf.double().numpy(), yf.double().numpy())
    assert gaussian_frechet_distance(xf, yf).item() == pytest.approx(ref32, rel=1e-8, abs=1e-8)


def test_gaussian_zero_for_identical_positive_for_shift():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(100, 6, generator=gen, dtype=torch.float64)
    assert gaussian_frechet_distance(x, x).item() == pytest.approx(0.0, abs=1e-9)
    shifted = gaussian_frechet_distance(x, x + 2.0).item()
    assert shifted == pytest.approx(4.0 * 6, rel=1e-9)  # only the mean term changes: ||2 * 1||^2
    assert gaussian_frechet_distance(x, x * 3.0).item() > 1.0


def test_gaussian_singular_covariances_finite():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(8, 64, generator=gen, dtype=torch.float64)  # N < D: rank-deficient covariances
    y = torch.randn(5, 64, generator=gen, dtype=torch.float64)
    d = gaussian_frechet_distance(x, y)
    assert torch.isfinite(d) and d.item() > 0
    assert gaussian_frechet_distance(x, x).item() == pytest.approx(0.0, abs=1e-6)
    # With eps*I on both covariances the result is the regularised formula, computed here with scipy.
    eps = 1e-6
    s1 = np.cov(x.numpy(), rowvar=False) + eps * np.eye(64)
    s2 = np.cov(y.numpy(), rowvar=False) + eps * np.eye(64)
    mu = ((x.mean(0) - y.mean(0)) ** 2).sum().item()
    ref = mu + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert d.item() == pytest.approx(ref, rel=1e-5)


def test_gaussian_validation():
    with pytest.raises(ValueError, match="at least 2 rows"):
        gaussian_frechet_distance(torch.zeros(1, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="feature dimension"):
        gaussian_frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        gaussian_frechet_distance(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        gaussian_frechet_distance(torch.full((4, 2), float("inf")), torch.zeros(4, 2))
    with pytest.raises(TypeError, match="floating-point"):
        gaussian_frechet_distance(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gen = torch.Generator().manual_seed(9)
    p = torch.randn(64, 50, generator=gen)
    q = torch.randn(64, 37, generator=gen)
    for dtype in (torch.float32, torch.float64):
        cpu = discrete_frechet_distance(p.to(dtype), q.to(dtype))
        gpu = discrete_frechet_distance(p.to(dtype).cuda(), q.to(dtype).cuda())
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)
    x = torch.randn(40, 16, generator=gen)
    y = torch.randn(30, 16, generator=gen) + 0.5
    torch.testing.assert_close(gaussian_frechet_distance(x.cuda(), y.cuda()).cpu(), gaussian_frechet_distance(x, y))
