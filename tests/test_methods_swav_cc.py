"""The `swav` and `cc` methods wired into the trainer (issue 3): CLI smoke runs, prototype freezing, the logged
CC term recomputed independently, configuration errors, and a 2-process DDP run of swav with its queue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml

from batchmates.cli import main
from batchmates.data import load_dataset
from batchmates.losses import CCLoss
from batchmates.methods import DataInfo, get_method
from batchmates.models.layers import SqueezeExcite
from batchmates.training.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--data", "digits", "--threads", "1", "--no-progress", "--batch-size", "64"]


@pytest.fixture(scope="module")
def digits():
    splits = load_dataset("digits")
    return splits, DataInfo.from_splits(splits)


def _metrics(out: Path) -> dict:
    assert (out / "metrics.json").is_file()
    return json.loads((out / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------------------ swav
def test_swav_cli_smoke_with_queue_multicrop_and_frozen_prototypes(tmp_path: Path) -> None:
    out = tmp_path / "swav"
    code = main(["train", "--method", "swav", *FAST, "--epochs", "1", "--max-steps", "8", "--protocol", "linear",
                 "--protocol", "knn", "--opt", "queue_length=128", "--opt", "queue_start_epoch=0",
                 "--opt", "freeze_prototypes=3", "--opt", "n_low_crops=2", "--out", str(out)])
    assert code == 0
    m = _metrics(out)
    assert m["finished"] and m["steps"] == 8 and m["accuracy_source"] == "linear_probe"
    assert m["test_acc"] > 0.3 and m["eval"]["knn"]["k20"] > 0.3  # 10 classes: chance is 0.1
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["options"]["queue_length"] == 128 and cfg["options"]["n_low_crops"] == 2
    state = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert int(state["queue.n_filled"]) == 128  # filled from epoch 0, full after 2 steps, then used
    assert float(state["queue.embeddings"].norm(dim=2).min()) > 0.999  # every slot holds a unit embedding
    w = state["prototypes.layer.weight"]
    assert w.shape == (30, 128)  # digits auto: 30 prototypes of the 128-d projection
    torch.testing.assert_close(w.norm(dim=1), torch.ones(30), atol=1e-5, rtol=0)


class _Recorder(L.Callback):
    def __init__(self) -> None:
        self.protos: list[torch.Tensor] = []
        self.backbone: list[torch.Tensor] = []
        self.grad_none: list[bool] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grad_none.append(pl_module.prototypes.weight.grad is None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.protos.append(pl_module.prototypes.weight.detach().clone())
        self.backbone.append(next(pl_module.backbone.parameters()).detach().clone())


def test_swav_prototypes_frozen_then_learn(digits) -> None:
    splits, info = digits
    cfg = RunConfig(method="swav", data="digits", batch_size=32, lr=0.2, warmup_epochs=0.0, threads=1,
                    options={"freeze_prototypes": 3, "n_prototypes": 20}).resolve()
    model = get_method("swav")(cfg, info)
    ds = torch.utils.data.TensorDataset(splits.train.images[:256], splits.train.labels[:256])
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False, drop_last=True)
    model.steps_per_epoch = len(loader)
    w0 = model.prototypes.weight.detach().clone()
    torch.testing.assert_close(w0.norm(dim=1), torch.ones(20))
    b0 = next(model.backbone.parameters()).detach().clone()
    rec = _Recorder()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[rec])
    trainer.fit(model, train_dataloaders=loader)
    assert rec.grad_none == [True, True, True, False, False, False]
    for t in range(3):  # steps 0..2: prototypes untouched (up to the no-op re-normalisation of unit rows)
        torch.testing.assert_close(rec.protos[t], w0, atol=1e-6, rtol=0)
    assert not torch.allclose(rec.backbone[0], b0)  # ... while the encoder learns from the loss
    assert (rec.protos[3] - w0).abs().max() > 1e-4  # the first unfrozen step moves them
    assert (rec.protos[5] - rec.protos[3]).abs().max() > 1e-4
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(20), atol=1e-5, rtol=0)


def test_swav_freeze_default_is_one_epoch_and_auto_options(digits) -> None:
    _, info = digits
    cfg = RunConfig(method="swav", data="digits").resolve()
    assert cfg.epochs == 4 and cfg.lr == 0.2  # digits defaults (default_settings)
    model = get_method("swav")(cfg, info)
    model.steps_per_epoch = 21
    assert model.freeze_iterations() == 21
    assert model.n_prototypes == 30 and model.epsilon == 0.02 and model.n_low_crops == 0
    assert model.loss_fn.epsilon == 0.02 and model.queue is None
    views = model.train_views(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
    assert len(views) == 2 and all(v.shape == (4, 1, 8, 8) for v in views)
    cfg = RunConfig(method="swav", data="digits", options={"n_low_crops": 3, "epsilon": 0.05}).resolve()
    model = get_method("swav")(cfg, info)
    shapes = [tuple(v.shape) for v in model.train_views(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))]
    assert shapes == [(4, 1, 8, 8)] * 2 + [(4, 1, 6, 6)] * 3 and model.loss_fn.epsilon == 0.05


def test_swav_queue_length_must_be_multiple_of_global_batch(digits) -> None:
    _, info = digits
    cfg = RunConfig(method="swav", data="digits", batch_size=64, options={"queue_length": 100}).resolve()
    with pytest.raises(ConfigError, match=r"queue_length=100 must be a multiple of the global batch size 64.*"
                                          r"queue_length=128"):
        get_method("swav")(cfg, info)


def test_swav_ddp_two_cpu_processes_with_queue(tmp_path: Path) -> None:
    """Lightning DDP (gloo, 2 CPU processes, 32 samples each): Sinkhorn totals all-reduced, queue gathered."""
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "batchmates", "train", "--method", "swav", *FAST, "--epochs", "1",
                        "--max-steps", "4", "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu",
                        "--protocol", "accuracy", "--opt", "queue_length=64", "--opt", "queue_start_epoch=0",
                        "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = _metrics(out)
    assert m["devices"] == 2 and m["steps"] == 4 and m["test_acc"] > 0.3
    state = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert int(state["queue.n_filled"]) == 64  # the gathered global batch (2 x 32)


# ------------------------------------------------------------------------------------------------------ cc
def test_cc_cli_smoke_forces_se(tmp_path: Path) -> None:
    out = tmp_path / "cc"
    code = main(["train", "--method", "cc", *FAST, "--epochs", "2", "--protocol", "accuracy",
                 "--opt", "cc_layers=all", "--out", str(out)])
    assert code == 0
    m = _metrics(out)
    assert m["finished"] and m["accuracy_source"] == "classifier" and m["attn_layer"] == "se"
    assert m["test_acc"] > 0.3 and m["epochs_done"] == 2  # 10 classes: chance is 0.1 (ce+se: ~0.26 after 1 epoch)
    assert m["curve"][-1]["train_acc"] > 0.5
    assert yaml.safe_load((out / "config.yaml").read_text())["attn_layer"] == "se"


@pytest.mark.parametrize("layer", ["none", "ba2m"])
def test_cc_without_se_layers_is_an_error(layer: str, tmp_path: Path, capsys) -> None:
    code = main(["train", "--method", "cc", *FAST, "--epochs", "1", "--attn-layer", layer,
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code != 0 and "attn_layer" in err and "--attn-layer se" in err
    assert not (tmp_path / "run" / "metrics.json").exists()


def _naive_cc(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_cc "difference" from the B x B distance matrix (METHODS.md Sec. 7), float64."""
    a = a.double()
    d = torch.cdist(a, a).pow(2) / a.shape[1]
    same = y[:, None] == y[None, :]
    off = ~torch.eye(len(y), dtype=torch.bool)
    intra, inter = d[same & off], d[~same]
    return (intra.mean() if intra.numel() else d.new_zeros(())) - (inter.mean() if inter.numel() else 0.0)


