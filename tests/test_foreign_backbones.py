"""timm/torchvision backbones behind the Backbone interface, offline weight files, attention layers in their blocks.

Nothing downloads: every model is built with pretrained=False / weights=None and every weight file is written here.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from batchmates.losses import CCLoss
from batchmates.models import SqueezeExcite, create_backbone
from batchmates.models.foreign import ForeignBackbone, create_foreign_backbone, from_module, rebuild_backbone
from batchmates.models.foreign_attn import insert_attn_layers, residual_blocks
from batchmates.nn import BA2M, BatchTransformerHead

SPECS = ("timm:resnet18", "torchvision:resnet18")


def _reference(spec: str, in_chans: int = 3) -> torch.nn.Module:
    """The original model with its classifier (what a user's checkpoint comes from)."""
    source, name = spec.split(":")
    if source == "timm":
        return timm.create_model(name, pretrained=False, in_chans=in_chans)
    return torchvision.models.get_model(name, weights=None)


def _headless_features(spec: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if spec.startswith("timm"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    model = copy.deepcopy(model)
    model.fc = torch.nn.Identity()
    return model(x)


@pytest.mark.parametrize("spec", SPECS)
def test_create_backbone_dispatches_and_reports_stages(spec) -> None:
    net = create_backbone(spec, in_channels=1, image_size=28)
    assert isinstance(net, ForeignBackbone)
    x = torch.randn(3, 1, 28, 28)
    feats, maps = net(x), net.forward_stages(x)
    assert feats.shape == (3, net.feature_dim) == (3, 512)
    # both sources give the stem and the four residual stages, widths as reported
    assert [m.shape[1] for m in maps] == net.stage_dims == [64, 64, 128, 256, 512]
    assert [m.shape[2] for m in maps] == [14, 7, 4, 2, 1]  # small images: architecture unchanged, 1x1 at the end
    assert net.spec["source"] == spec.split(":")[0] and net.spec["in_channels"] == 1
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        net(torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_rgb_checkpoint_loads_into_grey_backbone_exactly(spec, fmt, tmp_path) -> None:
    """An RGB checkpoint (classifier included) in a 1-channel backbone computes what the RGB model computes on the
    grey image repeated three times: the first convolution's filters are summed over RGB."""
    torch.manual_seed(0)
    ref = _reference(spec).eval()
    path = tmp_path / f"w.{fmt}"
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, str(path)) if fmt == "safetensors" else torch.save({"state_dict": sd}, path)
    net = create_foreign_backbone(spec, in_channels=1, image_size=32, pretrained_path=str(path)).eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        want = _headless_features(spec, ref, x.repeat(1, 3, 1, 1))
        torch.testing.assert_close(net(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", SPECS)
def test_wrong_checkpoint_names_the_keys_and_the_fix(spec, tmp_path) -> None:
    other = _reference(spec.replace("resnet18", "resnet34"))
    path = tmp_path / "r34.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(ValueError, match=r"pretrained_path=.*does not fit .*resnet18.*unexpected keys \(layer") as e:
        create_foreign_backbone(spec, in_channels=3, image_size=32, pretrained_path=str(path))
    assert "exact architecture" in str(e.value)
    with pytest.raises(FileNotFoundError, match="pretrained_path"):
        create_foreign_backbone(spec, in_channels=3, image_size=32, pretrained_path=str(tmp_path / "nope.pt"))


def test_bad_names_and_sizes_fail_clearly() -> None:
    with pytest.raises(ValueError, match="timm:NAME"):
        create_backbone("keras:resnet", in_channels=3, image_size=32)
    with pytest.raises(ValueError, match="timm has no model"):
        create_backbone("timm:not_a_model_xyz", in_channels=3, image_size=32)
    with pytest.raises(ValueError, match="torchvision has no model"):
        create_backbone("torchvision:not_a_model_xyz", in_channels=3, image_size=32)
    with pytest.raises(ValueError, match="cannot run on 3-channel 4px images"):
        create_backbone("torchvision:vgg11", in_channels=3, image_size=4)


@pytest.mark.parametrize("build", [lambda: timm.create_model("resnet18", pretrained=False),
                                   lambda: torchvision.models.resnet18()], ids=["timm", "torchvision"])
def test_ba2m_in_every_block_scaled_independent_eval_is_the_plain_model(build) -> None:
    torch.manual_seed(0)
    model = build()
    plain = copy.deepcopy(model).eval()
    layers = insert_attn_layers(model, "ba2m", weight_mode="scaled")
    assert len(layers) == len(residual_blocks(model)) == 8
    assert sum(isinstance(m, BA2M) for m in model.modules()) == 8
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))
    model.train()
    out = model(x)
    assert out.shape == (4, 1000)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for m in layers for p in m.parameters())
    assert all(int(m.n_train) == 4 for m in layers)
    # the original keys are unchanged: the plain model's weights still load (strictly, but for the new layers)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".se." in k or ".attn." in k for k in missing)


def test_stage_placement_and_layer_classes() -> None:
    model = torchvision.models.resnet18()
    added = insert_attn_layers(model, SqueezeExcite, placement="stage", reduction=8)
    assert [m.fc1.in_channels for m in added] == [64, 128, 256, 512]
    assert model.layer4[-1] is added[-1]
    with pytest.raises(ValueError, match="already has attention layer"):
        timm_se = timm.create_model("seresnet18", pretrained=False)
        insert_attn_layers(timm_se, "ba2m")
    with pytest.raises(ValueError, match="no timm or torchvision ResNet residual block"):
        insert_attn_layers(torchvision.models.mobilenet_v3_small(), "se")


def test_timm_attn_layer_hook_accepts_ba2m() -> None:
    """timm passes device/dtype to the attention layer it builds in every ResNet block (create_attn)."""
    model = timm.create_model("resnet18", pretrained=False, block_args=dict(attn_layer=BA2M), dtype=torch.float64)
    layers = [m for m in model.modules() if isinstance(m, BA2M)]
    assert len(layers) == 8 and all(p.dtype == torch.float64 for m in layers for p in m.parameters())


@pytest.mark.parametrize("spec", SPECS)
def test_every_method_building_block_runs_on_a_foreign_backbone(spec) -> None:
    """What the methods read from a backbone: pooled features (ce/supcon/swav/barlow/batchformer), per-stage maps
    (btn), SE channel gates (cc), BA2M layers (ba2m)."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    net = create_backbone(spec, in_channels=1, image_size=16, attn_layer="se")
    se = [m for m in net.modules() if isinstance(m, SqueezeExcite)]
    assert len(se) == 8
    gates: list[torch.Tensor] = []
    se[-1].gate.register_forward_hook(lambda _m, _i, out: gates.append(out.flatten(1)))  # as the cc method reads
    maps = net.forward_stages(x)
    head = BatchTransformerHead(net.stage_dims, 3, feature_map_size=tuple(maps[-1].shape[2:]), mla_dim=16,
                                mla_heads=2)
    loss = head.loss(head(maps), y) + CCLoss()(gates[-1], y)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    ba2m = create_backbone(spec, in_channels=1, image_size=16, attn_layer="ba2m",
                           attn_kwargs={"weight_mode": "raw", "eval_mode": "independent"})
    assert sum(isinstance(m, BA2M) and m.weight_mode == "raw" for m in ba2m.modules()) == 8
    assert ba2m(x).shape == (6, 512)


def test_spec_rebuilds_the_same_backbone(tmp_path) -> None:
    net = create_foreign_backbone("timm:resnet18", in_channels=2, image_size=24, attn_layer=BA2M,
                                  attn_kwargs={"reduction": 8}).eval()
    path = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in net.model.state_dict().items()}, str(path))
    again = rebuild_backbone(net.spec, pretrained_path=str(path)).eval()
    assert again.spec == net.spec and net.spec["attn_layer"] == "batchmates.nn.ba2m:BA2M"
    x = torch.randn(2, 2, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x))


def test_from_module_takes_over_a_users_model() -> None:
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=7)
    net = from_module(tv, in_channels=1, image_size=32)
    assert isinstance(tv.fc, torch.nn.Identity) and tv.conv1.in_channels == 1
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 512) and len(net.stage_dims) == 5
    tm = timm.create_model("resnet18", pretrained=False, num_classes=5)
    net = from_module(tm, image_size=32)
    assert tm.num_classes == 0 and net.feature_dim == 512 and net.in_channels == 3
    custom = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2),
                                 torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    net = from_module(custom, image_size=16, stage_modules=["1", "2"])
    assert net.stage_dims == [8, 16] and net.feature_dim == 16
    assert [m.shape[-1] for m in net.forward_stages(torch.randn(2, 3, 16, 16))] == [14, 6]


def test_timm_vit_checkpoint_at_another_size_and_channel_count(tmp_path) -> None:
    """A 224 px RGB ViT checkpoint in a 32 px grey ViT: timm's own filter resamples the position embedding, and the
    patch-embedding filters are summed over RGB."""
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    net = create_foreign_backbone("timm:vit_tiny_patch16_224", in_channels=1, image_size=32,
                                  pretrained_path=str(tmp_path / "vit.pth"), model_kwargs={"depth": 1})
    assert net.model.pos_embed.shape == (1, 1 + 2 * 2, 192) and net.stage_dims == [192]
    torch.testing.assert_close(net.model.patch_embed.proj.weight, ref.patch_embed.proj.weight.sum(1, keepdim=True))
    torch.testing.assert_close(net.model.pos_embed[:, 0], ref.pos_embed[:, 0])  # the class token's is kept as is
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 192)


# --- CPU bf16 autocast gets the weight gradient of a convolution on an input smaller than its stride wrong ------


def _bf16_weight_grad(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    conv.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    out.float().sum().backward()
    return conv.weight.grad


def test_float32_conv_has_the_exact_weight_gradient_under_cpu_bf16_autocast() -> None:
    from batchmates.models.conv_guard import Float32Conv2d

    torch.manual_seed(0)
    conv = Float32Conv2d(16, 32, 3, 2, 1, bias=False)
    x = torch.randn(8, 16, 1, 1)
    w = conv.weight.detach().clone().requires_grad_(True)
    torch.nn.functional.conv2d(x, w, None, 2, 1).sum().backward()
    for _ in range(20):  # the bare Conv2d is wrong in most such calls (scripts/bf16_conv_check.py)
        g = _bf16_weight_grad(conv, x)
        torch.testing.assert_close(g, w.grad, rtol=1e-5, atol=1e-6)
        assert (g[:, :, [0, 0, 2, 2], [0, 2, 0, 2]] == 0).all()  # corner taps never see the 1x1 input
    plain = torch.nn.Conv2d(16, 32, 3, 2, 1, bias=False)
    plain.load_state_dict(conv.state_dict())  # same parameters and keys: a plain checkpoint loads either way
    y = torch.randn(4, 16, 5, 5)
    torch.testing.assert_close(conv(y), plain(y))  # outside autocast it is a Conv2d


@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_foreign_resnets_guard_exactly_the_convolutions_on_inputs_smaller_than_their_stride(source) -> None:
    from batchmates.models.conv_guard import Float32Conv2d

    want = {8: ["layer3.0.conv1", "layer4.0.conv1"], 16: ["layer4.0.conv1"], 32: []}
    for size, names in want.items():
        net = create_backbone(f"{source}:resnet18", in_channels=1, image_size=size)
        assert sorted(net.fp32_convs) == names, size
        kinds = {n for n, m in net.model.named_modules() if isinstance(m, Float32Conv2d)}
        assert kinds == set(names)
        assert all(isinstance(m, torch.nn.Conv2d) for m in net.model.modules() if isinstance(m, Float32Conv2d))
    clone = copy.deepcopy(net)
    assert type(dict(clone.model.named_modules())["layer1.0.conv1"]) is torch.nn.Conv2d
    net8 = create_backbone(f"{source}:resnet18", in_channels=1, image_size=8)
    assert type(dict(copy.deepcopy(net8).model.named_modules())["layer4.0.conv1"]) is Float32Conv2d
