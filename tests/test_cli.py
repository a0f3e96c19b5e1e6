"""The `batchmates` command: help texts, argument errors (message names the argument, exit != 0, no traceback),
the missing-data message, `methods`, `data list`, and `bench` reporting modules that do not exist yet."""

from __future__ import annotations

import json

import pytest

from batchmates import cli


@pytest.mark.parametrize("argv", [[], ["train"], ["eval"], ["compare"], ["data"], ["data", "list"], ["methods"],
                                  ["bench"]])
def test_help(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: batchmates" in out
    if argv and argv[0] in ("train", "eval", "compare"):
        assert "examples:" in out


def test_no_command_prints_help(capsys) -> None:
    assert cli.main([]) == 2
    assert "train" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--method", "ce", "--epochs", "0"], "epochs must be >= 1"),
        (["train", "--method", "nope"], "method='nope' is not registered; choose one of"),
        (["train", "--method", "ce", "--opt", "tempreature=0.1"], "unknown option(s) ['tempreature']"),
        (["train", "--method", "ce", "--opt", "label_smoothing=abc"], "option label_smoothing='abc'"),
        (["train", "--method", "ce", "--opt", "novalue"], "expected key=value"),
        (["train", "--method", "ce", "--label-noise", "1.5"], "label_noise must be a fraction"),
        (["train", "--method", "ce", "--batch-size", "0"], "batch_size must be >= 1"),
        (["compare", "--methods", "ce,nope", "--seeds", "1"], "method='nope' is not registered"),
        (["compare", "--methods", "ce", "--seeds", "0"], "--seeds must be >= 1"),
        (["compare", "--methods", "ce", "--opt", "label_smoothing=0.1"], "prefix the method"),
    ],
)
def test_bad_arguments_exit_nonzero_with_message(argv, needle, capsys, tmp_path) -> None:
    code = cli.main([*argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code != 0
    assert needle in err
    assert "Traceback" not in err


def test_unknown_backbone_lists_choices(capsys, tmp_path) -> None:
    code = cli.main(["train", "--method", "ce", "--backbone", "resnet9000", "--epochs", "1", "--no-progress",
                     "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code != 0 and "resnet9000" in err and "resnet-small" in err and "Traceback" not in err


def test_missing_fashion_mnist_message(monkeypatch, tmp_path, capsys) -> None:
    from batchmates.data.datasets import fashion_mnist as datasets

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-copy")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BATCHMATES_DATA", raising=False)
    code = cli.main(["train", "--method", "ce", "--data", "fashion-mnist", "--data-dir", str(empty),
                     "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert "fashion-mnist" in err and str(empty) in err  # where it looked
    assert "apt-get install dataset-fashion-mnist" in err and "--download" in err  # the two ways to get it


def test_resume_without_checkpoint_is_clear(tmp_path, capsys) -> None:
    code = cli.main(["train", "--resume", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "config.yaml" in err and "Traceback" not in err


def test_methods_lists_ce_and_its_options(capsys) -> None:
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "ce (supervised)" in out and "label_smoothing" in out and "defaults on digits" in out
    assert cli.main(["train", "--method", "ce", "--help-method"]) == 0
    assert "label_smoothing: float, default 0.0" in capsys.readouterr().out


def test_data_list_shows_digits_present(capsys) -> None:
    assert cli.main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "fashion-mnist" in out and "yes" in out


def test_bench_reports_missing_module_and_updates_doc(monkeypatch, tmp_path, capsys) -> None:
    from batchmates.bench import runner

    monkeypatch.setattr(runner, "BENCH_GROUPS", {"losses": ("no_such_bench_module",)})  # the table lives there
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro kept\n")
    code = cli.main(["bench", "losses", "--quick", "--out", str(tmp_path / "bench"), "--doc", str(doc)])
    assert code == 0
    assert "not available" in capsys.readouterr().out
    data = json.loads((tmp_path / "bench" / "losses-cpu-quick.json").read_text())
    assert data["rows"] == [] and "not available" in data["notes"][0]
    text = doc.read_text()
    assert "intro kept" in text and text.count("<!-- bench:losses (cpu, quick) -->") == 1
    cli.main(["bench", "losses", "--quick", "--out", str(tmp_path / "bench"), "--doc", str(doc)])
    # the section is replaced, not appended again
    assert doc.read_text().count("<!-- bench:losses (cpu, quick) -->") == 1
