"""Fréchet distances used to score positive pairs (The Bad Batches, Göksu & Pugeault 2024, arXiv:2403.19579).

Paper: the Fréchet ResNet Distance (FRD). Two readings of it are served by this file:

* :func:`discrete_frechet_distance`: the *pairwise* FRD of GestureGAN (Tang et al. 2018, arXiv:1808.04859),
  which treats a feature vector as a 1-D curve (point ``i`` is the scalar ``v[i]``) and takes the discrete
  Fréchet distance (Eiter & Mannila 1994) between the two curves. The recurrence is GestureGAN's.
* :func:`gaussian_frechet_distance`: the Fréchet distance between Gaussians fitted to two feature sets (the
  FID formula, Heusel et al. 2017, arXiv:1706.08500), which the reviews of The Bad Batches apply to the two
  augmented views of a batch.

Library choices: evaluating the recurrence along anti-diagonals, vectorised over pairs and cells; the
eigen-decomposition route, the regularisation rule and the exact low-rank route of the Gaussian distance
(documented on the function).

Everything here is plain maths on local tensors: no ``torch.distributed`` and no autograd (these are scoring
functions; their outputs carry no gradient).
"""

from __future__ import annotations

import torch

__all__ = [
    "discrete_frechet_distance",
    "discrete_frechet_distance_all_pairs",
    "gaussian_frechet_distance",
]

