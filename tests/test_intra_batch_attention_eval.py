"""IntraBatchAttention's independent eval from training statistics (running K̄/V̄, EIBA's key/value bank).

The references (tests/_iba_reference.py) recompute the statistics from their definition and the eval output
with explicit softmax attention; the contract: independent eval never depends on batch mates, is
deterministic, equals the running-statistics formula, and a checkpoint carries the statistics.
"""

from __future__ import annotations

import pytest
import torch
from _iba_reference import (
    DIM,
    DT,
    HEADS,
    make,
    ref_block,
    ref_independent_eval,
    ref_self_attention,
    ref_statistics,
    tokens,
)

from batchmates.nn.intra_batch_attention import IntraBatchAttention

torch.set_num_threads(1)

FORMS = [("mean", "running"), ("mean", "sa"), ("element", "running"), ("element", "bank"), ("element", "sa")]


def _trained(mode: str, form: str = "running", sizes=(5, 3, 4), **kw) -> tuple[IntraBatchAttention, list]:
    """A layer after training forwards on batches of ``sizes`` (momentum 0.4: cumulative average for the first
    two batches, then EMA; a bank of 6 that the batches overfill)."""
    m = make(mode, eval_form=form, momentum=0.4, bank_size=6, **kw).train()
    batches = [tokens(b=b, seed=10 + i) for i, b in enumerate(sizes)]
    for x in batches:
        m(x)
    return m.eval(), batches


