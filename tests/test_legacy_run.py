"""A run directory written before the trainer was split (tests/data/legacy-run-ce: `batchmates train --method ce
--data digits --epochs 1 --threads 1`, tb/ and curves.png removed) still loads, resumes and evaluates, and the
names it was written with still import from their old paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from batchmates.cli import main
from batchmates.config import RunConfig

LEGACY = Path(__file__).resolve().parent / "data" / "legacy-run-ce"


@pytest.fixture()
def legacy(tmp_path: Path) -> Path:
    d = tmp_path / "legacy"
    shutil.copytree(LEGACY, d)
    return d


def _metrics(d: Path) -> dict:
    return json.loads((d / "metrics.json").read_text())


def test_from_checkpoint_rebuilds_the_legacy_run_without_its_dataset(monkeypatch, legacy: Path) -> None:
    import batchmates.data
    from batchmates.methods import Method, get_method

    def no_data(*a, **k):
        raise AssertionError("from_checkpoint must not load the dataset")

    monkeypatch.setattr(batchmates.data, "load_dataset", no_data)
    model = Method.from_checkpoint(legacy)
    assert type(model) is get_method("ce") and not model.training
    assert model.cfg == RunConfig.from_yaml(str(legacy / "config.yaml")).replace(out=str(legacy))
    assert (model.info.name, model.info.num_classes, model.info.image_size) == ("digits", 10, 8)
    saved = torch.load(legacy / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items()) and saved.keys() == model.state_dict(
    ).keys()
    # a checkpoint file works as well as its directory; a subclass refuses another method's run
    assert type(Method.from_checkpoint(legacy / "last.ckpt")) is type(model)
    with pytest.raises(RuntimeError, match="holds a 'ce' run"):
        get_method("supcon").from_checkpoint(legacy)


def test_legacy_model_reproduces_its_recorded_test_accuracy(legacy: Path) -> None:
    from batchmates.data import load_dataset
    from batchmates.methods import Method
    from batchmates.training.evaluate import classifier_accuracy

    model = Method.from_checkpoint(legacy)
    acc = classifier_accuracy(model, load_dataset("digits").test)
    assert acc == pytest.approx(_metrics(LEGACY)["test_acc"], abs=1e-6)


def test_finished_legacy_run_resumes_and_keeps_its_curve(legacy: Path, capsys) -> None:
    before = _metrics(legacy)
    text = (legacy / "metrics.json").read_bytes()
    # --resume of a finished run says so and changes nothing (issue 12)
    assert main(["train", "--resume", str(legacy), "--no-progress", "--threads", "1"]) == 0
    assert "finished run" in capsys.readouterr().out and (legacy / "metrics.json").read_bytes() == text
    # --reevaluate evaluates it again from its checkpoint, merging into what metrics.json held
    before["eval"]["corruptions"] = {"mean": 0.5}  # as `batchmates eval --corruptions` would have added
    (legacy / "metrics.json").write_text(json.dumps(before))
    assert main(["train", "--resume", str(legacy), "--reevaluate", "--no-progress", "--threads", "1"]) == 0
    after = _metrics(legacy)
    assert after["finished"] and after["resumed"] == before["resumed"] and after["steps"] == before["steps"] == 21
    assert after["curve"] == before["curve"]  # History's state was stored under its old callback name
    assert after["test_acc"] == pytest.approx(before["test_acc"], abs=1e-6)
    assert after["eval"]["knn"] == pytest.approx(before["eval"]["knn"], abs=1e-6)
    assert after["eval"]["corruptions"] == {"mean": 0.5}  # merged, never dropped


def test_legacy_run_evaluates(legacy: Path, capsys) -> None:
    before = _metrics(legacy)
    assert main(["eval", str(legacy), "--protocol", "knn", "--protocol", "accuracy"]) == 0
    ev = _metrics(legacy)["eval"]
    assert ev["knn"] == pytest.approx(before["eval"]["knn"], abs=1e-6)
    assert ev["accuracy"]["top1"] == pytest.approx(before["test_acc"], abs=1e-6)
    assert ev["linear"] == before["eval"]["linear"]  # not rerun, kept


def test_old_import_paths_still_resolve() -> None:
    import batchmates.config as config
    import batchmates.io as io
    import batchmates.methods.base as base
    import batchmates.training.config as tconfig
    import batchmates.training.io as tio
    import batchmates.training.run as run
    from batchmates.training import data, rundir

    for name in ("Option", "ConfigError", "RunConfig", "parse_opt_assignments", "PROTOCOLS"):
        assert getattr(tconfig, name) is getattr(config, name)
    for name in ("atomic_write_json", "atomic_write_text", "read_json", "atomic_save_torch"):
        assert getattr(tio, name) is getattr(io, name)
    assert run.load_run is rundir.load_run and run.apply_label_noise is data.apply_label_noise
    assert run.RunError is config.RunError and run.CKPT_FILE == "last.ckpt"
    assert base.DataInfo is config.DataInfo and base.DEFAULT_SETTINGS is config.DEFAULT_SETTINGS
    from batchmates.models import set_eval_mode
    from batchmates.seeding import step_seed

    assert base.step_seed is step_seed and base.set_eval_mode is set_eval_mode
