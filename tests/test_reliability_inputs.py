"""Every bad input of tests/_faults.py is one clear error (issue 12): the expected exit status, no
traceback, the words that name the input and the fix; nothing silent. In this process, through the CLI's main;
``scripts/fault_inputs.py`` runs the same cases as subprocesses for docs/reliability.md."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _faults import CASES, Scratch, run_case, write_fashion

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Scratch:
    return Scratch(tmp_path_factory.mktemp("faults"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_error(scratch: Scratch, case) -> None:
    outcome = run_case(case, scratch)
    if outcome.status == "skipped":
        pytest.skip(outcome.why)
    assert outcome.status == "clear", f"{outcome.status}: {outcome.why}\n{outcome.text[-3000:]}"


def test_the_classifier_sees_tracebacks_and_silence(scratch: Scratch) -> None:
    from _faults import Case

    silent = run_case(Case("t", "an input that is accepted", lambda s: ["methods", "ce"], 2, ("error",)), scratch)
    assert silent.status == "silent"
    wrong_words = run_case(Case("t", "words", lambda s: ["train", "--epochs", "0"], 2, ("no such words",)), scratch)
    assert wrong_words.status == "unclear"


def test_nan_run_keeps_its_last_good_checkpoint(scratch: Scratch) -> None:
    case = next(c for c in CASES if "NaN" in c.name)
    argv = case.stage(scratch)
    from batchmates.cli import main

    assert main(argv + ["--checkpoint-every", "2"]) == 1
    out = Path(argv[argv.index("--out") + 1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] is False and metrics["failed"]["step"] >= 1
    state = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] < metrics["failed"]["step"]
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_damaged_gzip_names_the_file(tmp_path: Path) -> None:
    from batchmates.data import load_dataset
    from batchmates.data.datasets import DatasetCorruptError

    d = write_fashion(tmp_path / "data")
    assert len(load_dataset("fashion-mnist", data_dir=d).train) == 12
    raw = gzip.decompress((d / "train-images-idx3-ubyte.gz").read_bytes())
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw)[:-9])  # truncated trailer
    with pytest.raises(DatasetCorruptError, match="train-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", data_dir=d)


def test_cheap_commands_do_not_import_torch(tmp_path: Path) -> None:
    """--help, a bad flag, a bad option and `methods` (once its registry snapshot is cached) answer without torch."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT / "src")}
    code = ("import sys\nfrom batchmates.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'lightning') if m in sys.modules))")

    def heavy(*argv: str) -> str:
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300)
        return r.stdout.strip().splitlines()[-1]

    for argv in (["--help"], ["train", "--help"], ["train", "--epochs", "abc"], ["methods"], ["methods", "swav"],
                 ["train", "--method", "ce", "--opt", "nope=1"], ["train", "--method", "nope"],
                 ["train", "--data", "nope"], ["compare", "--methods", "ce,nope"]):
        # (re)build the snapshot first: on a shared checkout another edit of the sources invalidates it any time
        subprocess.run([sys.executable, "-m", "batchmates", "methods"], env=env, capture_output=True, timeout=300)
        assert heavy(*argv) == "HEAVY []", argv


def test_help_texts_show_no_empty_defaults() -> None:
    from batchmates.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name, sub in subs.items():
        text = " ".join(sub.format_help().split())
        assert "(default: None)" not in text, name
    assert "(default: 0)" in " ".join(subs["train"].format_help().split())  # real defaults are still shown (--seed)
