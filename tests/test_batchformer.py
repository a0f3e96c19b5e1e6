"""BatchFormer (arXiv:2203.01522): against torch's TransformerEncoderLayer, batch contract, eval path, DDP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchmates.nn.batchformer import BatchFormer
from batchmates.testing import Shard, ddp_average_grads

torch.set_num_threads(1)
DT = torch.float64
DIM, HEADS = 8, 2


def _make(seed: int = 0, **kw) -> BatchFormer:
    torch.manual_seed(seed)
    m = BatchFormer(DIM, HEADS, **kw).to(DT)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for ln in (m.norm1, m.norm2):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.5, 0.5)
    return m


def _x(b: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, DIM, generator=g, dtype=DT)


def _torch_reference(m: BatchFormer) -> nn.TransformerEncoderLayer:
    """torch's own encoder layer with the same weights (an independent implementation of the same maths)."""
    ref = nn.TransformerEncoderLayer(
        DIM, HEADS, dim_feedforward=m.linear1.out_features, dropout=0.0, activation=m.activation,
        batch_first=True, norm_first=m.norm_first, dtype=DT,
    )
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(m.in_proj.weight)
        ref.self_attn.in_proj_bias.copy_(m.in_proj.bias)
        ref.self_attn.out_proj.weight.copy_(m.out_proj.weight)
        ref.self_attn.out_proj.bias.copy_(m.out_proj.bias)
        for name in ("linear1", "linear2", "norm1", "norm2"):
            getattr(ref, name).load_state_dict(getattr(m, name).state_dict())
    return ref.train()  # train(): torch's slow path, the plain maths


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_matches_torch_encoder_layer_over_the_batch_axis(norm_first: bool, activation: str) -> None:
    m = _make(norm_first=norm_first, activation=activation, dim_feedforward=12).train()
    x = _x()
    out = m(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    ref = _torch_reference(m)
    torch.testing.assert_close(out, ref(x.unsqueeze(0)).squeeze(0), atol=1e-10, rtol=1e-10)


def test_permutation_equivariance_in_training() -> None:
    m = _make().train()
    x = _x()
    perm = torch.tensor([4, 2, 0, 5, 1, 3])
    torch.testing.assert_close(m(x[perm]), m(x)[perm], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("norm_first", [False, True])
def test_independent_eval_equals_batch_of_one_and_ignores_batch_mates(norm_first: bool) -> None:
    m = _make(norm_first=norm_first)
    x = _x(b=4)
    x2 = x.clone()
    x2[1:] = _x(b=4, seed=8)[1:]
    m.eval()
    out = m(x)
    torch.testing.assert_close(out[0], m(x2)[0], atol=0, rtol=0)
    m.train()  # batch-size-1 behaviour of the layer itself (training mode, dropout 0)
    ones = torch.cat([m(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(out, ones, atol=1e-12, rtol=1e-10)
    ref = _torch_reference(m)  # each sample a sequence of one token
    torch.testing.assert_close(out, ref(x.unsqueeze(1)).squeeze(1), atol=1e-10, rtol=1e-10)
    # batch eval mode attends across the test batch
    m.eval()
    m.eval_mode = "batch"
    torch.testing.assert_close(m(x), ref(x.unsqueeze(0)).squeeze(0), atol=1e-10, rtol=1e-10)
    assert not torch.allclose(m(x)[0], m(x2)[0])


def _cross_grad(m: BatchFormer, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    m(x)[0].sum().backward()
    return x.grad[1:]


def test_gradient_flows_across_samples_only_when_the_batch_is_used() -> None:
    m = _make().train()
    assert _cross_grad(m, _x()).abs().min() > 0
    m.eval()
    assert torch.count_nonzero(_cross_grad(m, _x())) == 0
    m.eval_mode = "batch"
    assert _cross_grad(m, _x()).abs().max() > 1e-6


def test_shared_classifier_eval_path() -> None:
    """Training: logits on cat([x, BatchFormer(x)]) with labels repeated; test: the layer is dropped."""
    m = _make()
    clf = nn.Linear(DIM, 3).to(DT)
    x, y = _x(), torch.tensor([0, 1, 2, 0, 1, 2])
    m.train()
    feats, labels = m.augment(x, y)
    assert feats.shape == (12, DIM) and torch.equal(labels, torch.cat([y, y]))
    torch.testing.assert_close(feats[:6], x, atol=0, rtol=0)
    torch.testing.assert_close(feats[6:], m(x))
    loss = nn.functional.cross_entropy(clf(feats), labels)
    loss.backward()
    assert torch.isfinite(loss) and clf.weight.grad.abs().sum() > 0 and m.in_proj.weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        feats_eval, labels_eval = m.augment(x, y)
        assert feats_eval is x and labels_eval is y  # dropped: the classifier sees the pre-layer features
        pred = clf(feats_eval).argmax(1)
        x2 = x.clone()
        x2[1:] = _x(seed=4)[1:]
        pred2 = clf(m.augment(x2)[0]).argmax(1)
    assert pred[0] == pred2[0] and torch.equal(pred, clf(x).argmax(1))
    with pytest.raises(ValueError, match=r"labels"):
        m.augment(x, y[:3])


def test_dropout_is_used_in_training_only() -> None:
    m = _make(dropout=0.5)
    x = _x()
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    b = m(x)
    assert not torch.allclose(a, b)
    m.eval()
    torch.testing.assert_close(m(x), m(x))


def test_bf16_autocast_is_finite() -> None:
    torch.manual_seed(0)
    m = BatchFormer(64, 4).train()
    x = (torch.randn(32, 64) * 100).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_invalid_inputs_raise_clear_errors() -> None:
    m = BatchFormer(DIM, HEADS)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        m(torch.randn(2, 3, DIM))
    with pytest.raises(ValueError, match=r"dim=8"):
        m(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"NaN"):
        m(torch.full((2, DIM), float("nan")))
    with pytest.raises(TypeError, match=r"floating"):
        m(torch.ones(2, DIM, dtype=torch.long))
    with pytest.raises(ValueError, match=r"eval_mode"):
        BatchFormer(DIM, HEADS, eval_mode="none")
    with pytest.raises(ValueError, match=r"divisible"):
        BatchFormer(10, 4)
    with pytest.raises(ValueError, match=r"dropout"):
        BatchFormer(DIM, HEADS, dropout=1.0)


# --- torch.distributed: 2 gloo ranks with half the batch each == one process with all of it -----------------


def _batchformer_shard(shard: Shard, states: dict, x: torch.Tensor, t: torch.Tensor) -> dict:
    rows = shard.rows
    results = {}
    for norm_first, state in states.items():
        m = BatchFormer(DIM, HEADS, norm_first=norm_first).to(DT)
        m.load_state_dict(state)
        m.train()
        xl = x[rows].clone().requires_grad_(True)
        out = m(xl)
        # this rank's share of the global objective sum(out * t) / B, as DDP sees it (x W: DDP averages over ranks)
        ((out * t[rows]).sum() * shard.world / shard.n).backward()
        ddp_average_grads(m)
        results[f"out nf={norm_first}"] = out.detach()
        # the per-rank objective is W x this rank's share: its input gradient is W x the global objective's
        results[f"input grad nf={norm_first}"] = xl.grad / shard.world
        results[f"grads nf={norm_first}"] = {k: p.grad for k, p in m.named_parameters()}
    return results


def test_distributed_equivalence(ddp_contract) -> None:
    states = {nf: _make(seed=3, norm_first=nf).state_dict() for nf in (False, True)}
    x, t = _x(b=8), _x(b=8, seed=2)
    per_sample = [f"{what} nf={nf}" for nf in states for what in ("out", "input grad")]
    ddp_contract(_batchformer_shard, 8, states, x, t, concat=per_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_matches_cpu_and_bf16_is_finite() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    m = _make().train()
    x = _x(b=16)
    ref = m(x)
    torch.testing.assert_close(m.cuda()(x.cuda()).cpu(), ref, atol=1e-8, rtol=1e-8)
    torch.manual_seed(0)
    m32 = BatchFormer(256, 4).cuda().train()
    x32 = (torch.randn(128, 256, device="cuda") * 100).requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m32(x32)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x32.grad).all()
