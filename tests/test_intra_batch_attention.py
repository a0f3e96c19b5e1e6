"""IBAFormer intra-batch attention (arXiv:2309.06282): MIBA / EIBA against a naive reference, contract, DDP."""

from __future__ import annotations

import pytest
import torch
from _iba_reference import DIM, DT, HEADS
from _iba_reference import make as _make
from _iba_reference import naive_iba as _naive_iba
from _iba_reference import ref_block as _ref_block
from _iba_reference import ref_self_attention as _ref_self_attention
from _iba_reference import tokens as _x

from batchmates.nn.intra_batch_attention import IntraBatchAttention, intra_batch_attention
from batchmates.testing import Shard, ddp_average_grads

torch.set_num_threads(1)


# ---- tests ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mean", "element"])
def test_matches_naive_reference_in_training(mode: str) -> None:
    m = _make(mode).train()
    x = _x()
    out = m(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, _ref_block(m, x, mode), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mode", ["mean", "element"])
def test_batch_of_one_and_identical_samples_reduce_to_self_attention(mode: str) -> None:
    m = _make(mode).train()
    x1 = _x(b=1)
    torch.testing.assert_close(m(x1), _ref_self_attention(m, x1), atol=1e-12, rtol=1e-10)
    same = x1.expand(4, -1, -1).clone()
    torch.testing.assert_close(m(same), _ref_self_attention(m, same), atol=1e-12, rtol=1e-10)
    # and a batch of different samples does not (the IBA term is really there)
    x = _x()
    assert (m(x) - _ref_self_attention(m, x)).abs().max() > 1e-3


def test_miba_and_eiba_differ_on_dissimilar_samples() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 5, 3, dtype=DT) * 2 for _ in range(3))
    miba = intra_batch_attention(q, k, v, "mean")
    eiba = intra_batch_attention(q, k, v, "element")
    assert (miba - eiba).abs().max() > 1e-2
    torch.testing.assert_close(miba, _naive_iba(q, k, v, "mean"))
    torch.testing.assert_close(eiba, _naive_iba(q, k, v, "element"))
    mi, ei = _make("mean"), _make("element")
    assert (mi(_x()) - ei(_x())).abs().max() > 1e-3  # same weights (same seed), different modes


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 24, 1000])
@pytest.mark.parametrize("checkpoint_chunks", [True, False])
def test_chunked_eiba_equals_naive_value_and_gradient(chunk_size: int, checkpoint_chunks: bool) -> None:
    torch.manual_seed(0)
    b = 5  # 25 query-key pairs: 3, 7 and 24 do not divide it
    base = [torch.randn(b, 2, 4, 3, dtype=DT) for _ in range(3)]
    gout = torch.randn(b, 2, 4, 3, dtype=DT)
    q, k, v = (t.clone().requires_grad_(True) for t in base)
    out = intra_batch_attention(q, k, v, "element", chunk_size, checkpoint_chunks=checkpoint_chunks)
    (out * gout).sum().backward()
    qr, kr, vr = (t.clone().requires_grad_(True) for t in base)
    ref = _naive_iba(qr, kr, vr, "element")
    (ref * gout).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mode", ["mean", "element"])
