"""The run-setting schema: CLI flags derived from it, validation before anything runs, resolved configs, and the
floors (the config vocabulary imports nothing above it; methods never import the trainer)."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import torch

from batchmates import cli
from batchmates.config import AUTO_SETTINGS, SETTINGS, TYPES, ConfigError, RunConfig, settings_from_args
from batchmates.methods import DataInfo, available_methods, get_method

SRC = Path(__file__).resolve().parents[1] / "src" / "batchmates"
LEGACY = Path(__file__).resolve().parent / "data" / "legacy-run-ce"
DIGITS = DataInfo("digits", 10, 1, 8, (0.5,), (0.25,), 1347, False)


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _setting_actions(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions if a.dest in SETTINGS}


@pytest.mark.parametrize("command, excluded", [("train", set()), ("compare", {"method", "seed", "out"})])
def test_cli_flags_are_generated_from_the_schema(command: str, excluded: set[str]) -> None:
    actions = _setting_actions(_subparser(command))
    with_flag = {n for n, s in SETTINGS.items() if s.flag != ""}
    if command == "compare":  # compare's own --out is its output directory, not the run setting
        actions.pop("out")
    assert set(actions) == with_flag - excluded
    for name, action in actions.items():
        s = SETTINGS[name]
        assert action.option_strings == [s.cli_flag(name)]
        assert s.help in action.help
        assert (tuple(action.choices) if action.choices else None) == s.choices
        assert action.default is argparse.SUPPRESS  # "not given" is distinguishable from every value


def test_parsed_flags_have_the_schema_types() -> None:
    args = _subparser("train").parse_args(["--epochs", "3", "--lr", "0.5", "--no-progress", "--download",
                                           "--protocol", "knn", "--protocol", "linear", "--checkpoint-every", "7"])
    given = settings_from_args(args)
    assert given == {"epochs": 3, "lr": 0.5, "progress": False, "download": True, "eval_protocols": ["knn", "linear"],
                     "checkpoint_every_n_steps": 7}
    assert all(isinstance(v, TYPES[k][0]) for k, v in given.items())
    assert settings_from_args(_subparser("train").parse_args([])) == {}


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"epochs": 0}, "epochs must be >= 1 (got 0); fix --epochs"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"max_steps": 0}, "max_steps must be -1 (no limit) or >= 1"),
        ({"momentum": 1.0}, "momentum must be in [0, 1)"),
        ({"label_noise": -0.1}, "label_noise must be a fraction in [0, 1)"),
        ({"optimizer": "adam"}, "optimizer='adam': choose one of ['sgd', 'adamw', 'lars'] (--optimizer)"),
        ({"eval_protocols": ["knn", "top5"]}, "eval_protocols=['top5']: choose one of"),
        ({"seed": 1.5}, "seed must be an integer (got 1.5)"),
        ({"devices": True}, "devices must be an integer"),
        ({"method": ""}, "method must be a non-empty string"),
        ({"options": ["x"]}, "options must be a mapping"),
        ({"batch_size": 63, "devices": 2}, "must be divisible by devices=2"),
        ({"download": None}, "download must be set"),
    ],
)
def test_validate_names_the_setting_and_the_fix(change: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        RunConfig(**change).validate()
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"data": "no-such-set"}, "unknown dataset 'no-such-set'"),
        ({"backbone": "resnet9000"}, "backbone='resnet9000' is not registered; choose one of"),
        ({"attn_layer": "cbam"}, "attn_layer='cbam' is not registered"),
        ({"method": "nope"}, "method='nope' is not registered"),
    ],
)
def test_resolve_checks_registry_names_without_loading_anything(change: dict, needle: str) -> None:
    with pytest.raises(ValueError) as e:
        RunConfig(**change).resolve()
    assert needle in str(e.value)


@pytest.mark.parametrize("method", available_methods())
def test_resolved_config_is_concrete_and_stable(method: str) -> None:
    cls = get_method(method)
    cfg = RunConfig(method=method, data="digits").resolve(cls)
    assert all(getattr(cfg, name) is not None for name in AUTO_SETTINGS)
    assert set(cfg.options) == set(cls.options)
    assert cfg.resolve(cls) == cfg
    # the method's resolved options rebuild the same model, and resolving again changes nothing
    torch.manual_seed(0)
    model = cls(cfg, DIGITS)
    resolved = model.resolved_config
    assert resolved.resolve(cls) == resolved
    again = cls(resolved, DIGITS)
    assert again.resolved_config == resolved
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method, key, auto", [("btn", "mla_tokens", 0), ("batchformer", "dim_feedforward", 0)])
def test_automatic_options_are_written_resolved(method: str, key: str, auto: int) -> None:
    cls = get_method(method)
    cfg = RunConfig(method=method, data="digits").resolve(cls)
    assert cfg.options[key] == auto  # "the method chooses"
    model = cls(cfg, DIGITS)
    assert model.resolved_config.options[key] not in (auto, None)
    ckpt: dict = {}
    model.on_save_checkpoint(ckpt)
    assert ckpt["batchmates"]["cfg"]["options"][key] == model.resolved_config.options[key]
    with pytest.raises(KeyError, match="no option"):
        model.resolve_option("no_such_option", 1)


def test_legacy_config_yaml_still_loads_and_resolves_unchanged() -> None:
    cfg = RunConfig.from_yaml(str(LEGACY / "config.yaml"))
    assert cfg.method == "ce" and cfg.epochs == 1 and cfg.options == {"label_smoothing": 0.0}
    assert cfg.resolve() == cfg


def test_cli_rejects_an_unknown_dataset_before_loading(capsys, tmp_path) -> None:
    code = cli.main(["train", "--method", "ce", "--data", "mnist-typo", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "mnist-typo" in err and "fashion-mnist" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing ran


# ---------------------------------------------------------------------------------------------- floors
BOTTOM = {"batchmates.config", "batchmates.options", "batchmates.schema", "batchmates.io", "batchmates.seeding",
          "batchmates.registry", "batchmates.distributed"}


def _imports(path: Path) -> set[str]:
    """Every batchmates module ``path`` imports, at any depth of the file (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == "batchmates" or m.startswith("batchmates.")}


@pytest.mark.parametrize("module", sorted(BOTTOM - {"batchmates.distributed"}))
def test_bottom_floor_imports_only_the_bottom_floor(module: str) -> None:
    path = SRC / (module.split(".", 1)[1] + ".py")
    assert _imports(path) <= BOTTOM, _imports(path) - BOTTOM


def test_methods_never_import_the_trainer_and_nothing_borrows_from_run() -> None:
    for path in sorted((SRC / "methods").glob("*.py")):
        assert not {m for m in _imports(path) if m.startswith("batchmates.training")}, path.name
    for path in (SRC / "training" / "evaluate.py", SRC / "methods" / "curation.py"):
        assert "batchmates.training.run" not in _imports(path), path.name
    # compare calls train/resume (that is its job) and names the hardware, but takes nothing else from run.py
    tree = ast.parse((SRC / "training" / "compare.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "batchmates.training.run"
             for a in n.names}
    assert names <= {"train", "resume", "hardware_string"}


def test_train_rejects_a_bad_method_option_before_writing_anything(capsys, tmp_path) -> None:
    # 7 heads cannot split the CNN's 128 features: found when the method is built, before any file is written
    code = cli.main(["train", "--method", "batchformer", "--opt", "num_heads=7", "--epochs", "1", "--threads", "1",
                     "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "num_heads=7 must divide" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
