"""Large-batch optimisation helpers: parameter groups without decay on biases/norms, LR scaling, timm's LARS.

```python
from batchmates.optim import create_lars, lr_scaled, make_param_groups
groups = make_param_groups(model, weight_decay=1.5e-6)            # biases and norm parameters: no decay
opt = create_lars(groups, lr=lr_scaled(0.2, batch_size=2048), momentum=0.9)     # 0.2 per 256 images
```

Papers: LARS (You et al. 2017, arXiv:1708.03888) scales each layer's step by a trust ratio
``η·‖w‖ / (‖∇w‖ + λ‖w‖)``; the linear scaling rule (Goyal et al. 2017, arXiv:1706.02677) sets the learning rate
proportional to the batch size. These are not among the surveyed papers of METHODS.md, whose recipes use them
(SimCLR-style SupCon, SwAV, Barlow Twins train with LARS at large batch sizes).

Library choices:

* LARS is timm's maintained ``timm.optim.Lars`` (also ``create_optimizer_v2(groups, opt="lars")``): weight decay
  is added to the gradient before the trust ratio, and a parameter group is adapted only when its
  ``weight_decay`` is non-zero or its ``always_adapt`` is true (``trust_clip`` gives LARC).
* :func:`make_param_groups` puts biases, normalisation parameters (BatchNorm, LayerNorm, GroupNorm, ...), any
  other 0-/1-D parameter and the names a model lists in ``no_weight_decay()`` (timm: position embeddings, class
  token) into a group with ``weight_decay=0`` and ``always_adapt=False``: no decay and, under LARS, no trust-ratio
  adaptation whatever the optimizer's default (as in the SimCLR/BYOL/Barlow Twins recipes). Groups carry
  ``param_names``. Frozen parameters are left out.
* :func:`lr_scaled`: ``base_lr`` is the learning rate per 256 images; ``"linear"`` gives ``base_lr·B/256``,
  ``"sqrt"`` ``base_lr·sqrt(B/256)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["make_param_groups", "lr_scaled", "create_lars", "is_norm_layer", "LR_RULES"]

LR_RULES: tuple[str, ...] = ("linear", "sqrt")
_NORMS: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                            nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm, nn.RMSNorm)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (torch's, and timm's, which subclass them)."""
    return isinstance(module, _NORMS)


def _no_decay_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{n}" if prefix else n for n in listed()}
        if is_norm_layer(module):
            names |= {f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)}
    return names


def make_param_groups(
    model: nn.Module, weight_decay: float, exclude_bias_and_norm: bool = True
) -> list[dict[str, Any]]:
    """Two optimizer parameter groups: ``{"weight_decay": weight_decay}`` for weights and, with
    ``exclude_bias_and_norm``, ``{"weight_decay": 0.0, "always_adapt": False}`` for biases, normalisation
    parameters and ``no_weight_decay()`` names (see the module docstring). Empty groups are dropped."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, int | float) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0; got {weight_decay!r}")
    skip = _no_decay_names(model) if exclude_bias_and_norm else set()
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = exclude_bias_and_norm and (p.ndim <= 1 or name in skip)
        (no_decay if excluded else decay).append((name, p))
    groups = []
    for members, extra in ((decay, {"weight_decay": float(weight_decay)}),
                           (no_decay, {"weight_decay": 0.0, "always_adapt": False})):
        if members:
            groups.append({"params": [p for _, p in members], "param_names": [n for n, _ in members], **extra})
    return groups


def lr_scaled(base_lr: float, batch_size: int, rule: str = "linear", *, reference: int = 256) -> float:
    """The learning rate for ``batch_size`` images from ``base_lr`` per ``reference`` (256) images."""
    if rule not in LR_RULES:
        raise ValueError(f"rule must be 'linear' (lr * B/256) or 'sqrt' (lr * sqrt(B/256)); got {rule!r}")
    for arg, v in (("batch_size", batch_size), ("reference", reference)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be a positive int; got {v!r}")
    if isinstance(base_lr, bool) or not isinstance(base_lr, int | float) or not base_lr > 0:
        raise ValueError(
            f"base_lr must be a positive number (the learning rate per {reference} images); got {base_lr!r}"
        )
    ratio = batch_size / reference
    return float(base_lr) * (ratio if rule == "linear" else math.sqrt(ratio))


def create_lars(
    params: Iterable[Any] | nn.Module,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    trust_coeff: float = 0.001,
    trust_clip: bool = False,
    always_adapt: bool = False,
) -> torch.optim.Optimizer:
    """timm's LARS on ``params`` (groups from :func:`make_param_groups`, or a module: groups made here with
    ``weight_decay``). ``always_adapt=True`` adapts weight groups even with zero decay; the excluded group keeps
    its own ``always_adapt=False``."""
    from timm.optim import Lars

    groups = make_param_groups(params, weight_decay) if isinstance(params, nn.Module) else list(params)
    return Lars(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coeff=trust_coeff,
                trust_clip=trust_clip, always_adapt=always_adapt)
