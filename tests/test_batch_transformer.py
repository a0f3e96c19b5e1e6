"""Multi-Level Attention and the BatchTransformerHead (Her et al. 2024, arXiv:2407.04218)."""

from __future__ import annotations

import pytest
import torch

from batchmates.nn.batch_transformer import BatchTransformerHead, BatchTransformerOutput, sine_position_encoding
from batchmates.nn.multi_level_attention import MultiLevelAttention, pool_to_tokens
from batchmates.testing import Shard, ddp_average_grads

torch.set_num_threads(1)
D64 = torch.float64
DIMS = [4, 6, 8]


def _stages(b: int = 5, seed: int = 0, dtype=D64, dims=DIMS):
    g = torch.Generator().manual_seed(seed)
    sizes = [8, 4, 2][-len(dims) :]
    return [torch.randn(b, c, s, s, generator=g, dtype=dtype) for c, s in zip(dims, sizes)]


def _head(seed: int = 0, **kw) -> BatchTransformerHead:
    torch.manual_seed(seed)
    opts = dict(feature_map_size=(2, 2), mla_dim=8, mla_heads=2, mla_tokens=2)
    opts.update(kw)
    return BatchTransformerHead(DIMS, 3, **opts).double()


# ---------------------------------------------------------------- Multi-Level Attention


def test_mla_shapes_feature_and_token_maps():
    torch.manual_seed(0)
    mla = MultiLevelAttention([4, 6, 5], dim=8, tokens=2, depth=2, num_heads=2)
    feats = [torch.randn(3, 4, 8, 8), torch.randn(3, 6, 3, 5), torch.randn(3, 7, 5)]  # square-free token count
    assert mla(feats).shape == (3, 8)
    assert pool_to_tokens(torch.randn(3, 16, 5), 2).shape == (3, 4, 5)  # 16 tokens read as a 4x4 grid


def test_pool_to_tokens_matches_independent_averages():
    x = torch.randn(2, 3, 4, 4, dtype=D64)
    tok = pool_to_tokens(x, 2)
    ref = x.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5)).flatten(2).transpose(1, 2)  # 2x2 block means, raster order
    torch.testing.assert_close(tok, ref)
    grid_tokens = x.flatten(2).transpose(1, 2)  # the same map as 16 raster-order tokens
    torch.testing.assert_close(pool_to_tokens(grid_tokens, 2), ref)


def test_mla_is_per_sample_in_training():
    torch.manual_seed(0)
    mla = MultiLevelAttention(DIMS, dim=8, tokens=2, num_heads=2).double().train()
    feats = _stages(b=5)
    out = mla(feats)
    alone = mla([f[2:3] for f in feats])
    torch.testing.assert_close(out[2:3], alone, rtol=1e-12, atol=1e-12)


def test_mla_fuses_every_level():
    torch.manual_seed(0)
    mla = MultiLevelAttention(DIMS, dim=8, tokens=2, num_heads=2).double()
    feats = [f.requires_grad_() for f in _stages(b=3)]
    mla(feats).square().sum().backward()
    for i, f in enumerate(feats):
        assert f.grad.abs().sum() > 0, f"level {i} does not reach the fused feature"
    base = mla([f.detach() for f in feats])
    for i in range(len(feats)):
        changed = [f.detach().clone() for f in feats]
        changed[i] += 1.0
        assert (mla(changed) - base).abs().max() > 1e-6


def test_mla_bad_inputs():
    mla = MultiLevelAttention([4, 6], dim=8, tokens=2, num_heads=2)
    with pytest.raises(ValueError, match="expected 2 feature levels"):
        mla([torch.randn(2, 4, 4, 4)])
    with pytest.raises(ValueError, match=r"features\[1\] has 5 channels but in_dims\[1\] is 6"):
        mla([torch.randn(2, 4, 4, 4), torch.randn(2, 5, 2, 2)])
    with pytest.raises(ValueError, match="share the batch size"):
        mla([torch.randn(2, 4, 4, 4), torch.randn(3, 6, 2, 2)])
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] or a token map"):
        mla([torch.randn(2, 4), torch.randn(2, 6, 2, 2)])
    with pytest.raises(TypeError, match="list of per-level tensors"):
        mla(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiLevelAttention([4], dim=10, num_heads=4)
    with pytest.raises(ValueError, match="non-empty sequence"):
        MultiLevelAttention([], dim=8)


# ---------------------------------------------------------------- head: outputs


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"use_mla": False},
        {"pos_encoding": "sine", "feature_map_size": None},
        {"pos_encoding": "none", "feature_map_size": None, "cba_scale": "sqrt_e"},
    ],
)
def test_head_shapes(kw):
    head = _head(**kw).train()
    out = head(_stages(b=5))
    assert isinstance(out, BatchTransformerOutput)
    assert out.main.shape == out.cba.shape == out.bt.shape == (5, 3)
    torch.testing.assert_close(out.bt, out.cba + out.main, rtol=0, atol=0)
    assert (out.cba - out.main).abs().max() > 1e-6  # CBA really mixes the batch in training


