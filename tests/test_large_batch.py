"""The large-batch recipe as run settings (issue 11): --optimizer lars with bias/norm exclusion, --lr-rule,
--accumulate (cached, exact at method level), --sync-bn, --compile, and --num-nodes under torchrun."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from batchmates.cli import main
from batchmates.config import ConfigError, DataInfo, RunConfig
from batchmates.data import load_dataset
from batchmates.methods import get_method


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _method(digits, **settings):
    cfg = RunConfig(**settings).resolve()
    return get_method(cfg.method)(cfg, DataInfo.from_splits(digits))


def test_lars_groups_exclude_biases_and_norms_and_lr_rule_scales(digits) -> None:
    from timm.optim import Lars

    model = _method(digits, method="supcon", optimizer="lars", lr=0.3, lr_rule="linear", batch_size=512,
                    weight_decay=1e-6, warmup_epochs=0.0)
    model.steps_per_epoch = 2
    opt = model.configure_optimizers()["optimizer"]
    assert isinstance(opt, Lars)
    decay, rest = opt.param_groups
    norm_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert norm_ids and norm_ids <= {id(p) for p in rest["params"]}
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in rest["params"])
    assert (decay["weight_decay"], rest["weight_decay"], rest["always_adapt"]) == (1e-6, 0.0, False)
    assert decay["initial_lr"] == pytest.approx(0.3 * 512 / 256)
    sqrt = _method(digits, method="ce", lr=0.1, lr_rule="sqrt", batch_size=64)
    sqrt.steps_per_epoch = 2
    assert sqrt.configure_optimizers()["optimizer"].param_groups[0]["initial_lr"] == pytest.approx(0.1 * 0.5)


def test_cached_accumulation_equals_the_whole_batch_in_a_method(digits) -> None:
    """supcon with --accumulate 3: same loss and parameter gradients as one batch (float64, no BatchNorm)."""
    torch.manual_seed(0)
    model = _method(digits, method="supcon", backbone="vit-tiny", batch_size=24, accumulate=3).double().train()
    views = model.train_views
    model.train_views = lambda x: tuple(v.double() for v in views(x))
    batch = (digits.train.images[:24], digits.train.labels[:24])

    def grads() -> list[torch.Tensor]:
        out = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        return out

    torch.manual_seed(1)
    want, _ = model.compute_loss(batch)
    want.backward()
    want_grads = grads()
    torch.manual_seed(1)
    got = model.cached_loss_backward(batch)
    got_grads = grads()
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    assert len(got_grads) == len(want_grads) > 10
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_accumulate_trains_under_lightning_and_is_refused_where_it_is_not_exact(tmp_path, capsys) -> None:
    out = tmp_path / "acc"
    assert main(["train", "--method", "simclr", "--data", "digits", "--accumulate", "4", "--batch-size", "128",
                 "--optimizer", "lars", "--lr-rule", "sqrt", "--max-steps", "2", "--epochs", "1", "--threads", "1",
                 "--no-progress", "--protocol", "knn", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and math.isfinite(metrics["curve"][0]["train_loss"])
    for argv, needle in ((["--method", "ce", "--accumulate", "2"], "contrastive methods"),
                         (["--method", "simclr", "--accumulate", "2", "--curate", "pair-sq-l2"], "curation"),
                         (["--method", "simclr", "--accumulate", "3", "--batch-size", "64"], "multiple of 3")):
        assert main(["train", *argv, "--out", str(tmp_path / "no"), "--no-progress"]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_sync_bn_and_num_nodes_reach_the_trainer(digits, tmp_path) -> None:
    from batchmates.training.run import _trainer

    cfg = RunConfig(method="ce", sync_bn=True, out=str(tmp_path / "t"), accelerator="cpu").resolve()
    trainer, _ = _trainer(cfg, get_method("ce")(cfg, DataInfo.from_splits(digits)), False)
    assert trainer._accelerator_connector._layer_sync is not None  # Lightning converts BatchNorm under DDP
    assert trainer.num_nodes == 1
    plain, _ = _trainer(cfg.replace(sync_bn=False), get_method("ce")(cfg, DataInfo.from_splits(digits)), False)
    assert plain._accelerator_connector._layer_sync is None


def test_compile_keeps_checkpoint_keys(digits) -> None:
    from batchmates.training.wiring import compile_backbone

    model = _method(digits, method="ce")
    keys = list(model.state_dict())
    compile_backbone(model)
    assert model.backbone._compiled_call_impl is not None and list(model.state_dict()) == keys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_torchrun_job_equals_one_node_with_two_devices(tmp_path) -> None:
    """`torchrun --nnodes 2 --nproc-per-node 1` on localhost (2 gloo processes) trains exactly what one
    `--devices 2 --strategy ddp` job trains: the same global batches, hence the same weights."""
    common = ["-m", "batchmates", "train", "--method", "supcon", "--data", "digits", "--max-steps", "3", "--epochs",
              "1", "--batch-size", "64", "--accelerator", "cpu", "--strategy", "ddp", "--threads", "1", "--no-progress",
              "--protocol", "accuracy"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    subprocess.run([sys.executable, *common, "--devices", "2", "--out", str(one)], check=True, env=env, timeout=600)
    two = tmp_path / "two"
    port = str(_free_port())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--master-addr", "127.0.0.1", "--master-port", port]
    procs = [subprocess.Popen([*torchrun, "--node-rank", str(r), *common, "--devices", "1", "--num-nodes", "2",
                               "--out", str(two)], env=env) for r in (0, 1)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    a = torch.load(one / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(two / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 3
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-6, atol=1e-6)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1["curve"][0]["train_loss"] == pytest.approx(m2["curve"][0]["train_loss"], rel=1e-6)


def test_accumulate_must_divide_the_per_process_batch() -> None:
    with pytest.raises(ConfigError, match="devices=2 x num_nodes=2 x accumulate=2"):
        RunConfig(method="simclr", batch_size=36, devices=2, num_nodes=2, accumulate=2).validate()


@pytest.mark.slow
def test_cached_accumulation_under_ddp_equals_the_plain_ddp_run(tmp_path) -> None:
    """2 gloo processes: --accumulate 2 trains the weights --accumulate 1 trains (no BatchNorm: vit-tiny), so the
    gradients of all micro-batches are all-reduced once per step (a rank's local gradient would differ)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    states = []
    for acc in (1, 2):
        out = tmp_path / f"acc{acc}"
        subprocess.run([sys.executable, "-m", "batchmates", "train", "--method", "simclr", "--backbone", "vit-tiny",
                        "--data", "digits", "--accumulate", str(acc), "--batch-size", "32", "--devices", "2",
                        "--strategy", "ddp", "--accelerator", "cpu", "--precision", "32-true", "--max-steps", "2",
                        "--epochs", "1", "--threads", "1", "--no-progress", "--protocol", "knn", "--out", str(out)],
                       check=True, env=env, timeout=600)
        states.append(torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"])
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, rtol=1e-5, atol=1e-6)
