"""to_ibaformer: a timm ViT with intra-batch attention in chosen blocks, keeping its weights."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from batchmates.nn import IntraBatchAttention, to_ibaformer
from batchmates.nn.ibaformer_convert import TimmIntraBatchAttention, select_blocks


def _vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=5, **kw)


def _dissimilar_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g)
    return x * torch.tensor([0.2, 1.0, 3.0, 6.0]).view(4, 1, 1, 1)  # very different scales per sample


@pytest.mark.parametrize("mode", ["mean", "element"])
def test_independent_eval_equals_the_original_vit(mode) -> None:
    vit = _vit()
    original = copy.deepcopy(vit).eval()
    to_ibaformer(vit, blocks="all", mode=mode)
    assert sum(isinstance(m, TimmIntraBatchAttention) for m in vit.modules()) == 2
    assert all(isinstance(b.attn, IntraBatchAttention) and b.attn.mode == mode for b in vit.blocks)
    torch.testing.assert_close(vit.blocks[0].attn.qkv.weight, original.blocks[0].attn.qkv.weight)
    vit.eval()
    x = _dissimilar_batch()
    with torch.no_grad():
        torch.testing.assert_close(vit(x), original(x), rtol=1e-5, atol=1e-5)
        # and one sample alone gives its row of the batch (independent eval)
        torch.testing.assert_close(vit(x[2:3]), original(x)[2:3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "element"])
def test_training_relates_the_batch_and_gradients_flow(mode) -> None:
    vit = _vit()
    original = copy.deepcopy(vit).train()
    to_ibaformer(vit, blocks="last1", mode=mode)
    assert isinstance(vit.blocks[1].attn, TimmIntraBatchAttention)
    assert not isinstance(vit.blocks[0].attn, IntraBatchAttention)
    vit.train()
    x = _dissimilar_batch()
    out = vit(x)
    with torch.no_grad():
        plain = original(x)
    assert (out - plain).abs().max() > 1e-3  # IBA mixes in the other samples
    # a batch of one sample is plain self-attention (IBA over a batch of one is SA)
    torch.testing.assert_close(vit(x[:1]), original(x[:1]), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    attn = vit.blocks[1].attn
    assert attn.qkv.weight.grad is not None and attn.qkv.weight.grad.abs().sum() > 0
    assert vit.patch_embed.proj.weight.grad.abs().sum() > 0
    assert attn.has_statistics  # training statistics for independent eval were collected


def test_refusals_name_the_problem() -> None:
    with pytest.raises(ValueError, match="qk_norm"):
        to_ibaformer(_vit(qk_norm=True))
    with pytest.raises(ValueError, match="attn_drop"):
        to_ibaformer(_vit(attn_drop_rate=0.1))
    with pytest.raises(ValueError, match="no `blocks`"):
        to_ibaformer(torch.nn.Linear(2, 2))
    vit = to_ibaformer(_vit(), blocks=[0])
    with pytest.raises(ValueError, match="attn_mask"):
        vit.blocks[0].attn(torch.randn(2, 17, 192), attn_mask=torch.ones(17, 17, dtype=torch.bool))
    with pytest.raises(ValueError, match="qkv_bias is taken from the timm attention"):
        to_ibaformer(_vit(), qkv_bias=False)


def test_block_selection() -> None:
    assert select_blocks("all", 4) == [0, 1, 2, 3]
    assert select_blocks("last2", 4) == [2, 3] and select_blocks("first1", 4) == [0]
    assert select_blocks([0, -1], 4) == [0, 3] and select_blocks(2, 4) == [2]
    for bad in ("last0", "last5", "some", [4], [], [True]):
        with pytest.raises(ValueError, match="blocks="):
            select_blocks(bad, 4)
