"""The ``supcon``, ``simclr`` and ``barlow`` methods: CLI smoke runs on digits, the wiring of each loss against
independent references (lightly, pytorch-metric-learning), the projector/head structure, and option errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchmates import cli
from batchmates.methods import DataInfo, get_method
from batchmates.training.config import ConfigError, RunConfig

DIGITS = DataInfo(name="digits", num_classes=10, in_channels=1, image_size=8, mean=(0.26,), std=(0.37,),
                  train_size=1347, hflip=False)
SMOKE = ["--data", "digits", "--epochs", "1", "--max-steps", "6", "--batch-size", "64", "--threads", "1",
         "--no-progress", "--protocol", "knn", "--protocol", "linear"]


def make(method: str, data: DataInfo = DIGITS, **opts) -> torch.nn.Module:
    cls = get_method(method)
    cfg = RunConfig(method=method, data=data.name, options=opts).resolve(cls)
    return cls(cfg, data)


@pytest.mark.parametrize("method", ["supcon", "simclr", "barlow"])
def test_cli_smoke_run_on_digits(method: str, tmp_path: Path) -> None:
    out = tmp_path / method
    assert cli.main(["train", "--method", method, *SMOKE, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["finished"] and metrics["steps"] == 6
    assert metrics["accuracy_source"] == "linear_probe"  # no classifier of its own: the trainer's probe
    assert metrics["test_acc"] > 0.3 and metrics["eval"]["knn"]["k20"] > 0.3  # chance is 0.1
    loss = metrics["curve"][-1]["train_loss"]
    assert loss == loss and abs(loss) < 1e6
    cfg = RunConfig.from_yaml(str(out / "config.yaml"))
    assert cfg.options["curate"] == "none"


def test_simclr_loss_is_lightly_ntxent() -> None:
    from lightly.loss import NTXentLoss

    model = make("simclr", temperature=0.2).double()
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(12, 16, generator=g, dtype=torch.float64), torch.randn(12, 16, generator=g,
                                                                                 dtype=torch.float64)
    ours = model.contrastive_loss(F.normalize(z1, dim=1), F.normalize(z2, dim=1), None, None)
    ref = NTXentLoss(temperature=0.2)(z1, z2)
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-10, atol=1e-10)


def test_supcon_loss_is_pml_supcon_scaled() -> None:
    from pytorch_metric_learning.losses import SupConLoss as PMLSupCon

    model = make("supcon")  # temperature 0.1 (recipe), base_temperature 0.07 (official)
    g = torch.Generator().manual_seed(1)
    z1 = F.normalize(torch.randn(16, 8, generator=g, dtype=torch.float64), dim=1)
    z2 = F.normalize(torch.randn(16, 8, generator=g, dtype=torch.float64), dim=1)
    y = torch.arange(16) % 5
    ours = model.contrastive_loss(z1, z2, y, None)
    ref = PMLSupCon(temperature=0.1)(torch.cat([z1, z2]), torch.cat([y, y])) * (0.1 / 0.07)
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-8, atol=1e-8)
    # simclr ignores labels: positives are the two views only
    assert not torch.allclose(ours, make("simclr").contrastive_loss(z1, z2, None, None).to(ours.dtype))


def test_supcon_head_and_training_step_shapes() -> None:
    model = make("supcon", proj_dim=32)
    lin = [m for m in model.head if isinstance(m, nn.Linear)]
    assert [m.out_features for m in lin] == [model.backbone.feature_dim, 32]
    x = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    z = model.project(model.normalize(x))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(16))
    loss, extra = model.compute_loss((x, torch.arange(16) % 4))
    loss.backward()
    assert torch.isfinite(loss) and extra == {}
    assert all(p.grad is not None for p in model.head.parameters())
    assert model.embed(model.normalize(x)).shape == (16, model.backbone.feature_dim)


def test_barlow_projector_and_loss_reference() -> None:
    from lightly.loss import BarlowTwinsLoss as LightlyBT

    model = make("barlow")
    lins = [m for m in model.projector if isinstance(m, nn.Linear)]
    bns = [m for m in model.projector if isinstance(m, nn.BatchNorm1d)]
    assert len(lins) == 3 and len(bns) == 2 and all(m.bias is None for m in lins)
    assert lins[-1].out_features == 512  # auto width on 8 px images
    assert make("barlow", proj_dim=64).projector[-1].out_features == 64
    info32 = DataInfo(name="cifar10", num_classes=10, in_channels=3, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert make("barlow", info32, proj_dim=0).projector[-1].out_features == 2048
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(32, 24, generator=g, dtype=torch.float64), torch.randn(32, 24, generator=g,
                                                                                 dtype=torch.float64)
    ours = model.barlow_loss(z1, z2, None)
    ref = LightlyBT(lambda_param=0.0051, gather_distributed=False)(z1, z2)
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-6, atol=1e-6)


def test_barlow_views_are_asymmetric() -> None:
    model = make("barlow")
    ops = [[type(op).__name__ for op in aug.modules()] for aug in (model.train_augment.aug1, model.train_augment.aug2)]
    assert "RandomSolarize" not in " ".join(ops[0]) and "RandomSolarize" in " ".join(ops[1])
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    torch.manual_seed(0)
    v1, v2 = model.train_views(x)
    assert v1.shape == v2.shape == (8, 1, 8, 8) and not torch.equal(v1, v2)


@pytest.mark.parametrize(
    "method, opts, needle",
    [
        ("simclr", {"curate": "frd"}, "option curate='frd': choose one of"),
        ("supcon", {"curate_policy": "keep"}, "option curate_policy='keep'"),
        ("barlow", {"curate": "frd-pairwise", "curate_policy": "reweight"}, "not defined for method 'barlow'"),
        ("simclr", {"curate": "frd-pairwise", "curate_extractor": "vgg:/x"}, "unknown extractor 'vgg'"),
        ("simclr", {"curate": "frd-pairwise", "curate_extractor": "resnet18:/nonexistent/r18.pth"},
         "/nonexistent/r18.pth"),
        ("simclr", {"curate": "frd-pairwise", "curate_quantile": 1.5}, "curate_quantile=1.5: must be <= 1.0"),
        ("simclr", {"temperature": 0}, "temperature=0.0: must be >="),
    ],
)
def test_bad_options_raise_clear_config_errors(method: str, opts: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        make(method, **opts)
    assert needle in str(e.value)


def test_cli_curate_flag_and_bad_value(tmp_path: Path, capsys) -> None:
    code = cli.main(["train", "--method", "simclr", "--curate", "frd-bogus", "--no-progress",
                     "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "curate='frd-bogus'" in err and "frd-pairwise" in err and "Traceback" not in err
    code = cli.main(["train", "--method", "barlow", "--curate", "frd-pairwise", "--opt", "curate_policy=reweight",
                     "--no-progress", "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err
    assert code == 2 and "curate_policy='reweight' is not defined for method 'barlow'" in err
