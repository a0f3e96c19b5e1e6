"""The attention-style batch-relational methods as trainable methods: ba2m, batchformer, btn, ibaformer.

Each is trained for one short epoch on digits through the CLI; the trained runs are then reloaded to check the
inference contract of METHODS.md (independent eval never depends on batch mates and equals batch-size-1
predictions), the wiring of each method (which modules sit where, which head predicts) and the evaluation
protocols it is compared under (symmetric label noise, corruptions, 2-process DDP).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from batchmates.cli import main
from batchmates.methods import DataInfo, get_method
from batchmates.models.resnet import BasicBlock
from batchmates.models.vit import SelfAttention
from batchmates.nn import BA2M, BatchFormer, IntraBatchAttention
from batchmates.training.config import ConfigError, RunConfig
from batchmates.training.run import load_run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--data", "digits", "--threads", "1", "--no-progress", "--batch-size", "64", "--epochs", "1",
        "--protocol", "accuracy", "--checkpoint-every", "0"]
METHODS = ("ba2m", "batchformer", "btn", "ibaformer")
DIGITS = DataInfo("digits", 10, 1, 8, (0.5,), (0.25,), 1347, False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One 1-epoch digits run per method (each method's own defaults otherwise)."""
    base = tmp_path_factory.mktemp("attn_runs")
    out = {}
    for m in METHODS:
        d = base / m
        # the transformer-based ones (AdamW, small lr) need a second epoch to be clearly above chance
        extra = ["--epochs", "2"] if m in ("btn", "ibaformer") else []
        assert main(["train", "--method", m, *FAST, *extra, "--out", str(d)]) == 0, m
        out[m] = d
    return out


def _model(cls_name: str, **options):
    cls = get_method(cls_name)
    cfg = RunConfig(method=cls_name, data="digits", options=dict(options)).resolve(cls)
    return cls(cfg, DIGITS)


def _test_images(splits, n: int = 48, offset: int = 0) -> torch.Tensor:
    return splits.test.images[offset : offset + n]


def _assert_batch_independent(model, splits) -> torch.Tensor:
    """Predictions of the first 16 test images: unchanged when their 32 batch mates are replaced, and equal to
    one-image batches. Returns the logits."""
    model.eval()
    x = model.normalize(_test_images(splits))
    others = model.normalize(_test_images(splits, 32, offset=200))
    with torch.no_grad():
        a = model.classify(x)[:16]
        b = model.classify(torch.cat([x[:16], others]))[:16]
        c = torch.cat([model.classify(x[i : i + 1]) for i in range(16)])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    return a