@pytest.mark.parametrize(("mode", "form"), FORMS)
def test_statistics_and_independent_eval_match_the_reference(mode: str, form: str) -> None:
    m, batches = _trained(mode, form)
    ref = ref_statistics(m, batches, momentum=0.4, bank_size=6)
    torch.testing.assert_close(m.running_k, ref["k"], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(m.running_v, ref["v"], atol=1e-12, rtol=1e-10)
    assert int(m.num_batches_tracked) == 3 and int(m.train_batch_size) == 4
    if mode == "element":
        torch.testing.assert_close(m.bank_k, ref["bank_k"], atol=1e-13, rtol=1e-12)
        torch.testing.assert_close(m.bank_v, ref["bank_v"], atol=1e-13, rtol=1e-12)
    else:
        assert m.bank_k.numel() == 0  # MIBA keeps no bank
    x = tokens(b=4, seed=3)
    torch.testing.assert_close(m(x), ref_independent_eval(m, x, form, ref), atol=1e-11, rtol=1e-9)
    if form != "sa":  # the training term is really there
        assert (m(x) - ref_self_attention(m, x)).abs().max() > 1e-3


def test_default_form_is_running_for_both_modes() -> None:
    assert make("mean").eval_form == make("element").eval_form == "running"
    m = make("element", momentum=0.4, bank_size=6).train()
    batches = [tokens(b=4, seed=20 + i) for i in range(2)]
    for x in batches:
        m(x)
    x = tokens(b=3, seed=4)
    ref = ref_statistics(m, batches, momentum=0.4, bank_size=6)
    torch.testing.assert_close(m.eval()(x), ref_independent_eval(m, x, "running", ref), atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize(("mode", "form"), FORMS)
def test_independent_eval_never_depends_on_batch_mates_and_is_deterministic(mode: str, form: str) -> None:
    m, _ = _trained(mode, form, chunk_size=2)
    x = tokens(b=5, seed=6)
    mates = x.clone()
    mates[1:] = tokens(b=5, seed=7)[1:] * 3
    out = m(x)
    torch.testing.assert_close(m(x), out, atol=0, rtol=0)  # deterministic
    torch.testing.assert_close(m(mates)[0], out[0], atol=1e-12, rtol=1e-10)  # batch mates changed
    for i in range(5):  # one-sample batches
        torch.testing.assert_close(m(x[i : i + 1]), out[i : i + 1], atol=1e-12, rtol=1e-10)
    perm = torch.tensor([4, 2, 0, 1, 3])
    torch.testing.assert_close(m(x[perm]), out[perm], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(("mode", "form"), FORMS)
def test_training_with_batches_of_one_evaluates_as_self_attention(mode: str, form: str) -> None:
    # a batch of one trains on SA (IBA == SA), and the sample's own weight 1/B_train = 1 keeps eval on SA too
    m, _ = _trained(mode, form, sizes=(1, 1))
    x = tokens(b=3, seed=8)
    torch.testing.assert_close(m(x), ref_self_attention(m, x), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mode", ["mean", "element"])
def test_batch_eval_uses_the_test_batch_and_collects_nothing(mode: str) -> None:
    m, _ = _trained(mode)
    before = {k: t.clone() for k, t in m.named_buffers()}
    m.eval_mode = "batch"
    x = tokens(b=4, seed=9)
    torch.testing.assert_close(m(x), ref_block(m, x, mode), atol=1e-10, rtol=1e-10)
    for k, t in m.named_buffers():
        torch.testing.assert_close(t, before[k], atol=0, rtol=0, msg=k)


@pytest.mark.parametrize("mode", ["mean", "element"])
def test_statistics_travel_in_the_state_dict(mode: str) -> None:
    m, _ = _trained(mode)
    fresh = make(mode, seed=5, momentum=0.4, bank_size=6)  # other weights, no statistics (empty buffers)
    fresh.load_state_dict(m.state_dict())
    assert fresh.has_statistics
    x = tokens(b=3, seed=11)
    torch.testing.assert_close(fresh.eval()(x), m(x), atol=0, rtol=0)
    fresh.reset_running_stats()
    assert not fresh.has_statistics
    torch.testing.assert_close(fresh(x), ref_self_attention(fresh, x), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mode", ["mean", "element"])
def test_running_eval_is_closer_to_training_than_self_attention_alone(mode: str) -> None:
    """The point of the statistics: on data like the training data, independent eval sees about what training
    saw (its output is near the training output), while SA alone is off by about ½(IBA - SA)."""
    torch.manual_seed(0)
    m = IntraBatchAttention(32, 4, mode=mode, momentum=0.2).to(DT).train()
    data = lambda seed: torch.randn(32, 6, 32, generator=torch.Generator().manual_seed(seed), dtype=DT)  # noqa: E731
    for s in range(10):
        m(data(s))
    x = data(100)
    trained_out = m(x)
    m.eval()
    gap = (m(x) - trained_out).norm()
    m.eval_form = "sa"
    gap_sa = (m(x) - trained_out).norm()
    assert gap < 0.5 * gap_sa, (gap, gap_sa)


def test_bf16_autocast_independent_eval_is_finite() -> None:
    torch.manual_seed(0)
    for mode in ("mean", "element"):
        m = IntraBatchAttention(32, 4, mode=mode, chunk_size=5).train()
        m(torch.randn(6, 16, 32))
        m.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(torch.randn(3, 16, 32) * 30)
        assert out.shape == (3, 16, 32) and torch.isfinite(out).all()


def test_eval_form_errors_name_the_argument_and_the_fix() -> None:
    with pytest.raises(ValueError, match="eval_form must be"):
        IntraBatchAttention(DIM, HEADS, eval_form="mean")
    with pytest.raises(ValueError, match="needs mode='element'"):
        IntraBatchAttention(DIM, HEADS, mode="mean", eval_form="bank")
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="momentum"):
            IntraBatchAttention(DIM, HEADS, momentum=bad)
    with pytest.raises(ValueError, match="bank_size"):
        IntraBatchAttention(DIM, HEADS, bank_size=0)
    m, _ = _trained("mean")
    with pytest.raises(ValueError, match="4 tokens but x has 7"):
        m(tokens(b=2, n=7))
    with pytest.raises(ValueError, match="token count must stay fixed"):
        m.train()(tokens(b=2, n=7))
    m.eval()
    m.mode, m.eval_form = "element", "bank"  # trained as MIBA: running means, but no bank
    with pytest.raises(ValueError, match="bank"):
        m(tokens(b=2))
    from batchmates.models import create_token_mixer

    mixer = create_token_mixer("eiba", DIM, HEADS, eval_form="running", bank_size=3, momentum=0.5)
    assert (mixer.eval_form, mixer.bank_size, mixer.momentum) == ("running", 3, 0.5)
