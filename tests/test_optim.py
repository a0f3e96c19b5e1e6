"""Parameter groups (no decay and no LARS adaptation for biases/norms), LR scaling, timm's LARS on our groups."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from torch import nn

from batchmates.optim import create_lars, lr_scaled, make_param_groups


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), nn.LayerNorm(3))
    m[3].weight.requires_grad_(False)  # a frozen parameter is left out
    return m


def test_groups_split_weights_from_biases_and_norms() -> None:
    groups = make_param_groups(_model(), 5e-4)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert groups[0]["param_names"] == ["0.weight"]
    assert groups[1]["param_names"] == ["0.bias", "1.weight", "1.bias", "3.bias", "4.weight", "4.bias"]
    assert groups[1]["always_adapt"] is False and "always_adapt" not in groups[0]
    (single,) = make_param_groups(_model(), 5e-4, exclude_bias_and_norm=False)
    assert len(single["params"]) == 7 and single["weight_decay"] == 5e-4


def test_timm_no_weight_decay_names_are_excluded() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    decay, no_decay = make_param_groups(vit, 0.05)
    assert {"pos_embed", "cls_token"} <= set(no_decay["param_names"])
    assert "patch_embed.proj.weight" in decay["param_names"] and "blocks.0.norm1.weight" in no_decay["param_names"]
    n = sum(1 for p in vit.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == n


@pytest.mark.parametrize("how", ["create_lars", "timm_factory"])
@pytest.mark.parametrize("always_adapt", [False, True])
def test_lars_adapts_weights_only(how, always_adapt) -> None:
    """One LARS step against the trust-ratio formula: weights are adapted, biases/norms take a plain SGD step."""
    model, lr, wd, eta = _model(), 0.5, 1e-2, 1e-3
    groups = make_param_groups(model, wd)
    if how == "create_lars":
        opt = create_lars(groups, lr=lr, momentum=0.0, trust_coeff=eta, always_adapt=always_adapt)
    else:
        opt = create_optimizer_v2(groups, opt="lars", lr=lr, momentum=0.0, weight_decay=wd, trust_coeff=eta,
                                  always_adapt=always_adapt)
    x = torch.randn(16, 4)
    model(x).square().mean().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[name])
            continue
        w, g = before[name], grads[name]
        if name in groups[0]["param_names"]:
            trust = eta * w.norm() / (g.norm() + wd * w.norm() + 1e-8)
            want = w - lr * trust * (g + wd * w)
        else:
            want = w - lr * g
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-7, msg=name)


def test_lr_scaling_rules() -> None:
    assert lr_scaled(0.3, 4096) == pytest.approx(4.8)
    assert lr_scaled(0.3, 4096, "sqrt") == pytest.approx(1.2)
    assert lr_scaled(0.1, 256, "sqrt") == pytest.approx(0.1) == lr_scaled(0.1, 256)
    assert lr_scaled(0.1, 64, "sqrt") == pytest.approx(0.1 * math.sqrt(0.25))
    assert lr_scaled(1.0, 50, reference=100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="'linear'"):
        lr_scaled(0.1, 256, "square")
    with pytest.raises(ValueError, match="batch_size"):
        lr_scaled(0.1, 0)
    with pytest.raises(ValueError, match="base_lr"):
        lr_scaled(-1.0, 256)
    with pytest.raises(ValueError, match="weight_decay"):
        make_param_groups(_model(), -1.0)