def test_head_token_map_last_stage():
    torch.manual_seed(0)
    head = BatchTransformerHead([4, 6], 3, feature_map_size=(2, 3), mla_dim=8, mla_heads=2, mla_tokens=2)
    out = head([torch.randn(4, 9, 4), torch.randn(4, 6, 6)])  # a ViT-like [B, T, D] stage with T = 2*3
    assert out.bt.shape == (4, 3)


def test_sine_position_encoding():
    pos = sine_position_encoding(6, 3, 5, dtype=D64)
    assert pos.shape == (6, 3, 5) and pos.abs().max() <= 1
    # first half varies only along rows, second half only along columns; no two positions coincide
    assert torch.equal(pos[:3], pos[:3, :, :1].expand(3, 3, 5)) and torch.equal(pos[3:], pos[3:, :1].expand(3, 3, 5))
    flat = pos.flatten(1).T
    assert torch.cdist(flat, flat).add(torch.eye(15, dtype=D64)).min() > 1e-3


def test_head_batch_permutation_equivariance_in_training():
    head = _head().train()
    feats = _stages(b=6, seed=1)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    out, out_p = head(feats), head([f[perm] for f in feats])
    for name in ("main", "cba", "bt"):
        torch.testing.assert_close(getattr(out_p, name), getattr(out, name)[perm], rtol=1e-10, atol=1e-10)