# Elements of one DP buffer ([pairs, D1]) per chunk of the all-pairs variant; three such buffers live at once.
_DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _check_curves(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [P, D], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(
            f"{name} must have shape [P, D] (one curve of D points per row), got shape {tuple(x.shape)}; "
            "flatten features with x.flatten(1) first"
        )
    if x.shape[1] < 1:
        raise ValueError(f"{name} must hold curves of at least one point, got shape {tuple(x.shape)}")
    if x.is_complex() or not (
        x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
    ):
        raise TypeError(f"{name} must be a real floating-point (or integer) tensor, got dtype {x.dtype}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values; Fréchet distances need finite curves")
    return x


def _work_dtype(*xs: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half/bfloat16/integer inputs are upcast)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


@torch.no_grad()
def _frechet_antidiagonal(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Core DP on validated, same-dtype, same-device curves p [P, D1], q [P, D2] -> [P].

    Cell (i, j) lies on anti-diagonal k = i + j and depends only on diagonals k-1 (cells (i-1, j), (i, j-1)) and
    k-2 (cell (i-1, j-1)), so each diagonal is one vectorised update over all pairs and all its cells. A diagonal
    is stored by its row index i in a buffer of width D1 + 2 where column ``i + 1`` holds c(i, k - i). The buffers
    start at +inf and rotate (diagonal k reuses the buffer of k - 3). Reads of diagonal k - 1 / k - 2 touch only
    its valid cells, column 0 (i = -1) and the column just above its last valid row; the last two are never
    written (a buffer only ever held diagonals with smaller rows above, and column D1 + 1 is never a cell), so
    they stay +inf and encode the border c(-1, .) = c(., -1) = +inf. Only three buffers: memory O(P * D1).
    """
    n_pairs, d1 = p.shape
    d2 = q.shape[1]
    if n_pairs == 0:
        return p.new_zeros(0)
    q_rev = q.flip(1)  # q_rev[:, m] = q[:, d2 - 1 - m]: the j's of a diagonal become a contiguous slice
    inf = float("inf")
    bufs = [p.new_full((n_pairs, d1 + 2), inf) for _ in range(3)]
    prev2, prev, cur = bufs
    cur[:, 1] = (p[:, 0] - q[:, 0]).abs()  # diagonal k = 0: c(0, 0) = |p_0 - q_0|
    for k in range(1, d1 + d2 - 1):
        prev2, prev, cur = prev, cur, prev2  # rotate: cur reuses the buffer of diagonal k - 3
        lo = max(0, k - d2 + 1)
        hi = min(k, d1 - 1)
        m0 = d2 - 1 - k + lo  # q index j = k - i  <=>  q_rev index d2 - 1 - k + i
        cost = (p[:, lo : hi + 1] - q_rev[:, m0 : m0 + hi - lo + 1]).abs()
        best = torch.minimum(prev[:, lo : hi + 1], prev[:, lo + 1 : hi + 2])  # c(i-1, j), c(i, j-1)
        torch.minimum(best, prev2[:, lo : hi + 1], out=best)  # c(i-1, j-1)
        torch.maximum(best, cost, out=cur[:, lo + 1 : hi + 2])
    return cur[:, d1].clone()  # c(d1 - 1, d2 - 1) sits on the last diagonal at column d1


def discrete_frechet_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Discrete Fréchet distance between row ``i`` of ``p`` and row ``i`` of ``q``, for every ``i``.

    Each row is a 1-D curve: point ``i`` of ``p[r]`` is the scalar ``p[r, i]`` and the point distance is
    ``|p_i - q_j|``. The coupling recurrence (Eiter & Mannila 1994; used as the pairwise FRD of GestureGAN and of
    The Bad Batches, arXiv:2403.19579) is::

        c(0, 0) = |p_0 - q_0|
        c(i, j) = max(min(c(i-1, j), c(i-1, j-1), c(i, j-1)), |p_i - q_j|)     (out-of-range cells = +inf)

    and the distance is ``c(D1-1, D2-1)``.

    Library choices: the table is filled along its ``D1 + D2 - 1`` anti-diagonals, each step one vectorised
    torch update over all pairs and all cells of the diagonal (no Python loop over cells, no recursion), keeping
    only the last two diagonals, so memory is ``O(P * D1)`` and the work ``O(P * D1 * D2)``. Runs on any device.

    Args:
        p: ``[P, D1]`` curves.
        q: ``[P, D2]`` curves; ``D2`` may differ from ``D1``.

    Returns:
        ``[P]`` distances, float64 if either input is float64, else float32 (half and integer inputs are
        upcast). Not differentiable: the result carries no gradient (a scoring function).

    Raises:
        TypeError: non-tensor or complex input.
        ValueError: wrong ranks, mismatched pair counts, empty curves or non-finite values.
    """
    p = _check_curves("p", p)
    q = _check_curves("q", q)
    if p.shape[0] != q.shape[0]:
        raise ValueError(
            f"p and q must hold the same number of curves (row i of p is compared with row i of q), got "
            f"{p.shape[0]} and {q.shape[0]}; use discrete_frechet_distance_all_pairs for every combination"
        )
    if p.device != q.device:
        raise ValueError(f"p and q must be on the same device, got {p.device} and {q.device}")
    dtype = _work_dtype(p, q)
    return _frechet_antidiagonal(p.detach().to(dtype).contiguous(), q.detach().to(dtype).contiguous())


def discrete_frechet_distance_all_pairs(
    a: torch.Tensor, b: torch.Tensor, *, chunk_size: int | None = None
) -> torch.Tensor:
    """Discrete Fréchet distance between every row of ``a`` and every row of ``b``.

    Args:
        a: ``[M, D1]`` curves.
        b: ``[N, D2]`` curves.
        chunk_size: number of (a, b) pairs evaluated per vectorised DP (library choice, bounds memory to about
            ``3 * chunk_size * (D1 + 2)`` elements plus the chunk's curves). Default: about ``2**22 / D1``
            pairs per chunk.

    Returns:
        ``[M, N]`` with ``out[m, n] = discrete_frechet_distance(a[m:m+1], b[n:n+1])``.
    """
    a = _check_curves("a", a)
    b = _check_curves("b", b)
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")
    if chunk_size is None:
        chunk_size = max(1, _DEFAULT_CHUNK_ELEMENTS // (a.shape[1] + b.shape[1]))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dtype = _work_dtype(a, b)
    a = a.detach().to(dtype)
    b = b.detach().to(dtype)
    m, n = a.shape[0], b.shape[0]
    out = a.new_empty(m * n)
    for start in range(0, m * n, chunk_size):
        idx = torch.arange(start, min(start + chunk_size, m * n), device=a.device)
        out[start : start + idx.numel()] = _frechet_antidiagonal(a[idx // n], b[idx % n])
    return out.view(m, n)


def _check_features(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [N, D], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [N, D] (one feature vector per row), got {tuple(x.shape)}")
    if x.is_complex() or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a real floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] < 2:
        raise ValueError(
            f"{name} needs at least 2 rows to estimate a covariance, got {x.shape[0]}; score larger batches"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root by eigh, negative round-off eigenvalues clamped to 0."""
    evals, evecs = torch.linalg.eigh(s)
    return (evecs * evals.clamp_min(0).sqrt().unsqueeze(0)) @ evecs.T


def _trace_sqrt_product(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """``Tr (s1 s2)^{1/2}`` of two symmetric PSD matrices, as ``Tr (s1^{1/2} s2 s1^{1/2})^{1/2}``."""
    r1 = _sqrt_psd(s1)
    mid = r1 @ s2 @ r1
    mid = 0.5 * (mid + mid.T)
    return torch.linalg.eigvalsh(mid).clamp_min(0).sqrt().sum()


def _trace_sqrt_product_lowrank(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """``Tr ((aᵀa + eps I)(bᵀb + eps I))^{1/2}`` for ``a [N, D]``, ``b [M, D]`` with ``N + M < D``, exactly.

    Both matrices act as ``eps I`` on the orthogonal complement of the row space of ``c = [a; b]`` and leave that
    row space invariant, so the trace is the one of the ``r x r`` problem on the row space plus ``(D - r) * eps``.
    An orthonormal basis ``Q = cᵀ U Λ^{-1/2}`` of the row space comes from ``eigh(c cᵀ)``, and ``a Q``, ``b Q``
    from the Gram matrix alone, so the cost is ``O((N + M)² D + (N + M)³)`` instead of ``O(D³)``.
    """
    n, d = a.shape
    c = torch.cat([a, b])
    g = c @ c.T
    lam, u = torch.linalg.eigh(0.5 * (g + g.T))
    tol = lam.max().clamp_min(0) * c.shape[0] * torch.finfo(lam.dtype).eps
    keep = lam > tol
    basis = u[:, keep] / lam[keep].sqrt()
    aq, bq = g[:n] @ basis, g[n:] @ basis
    eye = torch.eye(basis.shape[1], dtype=a.dtype, device=a.device)
    r = basis.shape[1]
    return _trace_sqrt_product(aq.T @ aq + eps * eye, bq.T @ bq + eps * eye) + (d - r) * eps


def gaussian_frechet_distance(x: torch.Tensor, y: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """Fréchet distance between Gaussians fitted to the rows of ``x`` and of ``y`` (the FID formula).

    ``d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})`` (Heusel et al. 2017, arXiv:1706.08500; the batch-level
    FRD reading of The Bad Batches, arXiv:2403.19579, with μ, Σ of the two views' features).

    Library choices, exactly:

    * Everything is computed in float64 (inputs are upcast). Means are row means; covariances are the unbiased
      sample covariances (denominator ``N − 1``, as ``numpy.cov``).
    * ``Tr (Σ1 Σ2)^{1/2}`` is evaluated as ``Tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}`` (the same eigenvalues, but of a
      symmetric PSD matrix): ``Σ1^{1/2}`` from ``eigh(Σ1)``, then the eigenvalues of the symmetrised
      ``Σ1^{1/2} Σ2 Σ1^{1/2}``, clamped at 0 against round-off, square-rooted and summed. No non-symmetric
      ``sqrtm`` and no complex parts.
    * Regularisation: when a covariance is singular by construction, i.e. ``N <= D`` or ``M <= D`` (fewer samples
      than dimensions + 1), ``eps * I`` is added to *both* covariances before the square root and the traces;
      with ``N > D`` and ``M > D`` nothing is added (``eps`` is then unused). This mirrors the offset of the
      common FID code but applies it by a deterministic rule rather than on failure.
    * When ``N + M < D`` (small batches of wide features, e.g. a Barlow Twins projector) the same regularised
      value is computed on the ``N + M``-dimensional span of the centred rows (both covariances are ``eps I``
      outside it; see ``_trace_sqrt_product_lowrank``): exact, at ``O((N + M)² D)`` instead of ``O(D³)``.
    * The result is clamped at 0 (it can only be negative by round-off).

    Args:
        x: ``[N, D]`` features, ``N >= 2``.
        y: ``[M, D]`` features, ``M >= 2``; ``M`` may differ from ``N``.
        eps: non-negative diagonal offset used in the singular case.

    Returns:
        A float64 scalar tensor on the inputs' device; no gradient.
    """
    x = _check_features("x", x)
    y = _check_features("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature dimension, got {x.shape[1]} and {y.shape[1]}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    with torch.no_grad():
        x = x.detach().to(torch.float64)
        y = y.detach().to(torch.float64)
        n, m, d = x.shape[0], y.shape[0], x.shape[1]
        mu1, mu2 = x.mean(0), y.mean(0)
        a = (x - mu1) / (n - 1) ** 0.5  # Σ1 = aᵀa
        b = (y - mu2) / (m - 1) ** 0.5
        singular = n <= d or m <= d
        off = float(eps) if singular else 0.0
        trace_s1 = a.square().sum() + d * off
        trace_s2 = b.square().sum() + d * off
        if singular and n + m < d:
            tr_covmean = _trace_sqrt_product_lowrank(a, b, off)
        else:
            eye = torch.eye(d, dtype=torch.float64, device=x.device)
            tr_covmean = _trace_sqrt_product(a.T @ a + off * eye, b.T @ b + off * eye)
        dist = (mu1 - mu2).square().sum() + trace_s1 + trace_s2 - 2 * tr_covmean
        return dist.clamp_min(0)
