"""The batch-level policy ``curate=frd-batch`` in simclr / supcon / barlow: online scoring adds no backbone
forward; the score is the Gaussian FRD of the training forward's backbone + projector features; in a Lightning
run a skipped batch leaves weights, optimiser state and BatchNorm statistics unchanged while the schedule
advances; re-augmentation draws new views and undoes the rejected forward; a killed-and-resumed run decides
exactly as an uninterrupted one (the running-quantile state is in the checkpoint); the retired name
``frd-gaussian`` and mismatched policies are clear errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_methods_curation import DIGITS, batch, make  # the per-pair curation tests' helpers

from batchmates import cli
from batchmates.config import ConfigError, RunConfig
from batchmates.curation import batch_frd
from batchmates.methods import get_method


def count_backbone_forwards(model) -> list[int]:
    calls = [0]
    model.backbone.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ------------------------------------------------------------------------------------------------ cost
@pytest.mark.parametrize(("method", "opts"), [
    ("simclr", {"curate": "frd-batch"}),
    ("barlow", {"curate": "frd-batch", "curate_policy": "reaugment"}),
    ("simclr", {"curate": "frd-pairwise"}),
    ("supcon", {"curate": "pair-sq-l2", "curate_policy": "reweight"}),
])
def test_online_scoring_makes_no_extra_backbone_forward(method, opts):
    x, y = batch(32)
    plain, cur = make(method), make(method, curate_threshold=1e30, **opts)
    counts = []
    for model in (plain, cur):
        calls = count_backbone_forwards(model)
        torch.manual_seed(0)
        model.compute_loss((x, y))
        counts.append(calls[0])
    assert counts[0] == counts[1] == (2 if method == "barlow" else 1)
    # resample scores fresh views before the training forward: it costs one scoring forward per view (documented)
    res = make("simclr", curate="frd-pairwise", curate_policy="resample", curate_threshold=1e30)
    calls = count_backbone_forwards(res)
    torch.manual_seed(0)
    res.compute_loss((x, y))
    assert calls[0] == 3


@pytest.mark.parametrize(("method", "features"), [("simclr", "both"), ("barlow", "both"), ("supcon", "backbone"),
                                                  ("simclr", "projector")])
def test_frd_batch_score_is_the_training_forwards_features(method, features):
    x, y = batch(32, seed=1)
    model = make(method, curate="frd-batch", curate_threshold=1e30, curate_features=features)
    ref_model = copy.deepcopy(model)
    torch.manual_seed(3)
    _, extra = model.compute_loss((x, y))
    torch.manual_seed(3)
    with torch.no_grad():
        h1, h2, z1, z2 = ref_model.encode_views(*ref_model.train_views(x))
    spaces = {"both": [(h1, h2), (z1, z2)], "backbone": [(h1, h2)], "projector": [(z1, z2)]}[features]
    assert extra["curate_score"] == pytest.approx(float(batch_frd(spaces)), rel=1e-10)
    assert extra["frac_dropped"] == 0.0 and extra["curate_draws"] == 1.0


# ------------------------------------------------------------------------------------------------ skip in Lightning
class _Recorder:
    """Lightning callback: model parameters, buffers and optimiser state around every training step."""

    def __init__(self) -> None:
        import lightning as L

        rec = self

        class CB(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                rec.before = rec.snapshot(trainer, pl_module)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                after = rec.snapshot(trainer, pl_module)
                rec.steps.append((bool(pl_module.batch_curator.last_stats["skipped"]), rec.before, after))

        self.callback = CB()
        self.steps: list = []

    @staticmethod
    def snapshot(trainer, model) -> dict:
        opt = trainer.optimizers[0]
        return {"params": [p.detach().clone() for p in model.parameters()],
                "buffers": [b.detach().clone() for b in model.buffers()],
                "opt": copy.deepcopy(opt.state_dict()["state"]), "lr": opt.param_groups[0]["lr"]}


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_lightning_skipped_batches_leave_weights_optimizer_and_bn_unchanged():
    import lightning as L

    from batchmates.data import load_dataset, make_loader

    splits = load_dataset("digits")
    model = make("simclr", curate="frd-batch", curate_quantile=0.5, curate_warmup=2, curate_window=8)
    loader = make_loader(splits.train, batch_size=64, seed=0, drop_last=True)
    model.steps_per_epoch = len(loader)
    rec = _Recorder()
    trainer = L.Trainer(max_steps=21, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[rec.callback],
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=loader)
    skipped = [s for s in rec.steps if s[0]]
    kept = [s for s in rec.steps[2:] if not s[0]]
    assert len(rec.steps) == 21 and skipped and kept  # the rule skipped some batches and kept others
    for _, before, after in skipped:
        assert _same(before["params"], after["params"])  # weights
        assert _same(before["buffers"], after["buffers"])  # BatchNorm running statistics restored
        assert before["opt"].keys() == after["opt"].keys()
        for k, st in before["opt"].items():  # SGD momentum buffers
            assert all(torch.equal(v, after["opt"][k][n]) for n, v in st.items() if isinstance(v, torch.Tensor))
    for _, before, after in kept:
        assert not _same(before["params"], after["params"]) and not _same(before["buffers"], after["buffers"])
    # the schedule and the step counter advance on skipped batches too (one tick per batch position)
    assert trainer.global_step == 21
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 21
    assert model.batch_curator.batches == 21 and model.batch_curator.skipped == len(skipped)
    assert not model._curation_skip  # reset by on_before_optimizer_step


# ------------------------------------------------------------------------------------------------ re-augment
def _scripted(scores: list[float]):
    it = iter(scores)
    return lambda spaces: next(it)


def test_reaugment_draws_new_views_and_undoes_the_rejected_forward():
    x, y = batch(32, seed=2)
    model = make("simclr", curate="frd-batch", curate_policy="reaugment", curate_threshold=1.0,
                 curate_max_resample=2)
    ref = copy.deepcopy(model)
    model.batch_score = _scripted([5.0, 0.5])  # first draw bad, second good
    torch.manual_seed(11)
    loss, extra = model.compute_loss((x, y))
    assert extra == {"frac_dropped": 0.0, "curate_score": 5.0, "curate_draws": 2.0, "curate_threshold": 1.0}
    torch.manual_seed(11)  # by hand: the loss and BatchNorm state of one forward on the *second* draw
    ref.train_views(x)
    v1, v2 = ref.train_views(x)
    _, _, z1, z2 = ref.encode_views(v1, v2)
    torch.testing.assert_close(loss, ref.contrastive_loss(z1, z2, None, None), rtol=0, atol=0)
    assert _same(list(model.buffers()), list(ref.buffers()))

    # still bad after max_resample new draws: skipped, zero loss reaching every parameter, BN untouched
    model = make("barlow", curate="frd-batch", curate_policy="reaugment", curate_threshold=1.0,
                 curate_max_resample=2)
    buffers = [b.clone() for b in model.buffers()]
    model.batch_score = _scripted([5.0, 4.0, 3.0])
    loss, extra = model.compute_loss((x, y))
    assert extra["frac_dropped"] == 1.0 and extra["curate_draws"] == 3.0 and model._curation_skip
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)
    assert _same(list(model.buffers()), buffers)


# ------------------------------------------------------------------------------------------------ exact resume
class _Interrupt(Exception):
    pass


ARGS = ["train", "--method", "simclr", "--data", "digits", "--epochs", "1", "--batch-size", "64", "--seed", "5",
        "--threads", "1", "--no-progress", "--protocol", "knn", "--deterministic", "--checkpoint-every", "4",
        "--curate", "frd-batch", "--opt", "curate_policy=reaugment", "--opt", "curate_quantile=0.6",
        "--opt", "curate_warmup=3", "--opt", "curate_window=10"]


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path: Path, monkeypatch) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli.main([*ARGS, "--out", str(ref)]) == 0
    cls = get_method("simclr")
    original = cls.training_step

    def interrupted(self, batch, batch_idx):
        if self.global_step == 9:
            raise _Interrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(cls, "training_step", interrupted)
    with pytest.raises(_Interrupt):
        cli.main([*ARGS, "--out", str(run)])
    monkeypatch.undo()
    mid = torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)
    assert mid["global_step"] == 8 and len(mid["batchmates_curation"]["scores"]) == 8
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 0
    a = torch.load(ref / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["batchmates_curation"] == b["batchmates_curation"]
    assert a["batchmates_curation"]["skipped"] + a["batchmates_curation"]["redraws"] > 0  # decisions happened
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


# ------------------------------------------------------------------------------------------------ names, errors
def test_retired_frd_gaussian_and_mismatched_policies_are_clear_errors(capsys) -> None:
    with pytest.raises(ConfigError, match="frd-gaussian.*pair-sq-l2.*frd-batch"):
        make("simclr", curate="frd-gaussian")
    with pytest.raises(ConfigError, match="curate_policy='skip' does not apply to curate='frd-pairwise'"):
        make("simclr", curate="frd-pairwise", curate_policy="skip")
    with pytest.raises(ConfigError, match=r"curate_policy='reweight' does not apply.*\['skip', 'reaugment'\]"):
        make("supcon", curate="frd-batch", curate_policy="reweight")
    with pytest.raises(ConfigError, match="not defined for method 'barlow'"):
        make("barlow", curate="pair-sq-l2", curate_policy="reweight")
    assert cli.main(["train", "--method", "simclr", "--data", "digits", "--curate", "frd-gaussian",
                     "--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert "curate=pair-sq-l2" in err and "curate=frd-batch" in err
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "'frd-batch', 'frd-pairwise', 'pair-sq-l2'" in out and "'frd-gaussian'" not in out
    assert "'skip', 'reaugment'" in out


def test_lightning_ddp_two_ranks_every_batch_skipped_leaves_the_initial_weights(tmp_path: Path) -> None:
    """Lightning DDP (gloo, 2 CPU processes): skipping by a zero loss + dropped gradients neither hangs nor errors
    (Lightning forbids returning None under DDP), and a run whose every batch is skipped ends with the initial
    weights and BatchNorm statistics while its schedule ran all its steps."""
    import json
    import os
    import subprocess
    import sys

    import lightning as L

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "batchmates", "train", "--method", "simclr", "--data", "digits",
                        "--threads", "1", "--no-progress", "--batch-size", "64", "--epochs", "1", "--max-steps", "4",
                        "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu", "--protocol", "knn",
                        "--curate", "frd-batch", "--opt", "curate_threshold=1e-12", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["curve"][-1]["frac_dropped"] == 1.0
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["batchmates_curation"]["batches"] == 4 and ckpt["batchmates_curation"]["skipped"] == 4
    cfg = RunConfig.from_yaml(str(out / "config.yaml"))
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the trainer's initialisation of the model
    init = get_method("simclr")(cfg, DIGITS)
    for k, v in init.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k]), k