def test_head_independent_eval_ignores_batch_mates_and_predicts_main():
    head = _head().eval()
    a, b = _stages(b=5, seed=2), _stages(b=5, seed=3)
    for fa, fb in zip(a, b):
        fb[0] = fa[0]
    out_a, out_b = head(a), head(b)
    out_1 = head([f[:1] for f in a])
    for name in ("main", "cba", "bt"):
        torch.testing.assert_close(getattr(out_a, name)[0], getattr(out_b, name)[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(getattr(out_a, name)[:1], getattr(out_1, name), rtol=1e-12, atol=1e-12)
    assert torch.equal(out_a.cba, out_a.main) and torch.equal(head.predict(out_a), out_a.main)
    # batch-size-1 *training* behaviour of CBA is the same: cba == main exactly
    out_train_1 = head.train()([f[:1] for f in a])
    assert torch.equal(out_train_1.cba, out_train_1.main)


def test_head_batch_eval_predicts_bt():
    head = _head(eval_mode="batch").eval()
    out = head(_stages(b=5, seed=4))
    assert torch.equal(head.predict(out), out.bt)
    assert (out.bt - 2 * out.main).abs().max() > 1e-6  # bt really uses the batch in eval
    head.eval_mode = "independent"
    out_i = head(_stages(b=5, seed=4))
    assert torch.equal(head.predict(out_i), out_i.main)


def test_head_gradient_across_samples():
    head = _head().train()
    feats = [f.requires_grad_() for f in _stages(b=4, seed=5)]
    out = head(feats)
    out.bt[0].sum().backward()
    assert feats[-1].grad[1:].abs().sum() > 0  # sample 0's bt logits depend on its batch mates' last maps
    head.eval()
    feats = [f.detach().requires_grad_() for f in feats]
    head(feats).bt[0].sum().backward()
    assert all(torch.count_nonzero(f.grad[1:]) == 0 for f in feats)


# ---------------------------------------------------------------- head: loss


def _manual_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    z = logits - logits.max(dim=1, keepdim=True).values
    logp = z - z.exp().sum(dim=1, keepdim=True).log()
    return -logp[torch.arange(len(labels)), labels].mean()


def test_head_loss_is_three_term_cross_entropy():
    head = _head(lambda_main=0.7).train()
    out = head(_stages(b=6, seed=6))
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    expected = 0.7 * _manual_ce(out.main, labels) + _manual_ce(out.bt, labels) + _manual_ce(out.cba, labels)
    torch.testing.assert_close(head.loss(out, labels), expected, rtol=1e-12, atol=1e-12)


def test_head_loss_validation():
    head = _head().train()
    out = head(_stages(b=4))
    with pytest.raises(ValueError, match=r"labels has 3 entries but out.main has 4 rows"):
        head.loss(out, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        head.loss(out, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="integer tensor"):
        head.loss(out, torch.zeros(4))
    wrong_k = BatchTransformerOutput(main=torch.randn(4, 5), cba=torch.randn(4, 5), bt=torch.randn(4, 5))
    with pytest.raises(ValueError, match="num_classes=3"):
        head.loss(wrong_k, torch.tensor([0, 1, 2, 0]))


def test_head_bad_inputs_and_options():
    head = _head()
    with pytest.raises(ValueError, match="expected 3 stages"):
        head(_stages(b=2)[:2])
    with pytest.raises(ValueError, match="feature_map_size"):
        head(_stages(b=2)[:2] + [torch.randn(2, 8, 3, 3, dtype=D64)])
    with pytest.raises(ValueError, match="stage_dims"):
        head(_stages(b=2)[:2] + [torch.randn(2, 7, 2, 2, dtype=D64)])
    with pytest.raises(ValueError, match="needs feature_map_size"):
        BatchTransformerHead(DIMS, 3, pos_encoding="learned")
    with pytest.raises(ValueError, match="pos_encoding"):
        BatchTransformerHead(DIMS, 3, pos_encoding="rope")
    with pytest.raises(ValueError, match="num_classes"):
        BatchTransformerHead(DIMS, 0, feature_map_size=(2, 2))
    with pytest.raises(ValueError, match="eval_mode"):
        BatchTransformerHead(DIMS, 3, feature_map_size=(2, 2), eval_mode="transductive")


def test_head_bf16_autocast_finite():
    torch.manual_seed(0)
    head = BatchTransformerHead(DIMS, 3, feature_map_size=(2, 2), mla_dim=8, mla_heads=2, mla_tokens=2).train()
    feats = [f.float() * 30 for f in _stages(b=6, seed=7, dtype=torch.float32)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(feats)
        loss = head.loss(out, torch.tensor([0, 1, 2, 0, 1, 2]))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(t).all() for t in (out.main, out.cba, out.bt))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


# ---------------------------------------------------------------- global batch under torch.distributed


def _head_shard(shard: Shard, stages, labels):
    rows = shard.rows  # unequal split: the loss is a global mean all the same
    head = _head(lambda_main=0.5).train()
    stages = [s[rows].clone().requires_grad_() for s in stages]
    out = head(stages)
    loss = head.loss(out, labels[rows])
    loss.backward()
    ddp_average_grads(head)
    grads = {n: p.grad.clone() for n, p in head.named_parameters()}
    return {"loss": loss.detach(), "bt": out.bt.detach(), "grads": grads}


def test_head_distributed_equivalence_two_gloo_ranks(ddp_contract):
    stages = _stages(b=5, seed=8)
    labels = torch.tensor([0, 2, 1, 1, 2])
    run = ddp_contract(_head_shard, 5, stages, labels, concat=("bt",), rtol=1e-5, atol=1e-5)
    assert run.full["grads"]["k_proj.weight"].abs().sum() > 0


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_head_cuda_fp16_autocast_matches_float64():
    head = _head(pos_encoding="sine", feature_map_size=None).train()
    feats = _stages(b=8, seed=9)
    ref = head(feats)
    head_c = head.cuda()
    out = head_c([f.cuda() for f in feats])
    torch.testing.assert_close(out.bt.cpu(), ref.bt, rtol=1e-9, atol=1e-9)
    with torch.autocast("cuda", dtype=torch.float16):
        out16 = head_c.float()([f.float().cuda() * 30 for f in feats])
        loss = head_c.loss(out16, torch.arange(8, device="cuda") % 3)
    assert torch.isfinite(loss)
