"""Convolutions that CPU bf16 autocast computes wrongly: found on a probe, run in float32.

With torch 2.14.1 on CPU (oneDNN), under ``torch.autocast("cpu", dtype=torch.bfloat16)``, the weight gradient of a
``Conv2d`` whose input is spatially smaller than its stride (kernel > 1), e.g. a ResNet's 3x3 stride-2 convolution
on a 1x1 map, holds uninitialised memory in the taps that never see the input: non-finite in a quarter to a third
of calls, finite garbage (up to ~1e36) in most of the others, in single-threaded runs of the same inputs.
Float32, and inputs at least as large as the stride, are exact. Measured with ``python scripts/bf16_conv_check.py``
(``docs/reliability.md``, "CPU bf16 convolutions"). An ImageNet ResNet-18 (timm or torchvision) on 8-16 px images
has such convolutions in ``layer3``/``layer4``; batchmates' own backbones have none at their sizes.

Paper: none (a workaround for a backend fault).

Library choices: :func:`guard_small_input_convs` finds the affected convolutions with one forward pass at the
training resolution and changes their class to :class:`Float32Conv2d` (a ``Conv2d`` subclass: same parameters,
same state-dict keys, ``isinstance(m, nn.Conv2d)`` still true), which leaves autocast for the convolution on CPU.
They see 1x1 maps, so float32 costs nothing measurable. Elsewhere (CUDA, no autocast) they behave as ``Conv2d``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Float32Conv2d", "guard_small_input_convs", "input_smaller_than_stride"]


class Float32Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes in float32 outside CPU autocast (see the module docstring for why)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def input_smaller_than_stride(conv: nn.Conv2d, height: int, width: int) -> bool:
    """Whether ``conv`` on an ``height x width`` input is a case CPU bf16 autocast gets wrong."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    return (kh > 1 and height < sh) or (kw > 1 and width < sw)


def guard_small_input_convs(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Turn every ``Conv2d`` of ``model`` whose input (on ``example``) is smaller than its stride into a
    :class:`Float32Conv2d`, in place; return their names. Runs ``model`` once, in eval mode, without gradients."""
    seen: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the input is left as it is
            seen.setdefault(name, tuple(args[0].shape[-2:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules() if type(m) is nn.Conv2d]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    modules = dict(model.named_modules())
    guarded = [name for name, (h, w) in seen.items() if input_smaller_than_stride(modules[name], int(h), int(w))]
    for name in guarded:
        modules[name].__class__ = Float32Conv2d
    return guarded
