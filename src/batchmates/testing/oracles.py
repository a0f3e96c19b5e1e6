"""Reference implementations ("oracles") that tests and benchmarks compare batchmates' losses against.

Each oracle is the direct, unoptimised reading of its definition, written independently of the library code it
checks (it never calls it), so a test comparing the two can fail.

Paper: :func:`official_supcon` transcribes the official SupContrast ``SupConLoss.forward`` (Khosla et al. 2020,
arXiv:2004.11362, after PR #142); :func:`naive_cc_loss` is CC-Loss's pairwise form (Song et al. 2020,
arXiv:2010.05469) with the library's ``d_ij = ||a_i - a_j||^2 / C`` normalisation and ``"difference"`` form.
Library choices: both build the full ``B x B`` (or ``VN x VN``) matrices on purpose; they are for tests and
benchmarks, not training.
"""

from __future__ import annotations

import torch

__all__ = ["official_supcon", "naive_cc_loss"]


def official_supcon(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    contrast_mode: str = "all",
) -> torch.Tensor:
    """OFFICIAL SUPCON FORMULA, transcribed for benchmarking and as a test reference (not used by the library).

    Khosla et al. 2020 (arXiv:2004.11362), SupContrast ``SupConLoss.forward``: full ``[VN, VN]`` logits, float
    masks built by ``repeat`` and ``scatter``, row-max subtraction, anchors without positive giving 0.
    Features must already be L2-normalised, shape ``[N, V, D]``.
    """
    device = features.device
    batch_size, n_views = features.shape[0], features.shape[1]
    if labels is None and mask is None:
        mask = torch.eye(batch_size, dtype=torch.float32, device=device)
    elif labels is not None:
        labels = labels.contiguous().view(-1, 1)
        mask = torch.eq(labels, labels.T).float().to(device)
    else:
        mask = mask.float().to(device)
    contrast_count = n_views
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    if contrast_mode == "one":
        anchor_feature = features[:, 0]
        anchor_count = 1
    else:
        anchor_feature = contrast_feature
        anchor_count = contrast_count
    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(anchor_count, contrast_count).to(logits.dtype)
    logits_mask = torch.scatter(
        torch.ones_like(mask), 1, torch.arange(batch_size * anchor_count, device=device).view(-1, 1), 0
    )
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, torch.ones_like(mask_pos_pairs), mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, batch_size).mean()


def naive_cc_loss(attention: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The direct reading of the definition: a B x B squared-distance matrix and masked means ("difference")."""
    n, c = attention.shape
    sq = (attention * attention).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * attention @ attention.t()).clamp_min(0) / c
    same = labels[:, None] == labels[None, :]
    off = ~torch.eye(n, dtype=torch.bool, device=attention.device)
    intra_mask, inter_mask = same & off, ~same
    intra = (d * intra_mask).sum() / intra_mask.sum().clamp_min(1)
    inter = (d * inter_mask).sum() / inter_mask.sum().clamp_min(1)
    return intra - inter
