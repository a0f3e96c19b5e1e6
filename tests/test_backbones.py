"""batchmates.models: backbones, attention-layer hook, token-mixer registry, helpers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from batchmates.models import (
    BasicBlock,
    SqueezeExcite,
    available_attn_layers,
    available_backbones,
    available_token_mixers,
    count_parameters,
    create_backbone,
    create_token_mixer,
    register_token_mixer,
    set_eval_mode,
)
from batchmates.models.vit import SelfAttention

torch.set_num_threads(1)

NAMES = ["cnn", "resnet18", "resnet-small", "vit-tiny", "vit-tiny-conv"]
SIZES = [(8, 1), (28, 1), (32, 3)]
SMALL_VIT = dict(dim=32, depth=2, num_heads=2)


def _build(name: str, ch: int, size: int, **kw):
    if name.startswith("vit"):
        kw = {**SMALL_VIT, **kw}
    return create_backbone(name, in_channels=ch, image_size=size, **kw)


def test_registry_names():
    assert available_backbones() == sorted(NAMES)
    with pytest.raises(ValueError, match="resnet-small"):
        create_backbone("resnet50", in_channels=3, image_size=32)
    with pytest.raises(ValueError, match="in_channels"):
        create_backbone("cnn", in_channels=0, image_size=32)


@pytest.mark.parametrize("size,ch", SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_stage_contract(name, size, ch):
    torch.manual_seed(0)
    net = _build(name, ch, size)
    x = torch.randn(3, ch, size, size)
    feats, stages = net(x), net.forward_stages(x)
    assert feats.shape == (3, net.feature_dim)
    assert len(stages) == len(net.stage_dims) == len(net.stage_kinds)
    for s, dim, kind in zip(stages, net.stage_dims, net.stage_kinds):
        if kind == "map":
            assert s.dim() == 4 and s.shape[:2] == (3, dim) and min(s.shape[-2:]) >= 2
        else:
            assert kind == "tokens" and s.dim() == 3 and s.shape[0] == 3 and s.shape[-1] == dim
    assert net.stage_dims[-1] == net.feature_dim


def test_known_geometry():
    r18 = create_backbone("resnet18", in_channels=3, image_size=32)
    assert r18.feature_dim == 512 and r18.stage_dims == [64, 128, 256, 512]
    assert not any(isinstance(m, nn.MaxPool2d) for m in r18.modules())
    stem = r18.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert sum(isinstance(m, BasicBlock) for m in r18.modules()) == 8
    assert [tuple(s.shape[-2:]) for s in r18.forward_stages(torch.randn(2, 3, 32, 32))] == [
        (32, 32), (16, 16), (8, 8), (4, 4)
    ]  # fmt: skip
    assert 11_000_000 < count_parameters(r18) < 11_300_000  # ResNet-18 CIFAR: ~11.2 M
    small = create_backbone("resnet-small", in_channels=1, image_size=28)
    assert small.stage_dims == [16, 32, 64, 128] and sum(isinstance(m, BasicBlock) for m in small.modules()) == 4
    assert [tuple(s.shape[-2:]) for s in small.forward_stages(torch.randn(2, 1, 28, 28))] == [
        (14, 14), (7, 7), (4, 4), (2, 2)
    ]  # fmt: skip
    vit = create_backbone("vit-tiny", in_channels=1, image_size=28)
    assert vit.patch_size == 4 and vit.num_patches == 49 and vit.feature_dim == 128 and len(vit.blocks) == 6
    assert create_backbone("vit-tiny", in_channels=1, image_size=8).patch_size == 2


@pytest.mark.parametrize("name,n_blocks", [("resnet18", 8), ("resnet-small", 4)])
def test_se_in_every_block_on_the_residual_branch(name, n_blocks):
    net = create_backbone(name, in_channels=3, image_size=32, attn_layer="se")
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == n_blocks and all(isinstance(b.attn, SqueezeExcite) for b in blocks)
    assert sum(isinstance(m, SqueezeExcite) for m in net.modules()) == n_blocks
    gates = {}
    for i, b in enumerate(blocks):  # the per-sample channel gates are the output of the SE's `gate` submodule
        b.attn.gate.register_forward_hook(lambda mod, args, out, i=i: gates.__setitem__(i, out))
    net.train()
    net(torch.randn(2, 3, 32, 32))
    assert all(gates[i].shape == (2, b.bn2.num_features, 1, 1) and gates[i].requires_grad for i, b in enumerate(blocks))
    # the gate really sits before the sum: zeroing the gates leaves relu(shortcut(x))
    blk = blocks[0].eval()
    nn.init.zeros_(blk.attn.fc2.weight)
    nn.init.constant_(blk.attn.fc2.bias, -1e4)
    x = torch.randn(2, blk.conv1.in_channels, 8, 8)
    torch.testing.assert_close(blk(x), torch.relu(blk.shortcut(x)))


def test_stage_placement():
    net = create_backbone("resnet18", in_channels=3, image_size=32, attn_layer="se", attn_placement="stage")
    assert sum(isinstance(m, SqueezeExcite) for m in net.modules()) == 4
    assert all(isinstance(b.attn, nn.Identity) for b in net.modules() if isinstance(b, BasicBlock))
    assert all(isinstance(stage[-1], SqueezeExcite) for stage in net.stages)
    cnn = create_backbone("cnn", in_channels=1, image_size=28, attn_layer="se")
    assert sum(isinstance(m, SqueezeExcite) for m in cnn.modules()) == 3
    with pytest.raises(ValueError, match="attn_placement"):
        create_backbone("resnet18", in_channels=3, image_size=32, attn_placement="everywhere")


def test_unknown_attn_layer_lists_choices():
    with pytest.raises(ValueError, match="'se'"):
        create_backbone("resnet-small", in_channels=1, image_size=28, attn_layer="cbam-ish")
    with pytest.raises(ValueError, match="mixers"):
        create_backbone("vit-tiny", in_channels=1, image_size=28, attn_layer="se")


@pytest.mark.parametrize("attn", ["none", *available_attn_layers()])
@pytest.mark.parametrize("name", ["cnn", "resnet18", "resnet-small"])
@pytest.mark.parametrize("size", [8, 28])
def test_batch_of_one_trains(name, attn, size):
    torch.manual_seed(0)
    net = create_backbone(name, in_channels=1, image_size=size, attn_layer=attn).train()
    out = net(torch.randn(1, 1, size, size))
    assert out.shape == (1, net.feature_dim) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_per_sample_and_permutation_equivariant(name):
    torch.manual_seed(0)
    net = _build(name, 1, 28, attn_layer="none" if name.startswith("vit") else "se").double().eval()
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    out = net(x)
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(net(x[perm]), out[perm])
    torch.testing.assert_close(net(x[2:3]), out[2:3])


def test_input_validation():
    net = create_backbone("resnet-small", in_channels=1, image_size=28)
    with pytest.raises(ValueError, match="1, H, W"):
        net(torch.randn(2, 3, 28, 28))
    with pytest.raises(TypeError, match="float"):
        net(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    vit = _build("vit-tiny", 1, 28)
    with pytest.raises(ValueError, match="28x28"):
        vit(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="patch_size"):
        create_backbone("vit-tiny", in_channels=1, image_size=30)


# ------------------------------------------------------------------------------------------------ ViT mixers
@register_token_mixer("test-scale")
class _ScaleMixer(nn.Module):
    def __init__(self, dim: int, num_heads: int, factor: float = 1.0) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_per_block_mixers_and_kwargs():
    vit = _build("vit-tiny", 1, 8, mixers=["self", "test-scale"], mixer_kwargs={"test-scale": {"factor": 0.5}})
    assert isinstance(vit.blocks[0].mixer, SelfAttention) and isinstance(vit.blocks[1].mixer, _ScaleMixer)
    assert vit.blocks[1].mixer.factor == 0.5
    per_block = _build("vit-tiny", 1, 8, mixers="test-scale", mixer_kwargs=[{"factor": 2.0}, {"factor": 3.0}])
    assert [b.mixer.factor for b in per_block.blocks] == [2.0, 3.0]
    assert vit(torch.randn(2, 1, 8, 8)).shape == (2, 32)
    with pytest.raises(ValueError, match="mixers has 3 entries but depth is 2"):
        _build("vit-tiny", 1, 8, mixers=["self"] * 3)
    with pytest.raises(ValueError, match="not among the mixers"):
        _build("vit-tiny", 1, 8, mixer_kwargs={"miba": {}})
    with pytest.raises(ValueError, match="not registered"):
        _build("vit-tiny", 1, 8, mixers=["self", "nonexistent"])
    assert {"self", "test-scale"} <= set(available_token_mixers())


@pytest.mark.parametrize("mixer", available_token_mixers())
def test_every_registered_mixer_runs_in_the_vit(mixer):
    torch.manual_seed(0)
    vit = _build("vit-tiny", 1, 8, mixers=["self", mixer]).train()
    out = vit(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 32) and torch.isfinite(out).all()
    assert torch.isfinite(vit(torch.randn(1, 1, 8, 8))).all()


def test_self_attention_matches_reference():
    torch.manual_seed(0)
    attn = create_token_mixer("self", 8, 2).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    q, k, v = attn.qkv(x).split(8, dim=-1)
    heads = lambda t: t.view(3, 5, 2, 4).transpose(1, 2)  # noqa: E731
    w = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(4), dim=-1)
    ref = attn.proj((w @ heads(v)).transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(attn(x), ref)


def test_vit_conv_stem_feeds_the_patch_embedding():
    conv = _build("vit-tiny-conv", 1, 8)
    patch = _build("vit-tiny", 1, 8)
    convs = [m for m in conv.stem if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (1, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1))
    ]  # fmt: skip
    assert sum(isinstance(m, nn.BatchNorm2d) for m in conv.stem) == 2 and patch.stem is None
    assert conv.patch_embed.in_channels == 64 and conv.patch_embed.stride == (2, 2)
    assert conv.num_patches == patch.num_patches == 16
    x = torch.randn(4, 1, 8, 8)
    stages = conv.train().forward_stages(x)  # per-block token maps, as btn reads them
    assert [tuple(s.shape) for s in stages] == [(4, 16, 32)] * 2
    conv(x).square().sum().backward()
    assert convs[0].weight.grad is not None and convs[0].weight.grad.abs().sum() > 0
    custom = create_backbone("vit-tiny", in_channels=3, image_size=32, stem="conv", stem_channels=(8,), **SMALL_VIT)
    assert custom.patch_embed.in_channels == 8 and custom(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    with pytest.raises(ValueError, match="stem must be"):
        create_backbone("vit-tiny", in_channels=1, image_size=8, stem="convolutional")
    with pytest.raises(ValueError, match="stem_channels"):
        create_backbone("vit-tiny", in_channels=1, image_size=8, stem="conv", stem_channels=())


def test_cls_pooling_adds_a_token():
    vit = _build("vit-tiny", 3, 32, pool="cls")
    stages = vit.forward_stages(torch.randn(2, 3, 32, 32))
    assert stages[0].shape == (2, 65, 32)


# ------------------------------------------------------------------------------------------------ helpers
def test_count_parameters_and_set_eval_mode():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assert count_parameters(net) == 3 * 4 + 4 + 4 * 2 + 2
    net[0].weight.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == 4 + 4 * 2 + 2

    class Rel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.eval_mode = "independent"

    model = nn.Sequential(nn.Linear(2, 2), Rel(), nn.Sequential(Rel()))
    assert set_eval_mode(model, "batch") == 2 and model[1].eval_mode == "batch" and model[2][0].eval_mode == "batch"
    assert set_eval_mode(nn.Linear(2, 2), "batch") == 0
    with pytest.raises(ValueError, match="independent"):
        set_eval_mode(model, "batched")


def test_squeeze_excite_accepts_timm_constructor_keywords() -> None:
    from batchmates.nn import SqueezeExcite

    se = SqueezeExcite(16, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in se.parameters())
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    assert se(x).shape == x.shape and se(x).dtype == torch.float64