@pytest.mark.parametrize("cc_layers", ["last", "all"])
def test_cc_logged_term_equals_ccloss_on_the_se_gates(cc_layers: str, digits) -> None:
    splits, info = digits
    cfg = RunConfig(method="cc", data="digits", batch_size=48, options={"cc_layers": cc_layers,
                                                                        "lambda_cc": 0.7}).resolve()
    assert cfg.attn_layer == "se"
    model = get_method("cc")(cfg, info).train()
    se = [m for m in model.backbone.modules() if isinstance(m, SqueezeExcite)]
    assert len(se) == 3 and model.se_layers == se  # the cnn backbone: one SE per stage
    inputs: dict[int, torch.Tensor] = {}
    for i, m in enumerate(se):
        m.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args[0].detach()))
    logged: dict[str, torch.Tensor] = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, torch.as_tensor(value).detach())
    x, y = splits.train.images[:48], splits.train.labels[:48]
    loss = model.training_step((x, y), 0)
    # Independent recomputation of the gates from each SE layer's input, then of the CC term.
    gates = []
    with torch.no_grad():
        for i, m in enumerate(se):
            s = inputs[i].mean(dim=(2, 3), keepdim=True)
            gates.append(torch.sigmoid(m.fc2(torch.relu(m.fc1(s)))).flatten(1))
    used = gates[-1:] if cc_layers == "last" else gates
    expect_cc = torch.stack([CCLoss()(g, y) for g in used]).mean()
    expect_naive = torch.stack([_naive_cc(g, y) for g in used]).mean()
    torch.testing.assert_close(logged["train/cc"].double(), expect_naive, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logged["train/cc"], expect_cc, atol=1e-6, rtol=1e-5)
    assert float(expect_naive.abs()) > 1e-6  # a real, non-trivial term (9 digit classes in 48 samples)
    torch.testing.assert_close(loss.detach(), logged["train/ce"] + 0.7 * logged["train/cc"])
    torch.testing.assert_close(logged["train/loss"], loss.detach())
    # gradient of the CC term reaches the SE layers
    loss.backward()
    assert se[-1].fc2.weight.grad is not None and float(se[-1].fc2.weight.grad.abs().sum()) > 0


def test_cc_inference_is_per_sample(digits) -> None:
    splits, info = digits
    model = get_method("cc")(RunConfig(method="cc", data="digits").resolve(), info).eval()
    x = model.normalize(splits.test.images[:16])
    with torch.no_grad():
        full = model.classify(x)
        alone = torch.cat([model.classify(x[i : i + 1]) for i in range(16)])
        other = model.classify(torch.cat([x[:1], torch.flip(x[1:], dims=[0]) * 0.5]))
    torch.testing.assert_close(full, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other[0], full[0], atol=1e-5, rtol=1e-5)
    assert not any(m.gate._forward_hooks for m in model.se_layers)  # gates are collected inside a training step only
    assert F.softmax(full, 1).shape == (16, 10)
