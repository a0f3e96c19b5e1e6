"""BA²M (arXiv:2103.15099): maths against an independent reference, batch contract, edge cases, DDP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchmates.models.layers import create_attn_layer
from batchmates.nn.ba2m import BA2M, update_running_scores
from batchmates.testing import Shard, ddp_average_grads

torch.set_num_threads(1)
DT = torch.float64


def _make(channels: int = 8, seed: int = 0, **kw) -> BA2M:
    torch.manual_seed(seed)
    m = BA2M(channels, reduction=2, dilation=2, **kw).to(DT)
    # Non-trivial BN affine parameters and running statistics so the reference exercises them.
    with torch.no_grad():
        for bn in (m.channel_bn, m.local_bn):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return m


def _x(n: int = 5, c: int = 8, h: int = 6, w: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g, dtype=DT)


def _bn_ref(t: torch.Tensor, bn: torch.nn.Module, batch_stats: bool) -> torch.Tensor:
    dims = [0] + list(range(2, t.dim()))
    shape = [1, -1] + [1] * (t.dim() - 2)
    if batch_stats:
        mean, var = t.mean(dims, keepdim=True), t.var(dims, unbiased=False, keepdim=True)
    else:
        mean, var = bn.running_mean.view(shape), bn.running_var.view(shape)
    return (t - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def _reference_scores(m: BA2M, x: torch.Tensor, batch_stats: bool) -> torch.Tensor:
    """A_i = mean([sigmoid](max(A_C, A_LS, A_GS))) written out with explicit ops (no SDPA, no nn.BatchNorm).

    Channel branch in the paper's order, BN last: BN(FC_1(ReLU(FC_0(GAP(x))))).
    """
    n, c, h, w = x.shape
    pooled = x.mean(dim=(2, 3))
    hid = torch.relu(pooled @ m.channel_fc1.weight.T + m.channel_fc1.bias)
    a_c = _bn_ref(hid @ m.channel_fc2.weight.T + m.channel_fc2.bias, m.channel_bn, batch_stats).view(n, c, 1, 1)
    d = m.local_dilated.dilation[0]
    hd = m.hidden
    w_loc, w_theta, w_phi, w_g = m.reduce.weight[:, :, 0, 0].split(hd)
    b_loc, b_theta, b_phi, b_g = m.reduce.bias.split(hd)
    t = torch.relu(torch.einsum("kc,nchw->nkhw", w_loc, x) + b_loc.view(1, -1, 1, 1))
    t = torch.relu(F.conv2d(t, m.local_dilated.weight, m.local_dilated.bias, padding=d, dilation=d))
    a_ls = _bn_ref(F.conv2d(t, m.local_out.weight, m.local_out.bias), m.local_bn, batch_stats)
    theta = torch.einsum("kc,nchw->nkhw", w_theta, x) + b_theta.view(1, -1, 1, 1)
    phi = torch.einsum("kc,nchw->nkhw", w_phi, x) + b_phi.view(1, -1, 1, 1)
    g = torch.einsum("kc,nchw->nkhw", w_g, x) + b_g.view(1, -1, 1, 1)
    att = torch.softmax(torch.einsum("nkp,nkq->npq", theta.flatten(2), phi.flatten(2)), dim=-1)  # [N, HW, HW]
    y = torch.einsum("npq,nkq->nkp", att, g.flatten(2)).view(n, -1, h, w)
    a_gs = F.conv2d(y, m.nl_out.weight, m.nl_out.bias)
    big = torch.maximum(torch.maximum(a_c.expand(n, c, h, w), a_ls.expand(n, c, h, w)), a_gs.expand(n, c, h, w))
    if m.score == "bounded":
        big = torch.sigmoid(big)
    return big.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("score", ["bounded", "literal"])
@pytest.mark.parametrize("weight_mode", ["scaled", "raw", "residual"])
def test_matches_reference_in_training(weight_mode: str, score: str) -> None:
    m = _make(weight_mode=weight_mode, score=score).train()
    x = _x()
    out = m(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    a = _reference_scores(m, x, batch_stats=True)
    w = torch.exp(a - a.max()) / torch.exp(a - a.max()).sum()
    s = {"scaled": x.shape[0] * w, "raw": w, "residual": 1 + w}[weight_mode]
    torch.testing.assert_close(m.attention_scores(x), a, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out, x * s.view(-1, 1, 1, 1), atol=1e-10, rtol=1e-10)
    assert s.std() > 1e-4  # the weights really differ across samples


def test_eval_batch_mode_uses_running_stats_and_the_batch() -> None:
    m = _make(eval_mode="batch").eval()
    x = _x()
    a = _reference_scores(m, x, batch_stats=False)
    torch.testing.assert_close(m(x), x * (x.shape[0] * torch.softmax(a, 0)).view(-1, 1, 1, 1))
    # changing the batch mates changes sample 0's output in "batch" eval
    x2 = x.clone()
    x2[1:] = _x(seed=7)[1:]
    assert not torch.allclose(m(x)[0], m(x2)[0])


def test_weights_positive_and_raw_sum_to_one() -> None:
    m = _make(weight_mode="raw").train()
    x = _x(n=7)
    w = m.sample_weights(x)
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=w.dtype))
    s = m.sample_scales(x)
    torch.testing.assert_close(s, w)
    torch.testing.assert_close(s.sum(), torch.tensor(1.0, dtype=s.dtype))
    scaled = _make(weight_mode="scaled").train().sample_scales(x)
    torch.testing.assert_close(scaled.mean(), torch.tensor(1.0, dtype=s.dtype))


@pytest.mark.parametrize("hw", [(6, 5), (1, 1)])
def test_batch_of_one_in_training(hw: tuple[int, int]) -> None:
    m = _make(weight_mode="scaled").train()
    x = _x(n=1, h=hw[0], w=hw[1])
    before = m.channel_bn.running_mean.clone()
    out = m(x)  # must not raise "Expected more than 1 value per channel"
    torch.testing.assert_close(out, x, atol=0, rtol=0)  # scaled mode, N=1: s = 1 * softmax([a]) = 1
    assert torch.equal(m.channel_bn.running_mean, before)  # running stats untouched by a 1-sample batch
    out.sum().backward()
    raw = _make(weight_mode="raw").train()
    torch.testing.assert_close(raw(x), x)
    res = _make(weight_mode="residual").train()
    torch.testing.assert_close(res(x), 2 * x)


def test_permutation_equivariance_in_training() -> None:
    m = _make().train()
    x = _x(n=6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(m(x[perm]), m(x)[perm], atol=1e-12, rtol=1e-10)


def test_independent_eval_is_batch_independent_and_equals_batch_of_one() -> None:
    m = _make().eval()
    x = _x(n=4)
    x2 = x.clone()
    x2[1:] = _x(n=4, seed=9)[1:]
    out, out2 = m(x), m(x2)
    torch.testing.assert_close(out[0], out2[0], atol=0, rtol=0)
    for i in range(4):
        torch.testing.assert_close(out[i : i + 1], m(x[i : i + 1]), atol=0, rtol=0)
    torch.testing.assert_close(out, x)  # s = 1


def _cross_grad(m: BA2M, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    m(x)[0].sum().backward()
    return x.grad[1:]


def test_gradient_flows_across_samples_only_when_the_batch_is_used() -> None:
    m = _make().train()
    assert _cross_grad(m, _x(n=4)).abs().max() > 1e-6
    m.eval()
    assert torch.count_nonzero(_cross_grad(m, _x(n=4))) == 0
    m.eval_mode = "batch"
    assert _cross_grad(m, _x(n=4)).abs().max() > 1e-6


def test_gradcheck_raw_weighting() -> None:
    m = _make(channels=4, weight_mode="raw")
    m.train()
    m.channel_bn.eval()  # deterministic BN for gradcheck; batch stats are covered by the reference test
    m.local_bn.eval()
    x = _x(n=3, c=4, h=3, w=3).requires_grad_(True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5)


def test_registered_as_attention_layer() -> None:
    layer = create_attn_layer("ba2m", 32, weight_mode="raw")
    assert isinstance(layer, BA2M) and layer.channels == 32 and layer.weight_mode == "raw"
    assert create_attn_layer("ba2m", 16)(torch.randn(2, 16, 4, 4)).shape == (2, 16, 4, 4)


def test_bf16_autocast_is_finite() -> None:
    torch.manual_seed(0)
    m = BA2M(16).train()
    x = torch.randn(4, 16, 8, 8) * 50
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        w = m.sample_weights(x)
    assert w.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_invalid_inputs_raise_clear_errors() -> None:
    m = BA2M(8)
    with pytest.raises(ValueError, match=r"4-D"):
        m(torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match=r"channels=8"):
        m(torch.randn(2, 6, 4, 4))
    with pytest.raises(TypeError, match=r"floating"):
        m(torch.ones(2, 8, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"not finite"):
        m(torch.full((2, 8, 4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"eval_mode"):
        BA2M(8, eval_mode="test")
    with pytest.raises(ValueError, match=r"weight_mode"):
        BA2M(8, weight_mode="softmax")
    with pytest.raises(ValueError, match=r"score must be 'bounded'"):
        BA2M(8, score="sigmoid")
    with pytest.raises(ValueError, match=r"reduction"):
        BA2M(8, reduction=0)
    with pytest.raises(ValueError, match=r"eval_form must be 'running'.*'expected'"):
        BA2M(8, eval_form="mean")
    with pytest.raises(ValueError, match=r"score_momentum"):
        BA2M(8, score_momentum=0.0)


# --- torch.distributed: 2 gloo ranks on uneven shares of the batch == one process with all of it -------------


def _ba2m_shard(shard: Shard, state: dict, x: torch.Tensor, t: torch.Tensor, modes: list[str]) -> dict:
    # BatchNorm inside the branches is put in eval (running statistics) for this check: plain BatchNorm is
    # per-rank by design (use SyncBatchNorm, CUDA-only in PyTorch, for global statistics); what is checked
    # here is the batch weighting, which must be global.
    rows = shard.rows
    results = {}
    for mode in modes:
        m = BA2M(8, reduction=2, dilation=2, weight_mode=mode).to(DT)
        m.load_state_dict(state)
        m.train()
        m.channel_bn.eval()
        m.local_bn.eval()
        xl = x[rows].clone().requires_grad_(True)
        out = m(xl)
        # this rank's share of the global objective sum(out * t) / B, as DDP sees it (x W: DDP averages over ranks)
        ((out * t[rows]).sum() * shard.world / shard.n).backward()
        ddp_average_grads(m)
        results[f"out {mode}"] = out.detach()
        # the per-rank objective is W x this rank's share: its input gradient is W x the global objective's
        results[f"input grad {mode}"] = xl.grad / shard.world
        results[f"grads {mode}"] = {k: p.grad for k, p in m.named_parameters()}
        results[f"running_log_z {mode}"] = m.running_log_z.clone()  # the global batch's partition on every rank
    return results


def test_distributed_equivalence_of_batch_weighting(ddp_contract) -> None:
    modes = ["scaled", "raw", "residual"]
    m0 = _make()
    state = m0.state_dict()
    x, t = _x(n=6), _x(n=6, seed=3)
    per_sample = [f"{what} {mode}" for mode in modes for what in ("out", "input grad")]
    run = ddp_contract(_ba2m_shard, 6, state, x, t, modes, concat=per_sample, rtol=1e-5, atol=1e-5)
    assert run.splits == (4, 2)  # uneven: a per-rank softmax / mean would fail


@pytest.mark.cuda
def test_cuda_matches_cpu_and_bf16_is_finite() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    m = _make().train()
    x = _x(n=8, h=16, w=16)
    ref = m(x)
    mc = _make().train().cuda()
    torch.testing.assert_close(mc(x.cuda()).cpu(), ref, atol=1e-8, rtol=1e-8)
    m32 = BA2M(64).cuda().train()
    x32 = torch.randn(16, 64, 32, 32, device="cuda") * 20
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m32(x32)
        w = m32.sample_weights(x32)
    assert w.dtype == torch.float32 and torch.isfinite(out).all() and torch.isfinite(w).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m32.parameters() if p.grad is not None)


# --- independent eval = the expected training factor; stable default; timm keywords ------------------------


@pytest.mark.parametrize("weight_mode", ["scaled", "raw", "residual"])
def test_independent_eval_multiplies_by_the_expected_training_factor(weight_mode: str) -> None:
    m = _make(weight_mode=weight_mode, eval_form="expected")
    x = _x(n=4)
    # never trained: the batch-size-1 factor
    assert int(m.n_train) == 0
    torch.testing.assert_close(m.eval()(x), x * {"scaled": 1.0, "raw": 1.0, "residual": 2.0}[weight_mode])
    # one training forward on N = 5: the mean factor training applied is what independent eval applies
    xt = _x(n=5, seed=4)
    s_train = m.train().sample_scales(xt)
    assert int(m.n_train) == 5
    expected = {"scaled": 1.0, "raw": 1 / 5, "residual": 1 + 1 / 5}[weight_mode]
    torch.testing.assert_close(s_train.mean(), torch.tensor(expected, dtype=s_train.dtype))
    assert m.expected_factor() == pytest.approx(expected)
    m.eval()
    torch.testing.assert_close(m(x), x * expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(m.sample_scales(x), torch.full((4,), expected, dtype=DT))
    # a checkpoint carries N_train
    fresh = BA2M(8, reduction=2, dilation=2, weight_mode=weight_mode, eval_form="expected").to(DT)
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh.eval()(x), m(x), atol=0, rtol=0)


# --- independent eval, eval_form="running": each sample against the training batches' partition function ----


def _log_mean_exp(a: torch.Tensor) -> float:
    return float(torch.log(torch.exp(a.detach()).mean()))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_partition_follows_the_training_batches(momentum: float | None) -> None:
    m = _make(score_momentum=momentum).train()
    want = None
    for k, seed in enumerate((4, 5, 6)):
        xt = _x(n=5 + k, seed=seed)
        z = _log_mean_exp(_reference_scores(m, xt, batch_stats=True))  # before the forward moves BN's statistics
        m(xt)
        # the first batch sets it; then BatchNorm's rule (momentum) or the cumulative mean (None)
        want = z if want is None else (want + (z - want) * (momentum if momentum is not None else 1 / (k + 1)))
        assert int(m.z_tracked) == k + 1
        assert float(m.running_log_z) == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("weight_mode", ["scaled", "raw", "residual"])
def test_running_eval_weights_each_sample_by_its_own_score(weight_mode: str) -> None:
    m = _make(weight_mode=weight_mode)
    assert m.eval_form == "running"  # the default
    m.train()(_x(n=6, seed=4))
    m.eval()
    x = _x(n=4)
    rel = torch.exp(_reference_scores(m, x, batch_stats=False) - m.running_log_z)
    want = {"scaled": rel, "raw": rel / 6, "residual": 1 + rel / 6}[weight_mode]
    torch.testing.assert_close(m.sample_scales(x), want, atol=1e-12, rtol=1e-10)
    out = m(x)
    torch.testing.assert_close(out, x * want.view(-1, 1, 1, 1), atol=1e-12, rtol=1e-10)
    assert float(want.max() - want.min()) > 1e-4  # a per-sample factor, unlike the expected form's constant
    # no sample depends on its batch mates: changing them, or predicting one at a time, changes nothing
    x2 = x.clone()
    x2[1:] = _x(n=4, seed=9)[1:]
    torch.testing.assert_close(m(x2)[0], out[0], atol=0, rtol=0)
    for i in range(4):
        torch.testing.assert_close(m(x[i : i + 1]), out[i : i + 1], atol=1e-14, rtol=1e-12)


def test_running_eval_equals_batch_eval_when_the_partition_is_the_batchs_own() -> None:
    # The two eval forms agree exactly when the running partition equals the test batch's: what ties "running"
    # to the batch weighting it replaces.
    m = _make().eval()
    x = _x(n=5)
    with torch.no_grad():
        m.running_log_z.fill_(_log_mean_exp(m.attention_scores(x)))
        m.z_tracked.fill_(1)
        m.n_train.fill_(5)
    independent = m(x)
    m.eval_mode = "batch"
    torch.testing.assert_close(independent, m(x), atol=1e-12, rtol=1e-10)


def test_running_eval_never_exceeds_the_largest_training_factor() -> None:
    m = _make(score="literal")
    m.train()(_x(n=4, seed=4))
    with torch.no_grad():
        m.running_log_z.fill_(-50.0)  # a test sample far above every training batch
    s = m.eval().sample_scales(_x(n=3))
    torch.testing.assert_close(s, torch.full_like(s, 4.0))  # N_train: what a one-hot training batch gives


def test_checkpoint_without_the_partition_evaluates_as_the_expected_form() -> None:
    m = _make(weight_mode="raw")
    m.train()(_x(n=6, seed=4))
    old = {k: v for k, v in m.state_dict().items() if k not in ("running_log_z", "z_tracked")}  # an older file
    fresh = BA2M(8, reduction=2, dilation=2, weight_mode="raw").to(DT)
    fresh.load_state_dict(old)  # strict: the missing buffers load as "nothing tracked"
    assert int(fresh.z_tracked) == 0 and fresh.eval_form == "running"
    x = _x(n=4)
    torch.testing.assert_close(fresh.eval()(x), x / 6, atol=1e-12, rtol=1e-12)  # 1/N_train, as before
    fresh.load_state_dict(m.state_dict())  # a new file carries it
    torch.testing.assert_close(fresh(x), m.eval()(x), atol=0, rtol=0)


def test_update_running_scores_recomputes_only_the_partition() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                BA2M(8, reduction=2, dilation=2)).to(DT)
    model.eval()
    ba2m = model[2]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(6, 3, 6, 5, dtype=DT), torch.zeros(6)) for _ in range(3)]
    assert update_running_scores(model, batches) == 3
    # the cumulative mean of each batch's log-mean-exp, scored in training mode (batch statistics)
    want = []
    with torch.no_grad():
        for x, _ in batches:
            h = F.batch_norm(model[0](x), None, None, model[1].weight, model[1].bias, True)
            want.append(_log_mean_exp(_reference_scores(ba2m, h, batch_stats=True)))
    assert float(ba2m.running_log_z) == pytest.approx(sum(want) / 3, rel=1e-10)
    assert int(ba2m.z_tracked) == 3 and ba2m.score_momentum == 0.1
    after = model.state_dict()
    for k, v in before.items():  # BatchNorm statistics, n_train: as they were
        if k.rsplit(".", 1)[-1] not in ("running_log_z", "z_tracked"):
            torch.testing.assert_close(after[k], v, atol=0, rtol=0)
    assert not any(mod.training for mod in model.modules())
    with pytest.raises(ValueError, match="no BA2M layer"):
        update_running_scores(torch.nn.Linear(2, 2), batches)
    with pytest.raises(ValueError, match="yielded nothing"):
        update_running_scores(model, [])
    assert int(ba2m.z_tracked) == 3  # a failed call keeps the partition it had


def test_bounded_scores_lie_in_0_1_and_weights_within_a_factor_e() -> None:
    m = _make()
    x = _x(n=16) * 30  # large activations: the literal score would be nearly one-hot
    with torch.no_grad():
        a = m.train().attention_scores(x)
        assert ((a > 0) & (a < 1)).all()
        s = m.sample_scales(x)
        assert float(s.max() / s.min()) <= torch.e + 1e-9
        lit = _make(score="literal").train().sample_scales(x)
    assert float(lit.max() / lit.min()) > float(s.max() / s.min())


def test_rejected_input_leaves_batchnorm_statistics_untouched() -> None:
    m = _make().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bad = _x(n=4)
    bad[2, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"not finite"):
        m(bad)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.isfinite(m(_x(n=4))).all()  # later clean calls work


def test_accepts_timm_constructor_keywords() -> None:
    m = BA2M(8, reduction=2, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m(_x(n=3)).dtype == torch.float64


def _first_step_grad_norm(backbone: str, size: int, attn: str, seed: int, **kw) -> float:
    from batchmates.models import create_backbone

    torch.manual_seed(seed)
    net = create_backbone(backbone, in_channels=1, image_size=size, attn_layer=attn, attn_kwargs=kw).train()
    head = torch.nn.Linear(net.feature_dim, 10)
    g = torch.Generator().manual_seed(100 + seed)
    x, y = torch.randn(64, 1, size, size, generator=g), torch.randint(0, 10, (64,), generator=g)
    F.cross_entropy(head(net(x)), y).backward()
    grads = [p.grad for p in [*net.parameters(), *head.parameters()] if p.grad is not None]
    return float(torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads)))


@pytest.mark.parametrize("backbone,size", [("cnn", 8), ("resnet-small", 28)])
def test_default_first_step_gradient_norm_is_within_3x_of_no_attention(backbone: str, size: int) -> None:
    for seed in range(2):
        base = _first_step_grad_norm(backbone, size, "none", seed)
        ratio = _first_step_grad_norm(backbone, size, "ba2m", seed) / base
        assert 1 / 3 <= ratio <= 3, f"{backbone} seed {seed}: BA2M's first gradient norm is {ratio:.2f}x the baseline's"
        # the literal (unbounded) score is what the default guards against: one-hot weights from step 1
        literal = _first_step_grad_norm(backbone, size, "ba2m", seed, score="literal") / base
        assert literal > 10 * ratio, f"{backbone} seed {seed}: literal score ratio {literal:.2f}"
