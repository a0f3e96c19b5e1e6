"""SupCon / SimCLR (NT-Xent): reference parity, hand-computed values, properties, chunking, precision, DDP."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from batchmates.losses import NTXentLoss, SupConLoss, supcon_loss
from batchmates.losses import supcon as supcon_module
from batchmates.testing import Shard, ddp_average_grads
from batchmates.testing.oracles import official_supcon

torch.set_num_threads(1)


def _feats(n: int, v: int, d: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, d, generator=g, dtype=dtype)


def _hand_supcon(z, labels, tau, tau_base, mode="all", mask=None):
    """Explicit loops over anchors/positives of eq. 2 (arXiv:2004.11362) on already-normalised z [N, V, D]."""
    n, v, _ = z.shape
    views = [(i, a) for a in range(v) for i in range(n)]  # view-major order
    anchors = [(i, 0) for i in range(n)] if mode == "one" else views
    losses = []
    for i, a in anchors:
        denom = 0.0
        for j, b in views:
            if (j, b) != (i, a):
                denom += math.exp(float(z[i, a] @ z[j, b]) / tau)
        total, count = 0.0, 0.0
        for j, b in views:
            if (j, b) == (i, a):
                continue
            w = float(mask[i, j]) if mask is not None else float(labels[i] == labels[j])
            if w:
                total += w * (float(z[i, a] @ z[j, b]) / tau - math.log(denom))
                count += w
        losses.append(-(tau / tau_base) * total / count if count > 0 else 0.0)
    return losses


# ---------------------------------------------------------------- reference parity


@pytest.mark.parametrize("tau,tau_base", [(0.07, 0.07), (0.1, 0.07), (0.5, 1.0)])
def test_matches_pytorch_metric_learning(tau, tau_base):
    from pytorch_metric_learning.losses import SupConLoss as PML

    x = _feats(16, 2, 8, seed=1)  # V=2: every anchor has its other view as a positive
    labels = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(2))
    ours = supcon_loss(x, labels, temperature=tau, base_temperature=tau_base)
    emb = x.transpose(0, 1).reshape(32, 8)
    ref = PML(temperature=tau)(emb, labels.repeat(2)) * (tau / tau_base)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_simclr_matches_lightly_ntxent():
    from lightly.loss import NTXentLoss as LightlyNTXent

    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    z1 = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    for tau in (0.5, 0.1):
        ours = NTXentLoss(temperature=tau)(z0, z1)
        ref = LightlyNTXent(temperature=tau)(z0, z1)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
        g_ours = torch.autograd.grad(ours, (z0, z1))
        g_ref = torch.autograd.grad(ref, (z0, z1))
        for a, b in zip(g_ours, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
        same = supcon_loss(torch.stack([z0, z1], 1), temperature=tau, base_temperature=tau)
        torch.testing.assert_close(same, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("kind", ["labels", "mask", "simclr"])
def test_matches_official_transcription_value_and_grad(mode, kind):
    x = _feats(12, 3, 5, seed=4).requires_grad_(True)
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 3, (12,), generator=g)
    kw = {}
    if kind == "labels":
        kw["labels"] = labels
    elif kind == "mask":
        kw["mask"] = (torch.rand(12, 12, generator=g) < 0.3).to(torch.float64)  # asymmetric 0/1
    ours = supcon_loss(x, temperature=0.1, base_temperature=0.07, contrast_mode=mode, **kw)
    ref = official_supcon(F.normalize(x, dim=-1), temperature=0.1, base_temperature=0.07, contrast_mode=mode, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    (g1,) = torch.autograd.grad(ours, x)
    (g2,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------- hand-computed cases


@pytest.mark.parametrize("mode", ["all", "one"])
def test_tiny_case_against_explicit_loops(mode):
    z = F.normalize(_feats(4, 2, 3, seed=6), dim=-1)
    labels = torch.tensor([0, 1, 0, 2])
    expected = _hand_supcon(z, labels.tolist(), 0.2, 0.1, mode)
    per = supcon_loss(z, labels, temperature=0.2, base_temperature=0.1, contrast_mode=mode, reduction="none")
    torch.testing.assert_close(per.reshape(-1), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    mean = supcon_loss(z, labels, temperature=0.2, base_temperature=0.1, contrast_mode=mode)
    assert mean.item() == pytest.approx(sum(expected) / len(expected), rel=1e-12)


def test_two_by_two_closed_form():
    # Two samples x two views of 2-D unit vectors at known angles, SimCLR mode: similarities are cos(angle gaps).
    ang = torch.tensor([[0.0, 0.3], [1.5, 2.0]], dtype=torch.float64)
    z = torch.stack([ang.cos(), ang.sin()], dim=-1)  # [2, 2, 2]
    tau = 0.5
    # anchor (sample 0, view 0): positive (0, view 1), negatives (1, 0), (1, 1); cos(a-b) similarities
    s_pos = math.cos(0.3) / tau
    s_n1, s_n2 = math.cos(1.5) / tau, math.cos(2.0) / tau
    first = -(s_pos - math.log(math.exp(s_pos) + math.exp(s_n1) + math.exp(s_n2)))
    per = supcon_loss(z, temperature=tau, base_temperature=tau, reduction="none")
    assert per[0, 0].item() == pytest.approx(first, rel=1e-12)


def test_weighted_mask_against_explicit_loops():
    z = F.normalize(_feats(5, 2, 3, seed=7), dim=-1)
    mask = torch.rand(5, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    mask[2] = 0.0  # anchor sample 2 has no positive at all
    expected = _hand_supcon(z, None, 0.3, 0.3, "all", mask=mask)
    per = supcon_loss(z, mask=mask, temperature=0.3, base_temperature=0.3, reduction="none")
    torch.testing.assert_close(per.reshape(-1), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- properties


def test_permutation_invariance():
    x = _feats(9, 2, 4, seed=9)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 3])
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(10))
    for kw in ({"labels": labels}, {}):
        base = supcon_loss(x, **kw)
        kw_p = {"labels": labels[perm]} if kw else {}
        torch.testing.assert_close(supcon_loss(x[perm], **kw_p), base, rtol=1e-12, atol=1e-12)
    mask = (labels[:, None] == labels[None, :]).double()
    permuted_mask = mask[perm][:, perm]
    torch.testing.assert_close(supcon_loss(x[perm], mask=permuted_mask), supcon_loss(x, labels), rtol=1e-12, atol=0)
    # the per-anchor output permutes with the samples
    per = supcon_loss(x, labels, reduction="none")
    torch.testing.assert_close(supcon_loss(x[perm], labels[perm], reduction="none"), per[:, perm])


def test_labels_equal_equivalent_mask():
    x = _feats(8, 2, 4, seed=11)
    labels = torch.tensor([3, 3, 1, 7, 1, 3, 7, 0])
    mask = labels[:, None] == labels[None, :]
    torch.testing.assert_close(supcon_loss(x, mask=mask), supcon_loss(x, labels), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(supcon_loss(x, mask=mask.long()), supcon_loss(x, labels), rtol=1e-12, atol=1e-12)


def test_contrast_mode_one_is_view0_anchors_of_all():
    x = _feats(7, 3, 4, seed=12)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0])
    per_all = supcon_loss(x, labels, reduction="none")
    per_one = supcon_loss(x, labels, contrast_mode="one", reduction="none")
    assert per_all.shape == (3, 7) and per_one.shape == (1, 7)
    torch.testing.assert_close(per_one[0], per_all[0], rtol=1e-12, atol=1e-12)
    one = supcon_loss(x, labels, contrast_mode="one")
    assert one.item() == pytest.approx(per_all[0].mean().item(), rel=1e-12)
    assert abs(one.item() - supcon_loss(x, labels).item()) > 1e-6


def test_anchor_without_positive_counts_as_zero_and_mean_positive():
    x = _feats(5, 1, 4, seed=13)  # one view: label 9 has a single sample -> no positive
    labels = torch.tensor([0, 0, 9, 1, 1])
    per = supcon_loss(x, labels, reduction="none")
    assert per[0, 2].item() == 0.0
    assert (per[0, [0, 1, 3, 4]] > 0).all()
    expected = _hand_supcon(F.normalize(x, dim=-1), labels.tolist(), 0.07, 0.07)
    assert supcon_loss(x, labels).item() == pytest.approx(sum(expected) / 5, rel=1e-12)
    assert supcon_loss(x, labels, reduction="mean_positive").item() == pytest.approx(sum(expected) / 4, rel=1e-12)
    # all anchors without positive: a defined 0 for both reductions, gradient finite (and zero)
    xs = x.clone().requires_grad_(True)
    for red in ("mean", "mean_positive"):
        loss = supcon_loss(xs, torch.arange(5), reduction=red)
        (grad,) = torch.autograd.grad(loss, xs)
        assert loss.item() == 0.0 and torch.isfinite(grad).all() and grad.abs().max() == 0


def test_reduction_none_mean_equals_mean():
    x = _feats(6, 2, 4, seed=14)
    labels = torch.tensor([0, 1, 0, 2, 1, 5])
    for mode in ("all", "one"):
        per = supcon_loss(x, labels, contrast_mode=mode, reduction="none")
        torch.testing.assert_close(per.mean(), supcon_loss(x, labels, contrast_mode=mode), rtol=1e-12, atol=0)
    per = NTXentLoss(reduction="none")(x[:, 0], x[:, 1])
    assert per.shape == (2, 6)
    torch.testing.assert_close(per.mean(), NTXentLoss()(x[:, 0], x[:, 1]))


def test_normalize_option():
    x = _feats(6, 2, 4, seed=15)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    z = F.normalize(x, dim=-1)
    torch.testing.assert_close(supcon_loss(x, labels), supcon_loss(z, labels, normalize=False), rtol=1e-12, atol=0)
    scaled = supcon_loss(3 * z, labels, normalize=False)  # not normalised: logits scale with the norm
    assert abs(scaled.item() - supcon_loss(z, labels, normalize=False).item()) > 1e-3


def test_module_signature_and_defaults():
    loss = SupConLoss()
    assert (loss.temperature, loss.base_temperature, loss.contrast_mode) == (0.07, 0.07, "all")
    x = _feats(6, 2, 4, seed=16)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    torch.testing.assert_close(SupConLoss(0.1, 0.07, "one")(x, labels), supcon_loss(x, labels, temperature=0.1,
                               contrast_mode="one"))
    assert NTXentLoss().temperature == 0.5


# ---------------------------------------------------------------- edge cases and validation


def test_single_sample_two_views_simclr():
    x = _feats(1, 2, 4, seed=17).requires_grad_(True)
    loss = supcon_loss(x)
    (grad,) = torch.autograd.grad(loss, x)
    # the only other view is the positive and there is no negative: probability 1, loss exactly 0
    assert loss.item() == pytest.approx(0.0, abs=1e-12) and torch.isfinite(grad).all()
    assert NTXentLoss()(x[:, 0], x[:, 1]).item() == pytest.approx(0.0, abs=1e-12)


def test_single_sample_single_view_raises():
    with pytest.raises(ValueError, match="contrast"):
        supcon_loss(_feats(1, 1, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="at least 2 views"):
        supcon_loss(_feats(4, 1, 4))


def test_labels_and_mask_together_raise():
    x = _feats(4, 2, 3)
    with pytest.raises(ValueError, match="either labels or mask"):
        supcon_loss(x, torch.arange(4), torch.eye(4))


@pytest.mark.parametrize(
    "features,labels,mask,exc,match",
    [
        (torch.randn(4, 3), None, None, ValueError, r"\[N, V, D\]"),
        (torch.randn(4, 2, 3, 1), None, None, ValueError, r"\[N, V, D\]"),
        (torch.randn(4, 2, 3), torch.arange(5), None, ValueError, "labels must have shape"),
        (torch.randn(4, 2, 3), torch.zeros(4, 1, dtype=torch.long), None, ValueError, "labels must have shape"),
        (torch.randn(4, 2, 3), torch.zeros(4), None, TypeError, "integer"),
        (torch.randn(4, 2, 3), None, torch.eye(3), ValueError, "mask has shape"),
        (torch.randn(4, 2, 3), None, torch.ones(4, 3), ValueError, "square"),
        (torch.randn(4, 2, 3), None, -torch.eye(4), ValueError, "non-negative"),
        (torch.randint(0, 3, (4, 2, 3)), None, None, TypeError, "floating-point"),
        (torch.randn(0, 2, 3), None, None, ValueError, "non-empty"),
    ],
)
def test_bad_inputs_raise(features, labels, mask, exc, match):
    with pytest.raises(exc, match=match):
        supcon_loss(features, labels, mask)


def test_bad_options_raise():
    x = torch.randn(4, 2, 3)
    with pytest.raises(ValueError, match="temperature"):
        supcon_loss(x, temperature=0.0)
    with pytest.raises(ValueError, match="contrast_mode"):
        supcon_loss(x, contrast_mode="two")
    with pytest.raises(ValueError, match="reduction"):
        SupConLoss(reduction="sum")
    with pytest.raises(ValueError, match="chunk_size"):
        supcon_loss(x, chunk_size=0)
    with pytest.raises(ValueError, match="z0 and z1"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(bad):
    x = torch.randn(4, 2, 3)
    x[1, 1, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        supcon_loss(x, torch.arange(4))


# ---------------------------------------------------------------- chunked path


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 100])
@pytest.mark.parametrize("mode,kind", [("all", "labels"), ("all", "simclr"), ("one", "labels"), ("all", "mask")])
def test_chunked_equals_dense(chunk, mode, kind):
    x = _feats(11, 3, 5, seed=18).requires_grad_(True)  # 33 contrast rows: most chunks do not divide it
    g = torch.Generator().manual_seed(19)
    kw = {"labels": torch.randint(0, 3, (11,), generator=g)} if kind == "labels" else {}
    if kind == "mask":
        kw["mask"] = (torch.rand(11, 11, generator=g) < 0.4).double()
    dense = supcon_loss(x, contrast_mode=mode, chunk_threshold=None, **kw)
    chunked = supcon_loss(x, contrast_mode=mode, chunk_size=chunk, **kw)
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)
    (gd,) = torch.autograd.grad(dense, x)
    (gc,) = torch.autograd.grad(chunked, x)
    torch.testing.assert_close(gc, gd, rtol=1e-10, atol=1e-12)


def test_chunk_threshold_selects_path(monkeypatch):
    seen = []
    orig = supcon_module._ExclusiveLogSumExp.apply

    def spy(*args):
        seen.append(args[-1])
        return orig(*args)

    monkeypatch.setattr(supcon_module._ExclusiveLogSumExp, "apply", spy)
    x = _feats(10, 2, 4, seed=20)
    dense = supcon_loss(x, chunk_threshold=20)  # 20 contrast rows: not above the threshold
    auto = supcon_loss(x, chunk_threshold=19)
    assert seen == [None, supcon_module._DEFAULT_BLOCK]
    torch.testing.assert_close(auto, dense, rtol=1e-12, atol=1e-12)


def test_chunked_gradient_gradcheck():
    x = _feats(5, 2, 3, seed=21).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 1, 1])
    assert torch.autograd.gradcheck(lambda t: supcon_loss(t, labels, temperature=0.3, chunk_size=3), (x,))
    assert torch.autograd.gradcheck(lambda t: supcon_loss(t, labels, temperature=0.3, chunk_threshold=None), (x,))


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize("chunk", [None, 8])
def test_autocast_bf16_and_half_inputs_are_finite(chunk):
    g = torch.Generator().manual_seed(22)
    x32 = torch.randn(24, 2, 16, generator=g)
    labels = torch.randint(0, 4, (24,), generator=g)
    ref = supcon_loss(x32, labels, temperature=0.05, chunk_size=chunk)
    lin = torch.nn.Linear(16, 16)
    torch.nn.init.eye_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = lin(x32)  # bf16 under autocast
        assert feats.dtype == torch.bfloat16
        loss = supcon_loss(feats, labels, temperature=0.05, chunk_size=chunk)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(lin.weight.grad).all()
    assert loss.item() == pytest.approx(ref.item(), rel=5e-2)
    for dtype in (torch.float16, torch.bfloat16):
        xh = (x32 * 50).to(dtype).requires_grad_(True)  # large unnormalised half input
        out = supcon_loss(xh, labels, temperature=0.05, chunk_size=chunk)
        (gh,) = torch.autograd.grad(out, xh)
        assert torch.isfinite(out) and torch.isfinite(gh.float()).all() and gh.dtype == dtype
        assert out.item() == pytest.approx(ref.item(), rel=5e-2)


# ---------------------------------------------------------------- distributed equivalence


def _ddp_model():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 8 * 2).double()


def _ddp_data():
    g = torch.Generator().manual_seed(23)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (10,), generator=g)
    mask = (torch.rand(10, 10, generator=g) < 0.4).double()
    return x, labels, mask


CASES = {
    "labels": {"use_labels": True},
    "simclr": {},
    "chunked": {"use_labels": True, "chunk_size": 3},
    "simclr_chunked": {"chunk_size": 4},
    "one": {"use_labels": True, "contrast_mode": "one"},
    "mask": {"use_mask": True},
    "mean_positive": {"use_labels": True, "reduction": "mean_positive"},
}


def _run_case(x, labels, mask, cfg):
    model = _ddp_model()
    xs = x.clone().requires_grad_(True)
    feats = model(xs).view(x.shape[0], 2, 8)
    kw = {k: v for k, v in cfg.items() if not k.startswith("use_")}
    loss = supcon_loss(
        feats,
        labels if cfg.get("use_labels") else None,
        mask if cfg.get("use_mask") else None,
        temperature=0.2,
        base_temperature=0.1,
        **kw,
    )
    loss.backward()
    return model, xs, loss


def _supcon_shard(shard: Shard) -> dict:
    x, labels, mask = _ddp_data()
    rows = shard.rows
    out = {}
    for name, cfg in CASES.items():
        model, xs, loss = _run_case(x[rows], labels[rows], mask, cfg)
        ddp_average_grads(model)
        out[name] = (loss.detach(), [p.grad for p in model.parameters()])
        # every rank returns the global loss, so the raw input gradient is W x the global one (DDP then averages)
        out[f"{name} input grad"] = xs.grad / shard.world
    # a rank left with no sample (e.g. curation dropped all its pairs) still joins the global loss exactly
    rows_e = slice(0, x.shape[0]) if shard.rank == 0 else slice(0, 0)
    model, xs, loss = _run_case(x[rows_e], labels[rows_e], None, {"use_labels": True})
    ddp_average_grads(model)
    out["empty_rank"] = (loss.detach(), [p.grad for p in model.parameters()])
    # per-anchor values of this rank's anchors ([V, N_local], transposed so ranks concatenate along dim 0)
    feats = _ddp_model()(x[rows]).view(-1, 2, 8)
    out["none"] = supcon_loss(feats, labels[rows], temperature=0.2, base_temperature=0.1, reduction="none").detach().T
    # explicit opt-out: local-batch loss
    model, _, loss = _run_case(x[rows], labels[rows], None, {"use_labels": True, "gather": False})
    out["local"] = loss.detach()
    # a local [N_local, N_local] mask is refused under DDP: the global mask is required
    try:
        supcon_loss(feats.detach(), mask=torch.eye(feats.shape[0], dtype=torch.float64))
        out["local_mask_error"] = "no error"
    except ValueError as e:
        out["local_mask_error"] = str(e)
    return out


def test_distributed_equivalence(ddp_contract):
    # rank 0 holds 6 samples, rank 1 holds 4 (uneven on purpose)
    grads_in = tuple(f"{name} input grad" for name in CASES)
    run = ddp_contract(_supcon_shard, 10, same=(*CASES, "empty_rank"), concat=(*grads_in, "none"))
    assert run.splits == (6, 4)
    x, labels, _ = _ddp_data()
    _, _, local0 = _run_case(x[:6], labels[:6], None, {"use_labels": True})
    torch.testing.assert_close(run.ranks[0]["local"], local0.detach())
    assert abs(run.ranks[0]["local"].item() - run.full["labels"][0].item()) > 1e-3  # gathering matters
    assert all("[N_global, N_global]" in res["local_mask_error"] for res in run.ranks)


# ---------------------------------------------------------------- benchmark smoke


def test_bench_quick_runs():
    from batchmates.bench.supcon import run

    rows = run("cpu", quick=True)
    impls = {r.impl for r in rows}
    assert {"ours-dense", "official", "pml"} <= impls
    assert all(r.benchmark == "supcon" for r in rows)
    assert all(math.isfinite(r.time_ms) for r in rows if not r.extra)


# ---------------------------------------------------------------- CUDA (run on a GPU machine)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_chunked_equals_dense_and_autocast_finite():
    g = torch.Generator().manual_seed(24)
    x = torch.randn(300, 2, 32, generator=g).cuda().requires_grad_(True)
    labels = torch.randint(0, 7, (300,), generator=g).cuda()
    dense = supcon_loss(x, labels, chunk_threshold=None)
    chunked = supcon_loss(x, labels, chunk_size=77)
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(chunked, x)[0], torch.autograd.grad(dense, x)[0], rtol=1e-4,
                               atol=1e-6)
    for dtype in (torch.bfloat16, torch.float16):
        lin = torch.nn.Linear(32, 32).cuda()
        with torch.autocast("cuda", dtype=dtype):
            loss = supcon_loss(lin(x), labels, temperature=0.05)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lin.weight.grad).all()
