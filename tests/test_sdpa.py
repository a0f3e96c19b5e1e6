"""``batchmates.nn._sdpa.attention``: the explicit CPU form equals the fused kernel, and the rule picks as stated."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchmates.nn import _sdpa
from batchmates.nn._sdpa import CPU_EXPLICIT_MAX, attention

torch.set_num_threads(1)


def _qkv(b: int, h: int, length: int, s: int, d: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(b, h, n, d, generator=g, dtype=dtype) * 2).requires_grad_(True)
                 for n in (length, s, s))


def _count_fused(monkeypatch) -> list[int]:
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_sdpa.F, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize(("length", "s", "scale"), [(49, 49, None), (16, 49, 0.5), (1, 7, 1.0), (130, 130, None)])
def test_matches_the_fused_kernel_values_and_gradients(length: int, s: int, scale: float | None) -> None:
    q, k, v = _qkv(3, 2, length, s, 8)
    got = attention(q, k, v, scale=scale)
    want = F.scaled_dot_product_attention(q, k, v, scale=scale)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    t = torch.randn_like(want)
    g_got = torch.autograd.grad((got * t).sum(), (q, k, v))
    g_want = torch.autograd.grad((want * t).sum(), (q, k, v))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_short_sequences_are_explicit_on_cpu_and_long_ones_fused(monkeypatch) -> None:
    calls = _count_fused(monkeypatch)
    side = int(CPU_EXPLICIT_MAX**0.5)
    attention(*_qkv(1, 1, side, side, 4))  # L * S == CPU_EXPLICIT_MAX: explicit
    assert calls == []
    attention(*_qkv(1, 1, side + 1, side, 4))  # one more row: fused
    assert calls == [1]


def test_bf16_autocast_is_as_accurate_as_the_fused_kernel() -> None:
    # bf16 inputs, as a bf16 Linear gives them under autocast
    q, k, v = (t.detach().to(torch.bfloat16) for t in _qkv(4, 2, 49, 49, 16))
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    with torch.autocast("cpu", torch.bfloat16):
        got = attention(q, k, v)
        fused = F.scaled_dot_product_attention(q, k, v)
    assert got.dtype == fused.dtype == torch.bfloat16
    err, err_fused = (float((o.double() - want).abs().mean()) for o in (got, fused))
    assert err <= 1.1 * err_fused, (err, err_fused)  # computed in float32, as the fused kernel accumulates
    assert err < 0.01


def test_dropout_drops_weights_only_when_asked() -> None:
    q, k, v = (t.detach() for t in _qkv(2, 2, 9, 9, 4))
    base = attention(q, k, v)
    torch.manual_seed(0)
    dropped = attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(dropped, base)
    # inverted dropout: the mean over many draws is the undropped output
    torch.manual_seed(1)
    mean = torch.stack([attention(q, k, v, dropout_p=0.5) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, base, atol=0.1, rtol=0.1)
