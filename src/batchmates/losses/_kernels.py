"""Numerics shared by the losses: autocast switched off, and SupCon's exclusive log-sum-exp.

Paper: the SupCon denominator ``log Σ_{j≠i} exp(z_i·z_j / τ)`` (Khosla et al. 2020, arXiv:2004.11362, eq. 2).
Library choices: a custom autograd function that keeps a single ``[Ma, Mc]`` buffer (dense) or streams
``block × block`` tiles and recomputes them in backward (chunked: memory linear in the batch); the statistics of
every loss run with autocast disabled (``exp(1/0.05)`` overflows fp16).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

__all__ = ["no_autocast", "ExclusiveLogSumExp"]


def no_autocast(device: torch.device):
    """Context disabling autocast on ``device`` (a no-op where autocast does not exist for that device type)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # pragma: no cover - exotic device types
        return nullcontext()


def _mask_self_(logits: Tensor, self_col: Tensor, col0: int) -> None:
    """Set ``logits[r, self_col[r] - col0] = -inf`` where that column lies in this block (sync-free)."""
    width = logits.shape[1]
    local = self_col - col0
    inside = (local >= 0) & (local < width)
    cols = local.clamp(0, width - 1).unsqueeze(1)
    current = logits.gather(1, cols)
    logits.scatter_(1, cols, torch.where(inside.unsqueeze(1), torch.full_like(current, float("-inf")), current))


class ExclusiveLogSumExp(torch.autograd.Function):
    """``lse_i = log Σ_{j ≠ self(i)} exp(s · a_i·c_j)`` for anchors ``a [Ma, D]``, contrast ``c [Mc, D]``, scale ``s``.

    ``block=None``: dense, a single ``[Ma, Mc]`` buffer (logits, then their row-shifted exponentials in place) is
    kept for backward. ``block=b``: anchor blocks × contrast blocks of ``b`` rows; forward keeps only per-block
    log-sum-exps and backward recomputes every block, so the extra memory is ``O(b² + (Ma + Mc)·D)``.
    Gradients: ``∂lse_i/∂a_i = s Σ_j p_ij c_j`` and ``∂lse_i/∂c_j = s p_ij a_i`` with ``p`` the row softmax.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, anchors: Tensor, contrast: Tensor, self_col: Tensor, scale: float, block: int | None
    ) -> Tensor:
        with no_autocast(anchors.device):
            ma, mc = anchors.shape[0], contrast.shape[0]
            if block is None:
                logits = torch.addmm(anchors.new_empty(()), anchors, contrast.T, beta=0, alpha=scale)
                logits.scatter_(1, self_col.unsqueeze(1), float("-inf"))
                row_max = logits.amax(dim=1, keepdim=True)
                expd = logits.sub_(row_max).exp_()  # unnormalised row softmax, self entries exactly 0
                total = expd.sum(dim=1)
                lse = total.log().add_(row_max.squeeze(1))
                ctx.save_for_backward(anchors, contrast, expd, total)
            else:
                parts = []
                for i0 in range(0, ma, block):
                    a = anchors[i0 : i0 + block]
                    cols = self_col[i0 : i0 + block]
                    block_lse = []
                    for j0 in range(0, mc, block):
                        logits = torch.addmm(a.new_empty(()), a, contrast[j0 : j0 + block].T, beta=0, alpha=scale)
                        _mask_self_(logits, cols, j0)
                        block_lse.append(torch.logsumexp(logits, dim=1))
                    parts.append(torch.logsumexp(torch.stack(block_lse, dim=1), dim=1))
                lse = torch.cat(parts)
                ctx.save_for_backward(anchors, contrast, self_col, lse)
        ctx.block = block
        ctx.scale = scale
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        block, scale = ctx.block, ctx.scale
        need_a, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with no_autocast(grad.device):
            if block is None:
                anchors, contrast, expd, total = ctx.saved_tensors
                g = (grad * scale / total).unsqueeze(1)  # row softmax = expd / total
                grad_a = (expd @ contrast).mul_(g) if need_a else None
                grad_c = expd.T @ (anchors * g) if need_c else None
                return grad_a, grad_c, None, None, None
            anchors, contrast, self_col, lse = ctx.saved_tensors
            grad_a = torch.zeros_like(anchors) if need_a else None
            grad_c = torch.zeros_like(contrast) if need_c else None
            ma, mc = anchors.shape[0], contrast.shape[0]
            for i0 in range(0, ma, block):
                a = anchors[i0 : i0 + block]
                cols = self_col[i0 : i0 + block]
                row_lse = lse[i0 : i0 + block].unsqueeze(1)
                g = (grad[i0 : i0 + block] * scale).unsqueeze(1)
                ga = a * g
                for j0 in range(0, mc, block):
                    c = contrast[j0 : j0 + block]
                    logits = torch.addmm(a.new_empty(()), a, c.T, beta=0, alpha=scale)
                    _mask_self_(logits, cols, j0)
                    probs = logits.sub_(row_lse).exp_()
                    if grad_a is not None:
                        grad_a[i0 : i0 + block].addcmul_(probs @ c, g)
                    if grad_c is not None:
                        grad_c[j0 : j0 + block].addmm_(probs.T, ga)
            return grad_a, grad_c, None, None, None
