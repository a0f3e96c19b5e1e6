"""Squeeze-and-Excitation (Hu et al., CVPR 2018, arXiv:1709.01507): per-sample channel gates.

Paper: global average pooling ("squeeze"), a bottleneck of two fully connected layers with a ReLU between them
and a sigmoid ("excitation") giving gates ``a ∈ (0,1)^C``, then ``x · a`` channel-wise; reduction ratio 16.

Library choices: the fully connected layers are 1x1 convolutions with biases; the hidden width is at least
``min_hidden`` (4) so narrow layers keep a bottleneck; the sigmoid is the submodule ``gate``, whose output is the
``[N, C, 1, 1]`` gates with their gradient. SE itself is per-sample (no batch mate is involved). CC-Loss
(Song et al. 2020) relates the gates across the batch: the ``cc`` method registers a forward hook on ``gate``
while it trains (nothing is stored on the layer). Registered as the ``"se"`` attention layer of the backbones
(:func:`batchmates.models.create_attn_layer`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SqueezeExcite"]


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation on ``[N, C, H, W]`` feature maps; ``gate`` outputs the gates ``[N, C, 1, 1]``.

    Args:
        channels: ``C``.
        reduction: bottleneck ratio (paper: 16).
        min_hidden: smallest bottleneck width (library choice).
        device, dtype: where to create the parameters (timm passes these to attention layers).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        min_hidden: int = 4,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hidden = max(min_hidden, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1, device=device, dtype=dtype)
        self.fc2 = nn.Conv2d(hidden, channels, 1, device=device, dtype=dtype)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * self.gate(self.fc2(torch.relu(self.fc1(s))))
