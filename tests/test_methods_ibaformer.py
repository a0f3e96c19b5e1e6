"""The ``ibaformer`` method: its backbones (vit-tiny-conv by default, vit-tiny for old runs), the ``eval_form``
option, independent eval from training statistics in a trained run, old run directories, and the digits budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from batchmates.cli import main
from batchmates.methods import DataInfo, Method, get_method
from batchmates.nn import IntraBatchAttention
from batchmates.training.config import ConfigError, RunConfig

torch.set_num_threads(1)

DIGITS = DataInfo("digits", 10, 1, 8, (0.5,), (0.25,), 1347, False)
FAST = ["--data", "digits", "--threads", "1", "--no-progress", "--protocol", "accuracy", "--checkpoint-every", "0"]


def _model(**options):
    cls = get_method("ibaformer")
    backbone = options.pop("backbone", None)
    cfg = RunConfig(method="ibaformer", data="digits", backbone=backbone, options=dict(options)).resolve(cls)
    return cls(cfg, DIGITS)


def _iba_layers(model) -> list[IntraBatchAttention]:
    return [m for m in model.modules() if isinstance(m, IntraBatchAttention)]


def _images(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_default_backbone_has_a_conv_stem_and_vit_tiny_keeps_the_patch_embedding() -> None:
    cls = get_method("ibaformer")
    assert cls.default_settings("digits")["backbone"] == "vit-tiny-conv"
    assert cls.default_settings("digits")["epochs"] == 6
    conv = _model()
    assert conv.cfg.backbone == "vit-tiny-conv" and conv.backbone.stem is not None
    assert conv.backbone.patch_embed.in_channels == 64 and len(conv.backbone.blocks) == 6
    patch = _model(backbone="vit-tiny")
    assert patch.backbone.stem is None and patch.backbone.patch_embed.in_channels == 1
    # the transformer part is the same: every parameter outside the stem/patch embedding has the same shape
    trunk = lambda m: {k: p.shape for k, p in m.backbone.named_parameters() if not k.startswith(("stem", "patch"))}  # noqa: E731
    assert trunk(conv) == trunk(patch)
    with pytest.raises(ConfigError, match="vit-tiny-conv"):
        get_method("ibaformer")(conv.cfg.replace(backbone="cnn"), DIGITS)


@pytest.mark.parametrize(("mode", "form"), [("mean", None), ("element", None), ("element", "bank"), ("mean", "sa")])
def test_eval_form_option_reaches_every_iba_block(mode: str, form: str | None) -> None:
    opts = {"eval_form": form} if form else {}
    model = _model(mode=mode, iba_blocks="all", momentum=0.3, bank_size=5, **opts)
    layers = _iba_layers(model)
    assert len(layers) == 6 and model.opts["eval_form"] == (form or "running")
    assert all(m.eval_form == (form or "running") and m.momentum == 0.3 and m.bank_size == 5 for m in layers)


def test_option_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="mode=element"):
        _model(mode="mean", eval_form="bank")
    with pytest.raises(ConfigError, match="eval_form"):
        _model(eval_form="batch")
    with pytest.raises(ConfigError, match="momentum"):
        _model(momentum=0)


def test_trained_model_evaluates_each_image_alone_from_its_training_statistics() -> None:
    model = _model(mode="element", iba_blocks="last2", bank_size=8, eval_form="bank")
    model.train()
    with torch.no_grad():
        for s in range(3):  # training forwards fill the statistics of every IBA block
            model.classify(_images(16, seed=s))
    layers = _iba_layers(model)
    assert all(m.has_statistics and int(m.num_batches_tracked) == 3 and m.bank_k.shape[0] == 8 for m in layers)
    model.eval()
    x, mates = _images(), _images(seed=9)
    with torch.no_grad():
        out = model.classify(x)
        swapped = model.classify(torch.cat([x[:4], mates[4:]]))[:4]
        alone = torch.cat([model.classify(x[i : i + 1]) for i in range(4)])
        for m in layers:
            m.eval_form = "sa"
        sa_only = model.classify(x)
    torch.testing.assert_close(swapped, out[:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, out[:4], atol=1e-5, rtol=1e-5)
    assert (out - sa_only).abs().max() > 1e-4  # the statistics are used, not self-attention alone


def test_old_run_directory_loads_and_evaluates_as_before(tmp_path: Path) -> None:
    """A run written before the running statistics (no eval_form/momentum/bank_size options, no statistics in
    the checkpoint, backbone vit-tiny) loads and its independent eval is self-attention alone, as it was."""
    run = tmp_path / "run"
    assert main(["train", "--method", "ibaformer", *FAST, "--backbone", "vit-tiny", "--max-steps", "3",
                 "--out", str(run)]) == 0
    new = Method.from_checkpoint(run)
    assert all(m.has_statistics for m in _iba_layers(new))
    ckpt = run / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    for key in ("eval_form", "momentum", "bank_size"):
        del state["batchmates"]["cfg"]["options"][key]
    stats = ("running_k", "running_v", "bank_k", "bank_v", "num_batches_tracked", "train_batch_size")
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if k.rsplit(".", 1)[-1] not in stats}
    torch.save(state, ckpt)
    old = Method.from_checkpoint(run)
    assert old.cfg.backbone == "vit-tiny" and not any(m.has_statistics for m in _iba_layers(old))
    for m in _iba_layers(new):
        m.eval_form = "sa"
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(old.classify(x), new.classify(x), atol=0, rtol=0)


@pytest.mark.slow
def test_default_budget_learns_digits(tmp_path: Path) -> None:
    """The `make demo` row: the method's own digits defaults reach >= 80% top-1 (independent eval)."""
    out = tmp_path / "run"
    assert main(["train", "--method", "ibaformer", *FAST, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 * (1347 // 64) and metrics["test_acc"] >= 0.8, metrics["test_acc"]
