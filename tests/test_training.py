"""Training runs end to end: `batchmates train` outputs, config round trip, compare, label noise, schedule, DDP."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batchmates.cli import main
from batchmates.methods.base import step_seed, warmup_cosine
from batchmates.training.config import ConfigError, Option, RunConfig
from batchmates.training.run import apply_label_noise

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--data", "digits", "--threads", "1", "--no-progress", "--batch-size", "64"]


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ce") / "run"
    assert main(["train", "--method", "ce", *FAST, "--epochs", "3", "--seed", "1", "--checkpoint-every", "10",
                 "--out", str(out)]) == 0
    return out


def test_train_writes_every_output(ce_run: Path) -> None:
    for name in ("config.yaml", "metrics.json", "metrics.csv", "last.ckpt", "curves.png"):
        assert (ce_run / name).is_file() and (ce_run / name).stat().st_size > 0, name
    assert (ce_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("tfevents" in f for _, _, fs in os.walk(ce_run / "tb") for f in fs)
    assert not [f for f in os.listdir(ce_run) if f.endswith(".tmp")]
    m = json.loads((ce_run / "metrics.json").read_text())
    assert m["finished"] and m["accuracy_source"] == "classifier"
    assert m["test_acc"] > 0.5  # 10 classes: chance is 0.1
    assert m["epochs_done"] == 3 and [r["epoch"] for r in m["curve"]] == [1, 2, 3]
    assert m["curve"][-1]["train_loss"] < m["curve"][0]["train_loss"]
    assert math.isclose(m["curve"][-1]["val_acc"], m["test_acc"], abs_tol=1e-6)  # same clean test set
    assert m["best_acc"] >= m["test_acc"] and m["seed"] == 1 and m["torch"] == torch.__version__
    assert m["wall_time_s"] > 0 and "CPU" in m["hardware"]
    assert m["eval"]["knn"]["k20"] > 0.5 and m["eval"]["linear"]["top1"] > 0.5
    rows = list(csv.DictReader((ce_run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    ck = torch.load(ce_run / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == m["steps"] == 3 * (1347 // 64)


def test_config_yaml_reloads_equal_and_reruns(ce_run: Path) -> None:
    cfg = RunConfig.from_yaml(str(ce_run / "config.yaml"))
    assert cfg.method == "ce" and cfg.epochs == 3 and cfg.seed == 1 and cfg.backbone == "cnn"
    assert cfg.options == {"label_smoothing": 0.0}
    unset = ("data_dir", "threads", "pretrained_path", "backbone_spec", "image_size", "crop_padding")  # None: not used
    assert all(v is not None for k, v in cfg.to_dict().items() if k not in unset)
    assert RunConfig.from_yaml(cfg.to_yaml()) == cfg
    assert cfg.resolve() == cfg  # already concrete: resolving changes nothing


def test_existing_run_is_not_clobbered(ce_run: Path, capsys) -> None:
    code = main(["train", "--method", "ce", *FAST, "--epochs", "1", "--out", str(ce_run)])
    assert code == 1 and "--resume" in capsys.readouterr().err


def test_resolve_fills_method_defaults_and_validates_options() -> None:
    cfg = RunConfig(method="ce", data="digits", options={"label_smoothing": "0.1"}).resolve()
    assert cfg.backbone == "cnn" and cfg.epochs >= 1 and cfg.lr > 0 and cfg.options == {"label_smoothing": 0.1}
    with pytest.raises(ConfigError, match="label_smoothing"):
        RunConfig(method="ce", options={"label_smothing": 0.1}).resolve()
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        RunConfig(epochs=0).validate()
    with pytest.raises(ConfigError, match="unknown config key"):
        RunConfig.from_dict({"epochz": 3})


def test_option_parsing() -> None:
    assert Option(bool, False, "").parse("k", "yes") is True
    assert Option(int, 1, "").parse("k", "7") == 7
    with pytest.raises(ConfigError, match="expected a int"):
        Option(int, 1, "").parse("k", "1.5")
    with pytest.raises(ConfigError, match="choose one of"):
        Option(str, "a", "", choices=("a", "b")).parse("k", "c")
    with pytest.raises(ConfigError, match=">= 0"):
        Option(float, 0.0, "", minimum=0.0).parse("k", "-1")
    with pytest.raises(ConfigError):
        Option(float, 0.0, "").parse("k", "nan")


def test_label_noise_is_symmetric_exact_and_seeded() -> None:
    y = torch.arange(1000) % 10
    noisy = apply_label_noise(y, 0.2, 10, seed=5)
    changed = noisy != y
    assert int(changed.sum()) == 200  # exactly round(0.2 N), each moved to a *different* class
    assert torch.equal(noisy, apply_label_noise(y, 0.2, 10, seed=5))
    assert not torch.equal(noisy, apply_label_noise(y, 0.2, 10, seed=6))
    assert int(noisy.min()) >= 0 and int(noisy.max()) <= 9
    assert torch.equal(apply_label_noise(y, 0.0, 10, seed=5), y)


def test_warmup_cosine_and_step_seed() -> None:
    f = warmup_cosine(4, 20)
    assert [round(f(s), 6) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and math.isclose(f(12), 0.5) and f(20) == 0.0
    assert step_seed(0, 5) == step_seed(0, 5) and len({step_seed(s, t) for s in range(5) for t in range(50)}) == 250
    assert step_seed(0, 5, rank=0) != step_seed(0, 5, rank=1)


def test_compare_two_seeds_writes_results(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "ce", "--seeds", "2", "--epochs", "1", *FAST, "--out", str(out)]
    assert main(argv) == 0
    for name in ("results.md", "results.json", "accuracy.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert res["methods"] == ["ce"] and res["seeds"] == [0, 1] and not res["failed"]
    accs = [r["test_acc"] for r in res["runs"]]
    s = res["summary"]["ce"]["accuracy"]
    assert s["n"] == 2 and math.isclose(s["mean"], sum(accs) / 2, rel_tol=1e-9)
    assert math.isclose(s["std"], abs(accs[0] - accs[1]) / math.sqrt(2), rel_tol=1e-9, abs_tol=1e-12)
    md = (out / "results.md").read_text()
    assert "| ce |" in md and "±" in md and "Hardware:" in md and "1 ep" in md
    assert "top-1" in capsys.readouterr().out
    # a second compare skips the finished runs
    assert main(argv) == 0
    res2 = json.loads((out / "results.json").read_text())
    assert all(r["action"].startswith("skipped") for r in res2["runs"])
    assert res2["summary"] == res["summary"]


def test_methods_all_means_every_supporting_method() -> None:
    from batchmates.methods import available_methods, get_method
    from batchmates.training.compare import resolve_methods

    names = resolve_methods("all", "digits")
    assert "ce" in names and set(names) == {m for m in available_methods() if get_method(m).supports("digits")}
    assert resolve_methods("ce,ce", "digits") == ["ce"]


@pytest.mark.parametrize("method", ["ce", "ba2m", "batchformer", "btn", "ibaformer", "supcon", "simclr", "barlow",
                                    "swav", "cc"])
def test_every_parameter_gets_a_gradient_in_a_training_step(method: str) -> None:
    """Lightning's "ddp" strategy runs DDP with find_unused_parameters=False, which fails on the first step of a
    model with a parameter outside the loss's graph: every method's own wiring must use all of its parameters."""
    from batchmates.data import load_dataset
    from batchmates.methods import get_method
    from batchmates.methods.build import DataInfo

    digits = load_dataset("digits")
    torch.manual_seed(0)
    cfg = RunConfig(method=method, batch_size=16, **({"attn_layer": "se"} if method == "cc" else {})).resolve()
    model = get_method(method)(cfg, DataInfo.from_splits(digits)).train()
    out = model.training_step((digits.train.images[:16], digits.train.labels[:16]), 0)
    (out["loss"] if isinstance(out, dict) else out).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"{method}: parameters outside the loss's graph: {unused[:5]}"


@pytest.mark.parametrize("strategy, unused", [("ddp", False), ("ddp_find_unused_parameters_true", True)])
def test_strategy_reaches_lightnings_ddp(tmp_path: Path, strategy: str, unused: bool) -> None:
    """`--strategy ddp_find_unused_parameters_true` (a user's backbone with parameters outside the loss) builds
    Lightning's DDP with find_unused_parameters=True; plain `ddp` keeps the fast path."""
    from lightning.pytorch.strategies import DDPStrategy

    from batchmates.data import load_dataset
    from batchmates.methods import get_method
    from batchmates.methods.build import DataInfo
    from batchmates.training.run import _trainer

    cfg = RunConfig(method="ce", out=str(tmp_path), devices=2, accelerator="cpu", strategy=strategy,
                    progress=False).resolve()
    model = get_method("ce")(cfg, DataInfo.from_splits(load_dataset("digits")))
    trainer, _ = _trainer(cfg, model, verbose=False)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._ddp_kwargs.get("find_unused_parameters", False) is unused


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    """Lightning DDP (gloo) with 2 CPU processes trains `ce` for a few steps and writes the outputs once."""
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "batchmates", "train", "--method", "ce", *FAST, "--epochs", "1",
                        "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu",
                        "--protocol", "accuracy", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    # global batch 64 = 2 x 32: one epoch is 1347 // 64 = 21 steps on each rank, as in one process
    assert m["devices"] == 2 and m["steps"] == 1347 // 64 and m["test_acc"] > 0.5