def _batch_sensitive(model, splits) -> bool:
    """Whether the first 16 predictions change when their batch mates change (model in its current mode)."""
    x = model.normalize(_test_images(splits))
    others = model.normalize(_test_images(splits, 32, offset=200))
    with torch.no_grad():
        a = model.classify(x)[:16]
        b = model.classify(torch.cat([x[:16], others]))[:16]
    return not torch.allclose(a, b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- smoke runs
@pytest.mark.parametrize("method", METHODS)
def test_one_epoch_on_digits_beats_chance(runs, method: str) -> None:
    m = json.loads((runs[method] / "metrics.json").read_text())
    assert m["finished"] and m["method"] == method and m["accuracy_source"] == "classifier"
    epochs = 2 if method in ("btn", "ibaformer") else 1
    assert m["epochs_done"] == epochs and m["steps"] == epochs * (1347 // 64)
    # 10 balanced classes: chance is 0.1 (a constant prediction scores ~0.1; 0.14 is ~3 sd above a random guess
    # on 450 test images). The small ViT is far slower to train on digits than the CNN.
    assert m["test_acc"] > (0.14 if method == "ibaformer" else 0.3), m["test_acc"]
    cfg = yaml.safe_load((runs[method] / "config.yaml").read_text())
    assert cfg["method"] == method and cfg["eval_mode"] == "independent"
    assert set(cfg["options"]) == set(get_method(method).options)


def test_registered_with_options_and_defaults() -> None:
    for m in METHODS:
        cls = get_method(m)
        assert cls.supervised and cls.batch_relational and cls.supports("digits")
        with pytest.raises(ConfigError, match="batch_size must be >= 2"):
            RunConfig(method=m, data="digits", batch_size=1).resolve(cls)
        with pytest.raises(ConfigError, match="unknown option"):
            RunConfig(method=m, data="digits", options={"nope": 1}).resolve(cls)
    # ba2m keeps ce's budget so that `compare --methods ce,ba2m` isolates the attention module
    assert get_method("ba2m").default_settings("digits") == get_method("ce").default_settings("digits")
    assert get_method("ibaformer").default_settings("cifar10")["backbone"] == "vit-tiny-conv"


# ---------------------------------------------------------------------------------------------- ba2m
def _ba2m_in_blocks(backbone) -> list[bool]:
    blocks = [blk for blk in backbone.modules() if isinstance(blk, BasicBlock)]
    return [any(isinstance(m, BA2M) for m in blk.modules()) for blk in blocks]


def test_ba2m_backbone_holds_ba2m(runs) -> None:
    model, cfg, splits = load_run(str(runs["ba2m"]))
    assert cfg.backbone == "cnn"
    # the plain CNN has no residual blocks: one BA2M at the end of every stage
    assert [isinstance(stage[-1], BA2M) for stage in model.backbone.stages] == [True] * len(model.backbone.stages)
    assert all(m.weight_mode == "scaled" and m.score == "bounded" for m in model.modules() if isinstance(m, BA2M))
    _assert_batch_independent(model, splits)  # scaled BA2M multiplies by 1 in independent eval
    model.set_eval_mode("batch")
    assert _batch_sensitive(model, splits)  # ... and re-weights by the batch in "batch" eval

    # residual backbone: one BA2M on every residual branch (paper), or one per stage output
    m = _model("ba2m", weight_mode="scaled", reduction=8, dilation=2)
    m = get_method("ba2m")(m.cfg.replace(backbone="resnet-small"), DIGITS)
    blocks = _ba2m_in_blocks(m.backbone)
    assert len(blocks) == 4 and all(blocks)
    ba2ms = [x for x in m.modules() if isinstance(x, BA2M)]
    assert [(x.weight_mode, x.channels, x.hidden) for x in ba2ms] == [
        ("scaled", c, max(4, c // 8)) for c in (16, 32, 64, 128)
    ]
    assert all(x.local_dilated.dilation == (2, 2) for x in ba2ms)
    s = get_method("ba2m")(m.cfg.replace(options={**m.cfg.options, "placement": "stage"}), DIGITS)
    assert not any(_ba2m_in_blocks(s.backbone))
    assert [isinstance(stage[-1], BA2M) for stage in s.backbone.stages] == [True] * 4


def test_ba2m_rejects_conflicting_settings() -> None:
    cfg = _model("ba2m").cfg
    with pytest.raises(ConfigError, match="attn_layer"):
        get_method("ba2m")(cfg.replace(attn_layer="se"), DIGITS)
    with pytest.raises(ConfigError, match="convolutional backbone"):
        get_method("ba2m")(cfg.replace(backbone="vit-tiny"), DIGITS)
    with pytest.raises(ConfigError, match="weight_mode"):
        RunConfig(method="ba2m", options={"weight_mode": "soft"}).resolve()


# ---------------------------------------------------------------------------------------------- batchformer
def test_batchformer_drops_the_layer_at_test_time(runs) -> None:
    model, cfg, splits = load_run(str(runs["batchformer"]))
    logits = _assert_batch_independent(model, splits)
    x = model.normalize(_test_images(splits, 16))
    with torch.no_grad():
        ref = model.classifier(model.backbone(x))  # the paper's test-time path: no BatchFormer
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)
    model.set_eval_mode("batch")  # opt-in: classify through the layer across the test batch
    assert _batch_sensitive(model, splits)


def test_batchformer_training_step_shares_the_classifier() -> None:
    torch.manual_seed(0)
    model = _model("batchformer")
    model.log = lambda *a, **k: None  # no trainer attached
    model.train()
    calls = []
    model.classifier.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(8) % 10
    torch.manual_seed(1)
    loss = model.training_step((x, y), 0)
    # one classifier call on cat([f, BatchFormer(f)]) with labels repeated
    assert calls == [torch.Size([16, model.backbone.feature_dim])]
    torch.manual_seed(1)
    f = model.backbone(model.train_views(x))
    ref = F.cross_entropy(model.classifier(torch.cat([f, model.batchformer(f)])), torch.cat([y, y]))
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert model.batchformer.in_proj.weight.grad is not None and model.batchformer.in_proj.weight.grad.abs().sum() > 0
    assert isinstance(model.batchformer, BatchFormer)
    with pytest.raises(ConfigError, match="num_heads"):
        _model("batchformer", num_heads=3)  # 128 features


# ---------------------------------------------------------------------------------------------- btn
def test_btn_independent_eval_predicts_with_the_main_head(runs) -> None:
    model, cfg, splits = load_run(str(runs["btn"]))
    logits = _assert_batch_independent(model, splits)
    head = model.head
    x = model.normalize(_test_images(splits, 16))
    with torch.no_grad():
        main_logits = head.classifier(head.mla(model.backbone.forward_stages(x)))  # MLA -> main classifier
    torch.testing.assert_close(logits, main_logits, rtol=1e-6, atol=1e-6)
    assert head.mla is not None and head.lambda_main == 1.0 and head.feature_map_size == (2, 2)
    # "batch" eval predicts from bt = cba + main, which attends across the test batch
    model.set_eval_mode("batch")
    with torch.no_grad():
        out = head(model.backbone.forward_stages(x))
    torch.testing.assert_close(model.classify(x), out.bt)
    torch.testing.assert_close(out.bt, out.cba + out.main)
    assert _batch_sensitive(model, splits)


def test_btn_loss_is_the_three_term_ce() -> None:
    torch.manual_seed(0)
    model = _model("btn", lambda_main=0.5, mla="false", pos_encoding="sine")
    model.log = lambda *a, **k: None
    model.train()
    x = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(12) % 10
    torch.manual_seed(3)
    loss = model.training_step((x, y), 0)
    torch.manual_seed(3)
    out = model.head(model.backbone.forward_stages(model.train_views(x)))
    ref = 0.5 * F.cross_entropy(out.main, y) + F.cross_entropy(out.bt, y) + F.cross_entropy(out.cba, y)
    torch.testing.assert_close(loss, ref)
    assert model.head.mla is None
    loss.backward()
    assert model.head.q_proj.weight.grad.abs().sum() > 0  # CBA's queries are trained


# ---------------------------------------------------------------------------------------------- ibaformer
@pytest.mark.parametrize(
    ("spec", "expected"),
    [("last2", [4, 5]), ("all", [0, 1, 2, 3, 4, 5]), ("none", []), ("0,2", [0, 2]), ("first1", [0]),
     ("-1,0", [0, 5])],
)
def test_ibaformer_blocks_hold_intra_batch_attention(spec: str, expected: list[int]) -> None:
    model = _model("ibaformer", iba_blocks=spec, mode="element")
    blocks = model.backbone.blocks
    assert len(blocks) == 6
    assert [i for i, b in enumerate(blocks) if isinstance(b.mixer, IntraBatchAttention)] == expected
    assert all(isinstance(b.mixer, SelfAttention) for i, b in enumerate(blocks) if i not in expected)
    assert all(b.mixer.mode == "element" for b in blocks if isinstance(b.mixer, IntraBatchAttention))


def test_ibaformer_option_errors() -> None:
    for bad in ("last7", "0,9", "middle", "last0"):
        with pytest.raises(ConfigError, match="iba_blocks"):
            _model("ibaformer", iba_blocks=bad)
    with pytest.raises(ConfigError, match="vit-tiny"):
        get_method("ibaformer")(_model("ibaformer").cfg.replace(backbone="cnn"), DIGITS)


def test_ibaformer_independent_eval_is_batch_independent(runs) -> None:
    model, cfg, splits = load_run(str(runs["ibaformer"]))
    assert cfg.backbone == "vit-tiny-conv" and cfg.options["mode"] == "mean"
    iba = [i for i, b in enumerate(model.backbone.blocks) if isinstance(b.mixer, IntraBatchAttention)]
    assert iba == [4, 5]
    _assert_batch_independent(model, splits)
    model.set_eval_mode("batch")
    assert _batch_sensitive(model, splits)  # the IBA blocks do mix the batch when asked to
    model.set_eval_mode("independent")
    model.train()
    assert _batch_sensitive(model, splits)  # and always in training


# ---------------------------------------------------------------------------------------------- protocols
def test_btn_label_noise_run_records_the_fraction(tmp_path: Path) -> None:
    out = tmp_path / "noisy"
    assert main(["compare", "--methods", "btn", "--seeds", "1", *FAST, "--max-steps", "3", "--label-noise", "0.2",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["label_noise"] == 0.2 and not res["failed"]
    run = out / "btn" / "seed0"
    assert json.loads((run / "metrics.json").read_text())["label_noise"] == 0.2
    assert yaml.safe_load((run / "config.yaml").read_text())["label_noise"] == 0.2
    assert "label noise 20%" in (out / "results.md").read_text()


def test_corruption_evaluation_of_trained_runs(runs) -> None:
    from batchmates.training.evaluate import evaluate, evaluate_model

    for m in ("ibaformer", "btn"):
        model, cfg, splits = load_run(str(runs[m]))
        res = evaluate_model(model, splits, ["accuracy"], corruptions=True, severities=[5],
                             kinds=["gaussian_noise", "invert"])
        cor = res["corruptions"]
        assert set(cor) == {"gaussian_noise", "invert", "mean"}
        assert 0.0 <= cor["invert"]["5"] <= 1.0 and cor["mean"] < res["accuracy"]["top1"], (m, res)
    # the `batchmates eval DIR --corruptions` path merges the results into metrics.json
    evaluate(str(runs["batchformer"]), ["accuracy"], corruptions=True, severities=[1], kinds=["contrast"])
    m = json.loads((runs["batchformer"] / "metrics.json").read_text())
    assert set(m["eval"]["corruptions"]) == {"contrast", "mean"}


def test_ddp_two_cpu_processes_btn(tmp_path: Path) -> None:
    """Lightning DDP (gloo, 2 CPU processes, global batch 64 = 2 x 32) trains btn for a few steps."""
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "batchmates", "train", "--method", "btn", *FAST, "--max-steps", "3",
                        "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["devices"] == 2 and m["steps"] == 3 and m["finished"]