def test_permutation_equivariance_in_training(mode: str) -> None:
    m = _make(mode, chunk_size=4).train()
    x = _x(b=6)
    perm = torch.tensor([2, 5, 0, 1, 4, 3])
    torch.testing.assert_close(m(x[perm]), m(x)[perm], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mode", ["mean", "element"])
def test_untrained_layer_evaluates_as_self_attention_and_batch_eval_uses_the_batch(mode: str) -> None:
    m = _make(mode).eval()  # no training batch yet: no statistics, so independent eval is self-attention alone
    assert not m.has_statistics
    x = _x(b=4)
    x2 = x.clone()
    x2[1:] = _x(b=4, seed=5)[1:]
    out = m(x)
    torch.testing.assert_close(out, _ref_self_attention(m, x), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out[0], m(x2)[0], atol=0, rtol=0)
    m.eval_mode = "batch"  # opt-in: eval relates the test batch like training does, and collects nothing
    torch.testing.assert_close(m(x), _ref_block(m, x, mode), atol=1e-10, rtol=1e-10)
    assert not torch.allclose(m(x)[0], m(x2)[0])
    assert not m.has_statistics and int(m.num_batches_tracked) == 0


def _cross_grad(m: IntraBatchAttention, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    m(x)[0].sum().backward()
    return x.grad[1:]


@pytest.mark.parametrize("mode", ["mean", "element"])
def test_gradient_flows_across_samples_only_when_the_batch_is_used(mode: str) -> None:
    m = _make(mode).train()
    assert _cross_grad(m, _x()).abs().min() > 0  # every other sample influences sample 0
    m.eval()
    assert m.has_statistics  # independent eval uses the training statistics, which are constants
    assert torch.count_nonzero(_cross_grad(m, _x())) == 0
    m.eval_mode = "batch"
    assert _cross_grad(m, _x()).abs().max() > 1e-6


@pytest.mark.parametrize("mode", ["mean", "element"])
def test_bf16_autocast_is_finite(mode: str) -> None:
    torch.manual_seed(0)
    m = IntraBatchAttention(32, 4, mode=mode, chunk_size=5).train()
    x = (torch.randn(6, 16, 32) * 30).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.shape == (6, 16, 32) and torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_invalid_inputs_raise_clear_errors() -> None:
    m = IntraBatchAttention(DIM, HEADS)
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        m(torch.randn(2, DIM))
    with pytest.raises(ValueError, match=r"dim=12"):
        m(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"NaN"):
        m(torch.full((2, 3, DIM), float("inf")))
    with pytest.raises(ValueError, match=r"mode"):
        IntraBatchAttention(DIM, HEADS, mode="max")
    with pytest.raises(ValueError, match=r"eval_mode"):
        IntraBatchAttention(DIM, HEADS, eval_mode="eval")
    with pytest.raises(ValueError, match=r"divisible"):
        IntraBatchAttention(10, 3)
    with pytest.raises(ValueError, match=r"chunk_size"):
        IntraBatchAttention(DIM, HEADS, mode="element", chunk_size=0)
    q = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"\[B, heads, N, d\]"):
        intra_batch_attention(q[0], q[0], q[0], "mean")
    with pytest.raises(ValueError, match=r"same samples"):
        intra_batch_attention(q, q[:1], q[:1], "element")
    with pytest.raises(ValueError, match=r"chunk_size"):
        intra_batch_attention(q, q, q, "element", chunk_size=-2)


def test_aliases_and_token_mixer_registration() -> None:
    assert IntraBatchAttention(DIM, HEADS, mode="eiba").mode == "element"
    assert IntraBatchAttention(DIM, HEADS, mode="MIBA").mode == "mean"
    from batchmates.models import available_token_mixers, create_token_mixer

    assert {"miba", "eiba"} <= set(available_token_mixers())
    for name, mode in (("miba", "mean"), ("eiba", "element")):
        mixer = create_token_mixer(name, DIM, HEADS, chunk_size=2)
        assert isinstance(mixer, IntraBatchAttention) and mixer.mode == mode and mixer.chunk_size == 2
        assert mixer(torch.randn(2, 3, DIM)).shape == (2, 3, DIM)


def test_self_attention_weights_load_into_iba_and_evaluate_as_self_attention() -> None:
    from batchmates.models import create_token_mixer

    sa = create_token_mixer("self", DIM, HEADS).to(DT).eval()
    m = _make("element").train()
    m(_x())  # collect statistics, which the self-attention checkpoint must then clear
    m.load_state_dict(sa.state_dict())  # same parameter names, no statistics (like a checkpoint from before them)
    assert not m.has_statistics
    x = _x()
    torch.testing.assert_close(m.eval()(x), sa(x), atol=1e-12, rtol=1e-10)
    params = {k: t for k, t in m.state_dict().items() if k in dict(m.named_parameters())}
    sa.load_state_dict(params)  # and the other way round, parameters only


# --- torch.distributed: 2 gloo ranks on uneven shares of the batch == one process with all of it -------------


_STATS = ("running_k", "running_v", "bank_k", "bank_v", "num_batches_tracked", "train_batch_size")


def _train_twice(m: IntraBatchAttention, x: torch.Tensor, t: torch.Tensor, x2: torch.Tensor, scale: float):
    """A step with a gradient on x, then a second training batch x2 (statistics only) and eval on x2."""
    m.train()
    xl = x.clone().requires_grad_(True)
    out = m(xl)
    ((out * t).sum() * scale).backward()
    m(x2)
    evaluated = m.eval()(x2)
    return out.detach(), xl.grad, {k: getattr(m, k).clone() for k in _STATS}, evaluated.detach()


def _iba_shard(shard: Shard, states: dict, x: torch.Tensor, t: torch.Tensor, x2: torch.Tensor) -> dict:
    rows = shard.rows
    results = {}
    for mode, state in states.items():
        # ranks run chunked EIBA (3 sample pairs per chunk), the single process the automatic chunking: the
        # check also covers chunked == unchunked across the gather
        chunk_size = 3 if shard.world > 1 else None
        m = IntraBatchAttention(DIM, HEADS, mode=mode, chunk_size=chunk_size, bank_size=4).to(DT)
        m.load_state_dict(state)
        # this rank's share of the global objective sum(out * t) / B, as DDP sees it (x W: DDP averages over ranks)
        out, xgrad, stats, evaluated = _train_twice(m, x[rows], t[rows], x2[rows], shard.world / shard.n)
        ddp_average_grads(m)
        results[f"out {mode}"] = out
        # the per-rank objective is W x this rank's share: its input gradient is W x the global objective's
        results[f"input grad {mode}"] = xgrad / shard.world
        results[f"grads {mode}"] = {k: p.grad for k, p in m.named_parameters()}
        results[f"stats {mode}"] = stats
        results[f"eval {mode}"] = evaluated
    return results


def test_distributed_equivalence_miba_eiba(ddp_contract) -> None:
    """2 gloo ranks (uneven shares) == one process: outputs, gradients, and the training statistics (identical on
    every rank, equal to the single process's), hence independent eval too."""
    modes = ["mean", "element"]
    states = {mode: _make(mode, seed=i).state_dict() for i, mode in enumerate(modes)}
    x, t, x2 = _x(b=6), _x(b=6, seed=2), _x(b=6, seed=3)
    per_sample = [f"{what} {mode}" for mode in modes for what in ("out", "input grad", "eval")]
    run = ddp_contract(_iba_shard, 6, states, x, t, x2, concat=per_sample, rtol=1e-5, atol=1e-5)
    assert run.splits == (4, 2)
    for mode in modes:
        stats = run.full[f"stats {mode}"]
        assert int(stats["train_batch_size"]) == 6 and int(stats["num_batches_tracked"]) == 2
        assert stats["bank_k"].shape[0] == (4 if mode == "element" else 0)
        for res in run.ranks:
            for k in _STATS:  # rank == rank 0, bitwise
                torch.testing.assert_close(res[f"stats {mode}"][k], run.ranks[0][f"stats {mode}"][k], atol=0, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["mean", "element"])
def test_cuda_fused_kernels_match_reference_and_bf16_is_finite(mode: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    m = IntraBatchAttention(64, 4, mode=mode, chunk_size=7).cuda().train()
    x = torch.randn(6, 32, 64, device="cuda")
    out = m(x)  # float32 on CUDA: fused SDPA kernels
    m64 = IntraBatchAttention(64, 4, mode=mode).double().train()
    m64.load_state_dict({k: v.double().cpu() for k, v in m.state_dict().items()})
    torch.testing.assert_close(out.double().cpu(), m64(x.double().cpu()), atol=1e-4, rtol=1e-4)
    xb = (x * 30).requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ob = m(xb)
    assert torch.isfinite(ob).all()
    ob.float().sum().backward()
    assert torch.isfinite(xb.grad).all()
