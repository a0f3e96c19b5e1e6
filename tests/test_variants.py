"""Named variants: the compact grammar, variants files, the variant -> run-directory mapping, and `compare` running
variants (every configuration checked before the first run; reruns skip, a changed configuration is refused)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from batchmates.cli import main
from batchmates.config import ConfigError, RunConfig
from batchmates.training.compare import plan_runs, resolve_variants
from batchmates.training.variants import Variant, load_variants_file, parse_variant, variant_dir

FAST = ["--data", "digits", "--threads", "1", "--no-progress", "--epochs", "1", "--max-steps", "4",
        "--protocol", "accuracy"]


@pytest.mark.parametrize(
    "spec, name, method, settings, options",
    [
        ("ce", "ce", "ce", {}, {}),
        ("ce@noise0.4", "ce@noise0.4", "ce", {"label_noise": 0.4}, {}),
        ("simclr@b32+curate=frd-pairwise", "simclr@b32+curate=frd-pairwise", "simclr", {"batch_size": 32},
         {"curate": "frd-pairwise"}),
        ("se:ce@attn_layer=se@ep3", "se", "ce", {"attn_layer": "se", "epochs": 3}, {}),
        ("ssl/simclr:simclr@eval-protocols=knn,linear@steps200@lr1e-3", "ssl/simclr", "simclr",
         {"eval_protocols": ["knn", "linear"], "max_steps": 200, "lr": 1e-3}, {}),
        ("ce@data=imagefolder:/tmp/x", "ce@data=imagefolder:/tmp/x", "ce", {"data": "imagefolder:/tmp/x"}, {}),
        ("ce@deterministic=yes@threads=none+label-smoothing=0.1",
         "ce@deterministic=yes@threads=none+label-smoothing=0.1", "ce", {"deterministic": True, "threads": None},
         {"label_smoothing": "0.1"}),
    ],
)
def test_parse_variant(spec: str, name: str, method: str, settings: dict, options: dict) -> None:
    v = parse_variant(spec)
    assert (v.name, v.method, v.settings, v.options) == (name, method, settings, options)


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("ce@bogus", "must be KEY=VALUE or a shorthand"),
        ("ce@seed=3", "not a run setting a variant may set"),
        ("ce@method=supcon", "not a run setting a variant may set"),
        ("ce+novalue", "must be KEY=VALUE"),
        ("@b32", "the method is missing"),
        ("ce@b3x", "must be KEY=VALUE or a shorthand"),
        ("ce@epochs=two", "not a valid int"),
        ("", "expected METHOD"),
    ],
)
def test_bad_variant_specs_name_the_problem(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_variant(spec)
    assert needle in str(e.value)


def test_variant_dir_is_the_name_when_safe_and_a_stable_hash_otherwise() -> None:
    assert variant_dir("ce") == "ce"
    assert variant_dir("simclr@b32+curate=frd-pairwise") == "simclr@b32+curate=frd-pairwise"
    assert variant_dir("ssl/simclr") == str(Path("ssl") / "simclr")
    odd = variant_dir("ce@data=imagefolder:/data/x y")
    assert odd == variant_dir("ce@data=imagefolder:/data/x y")  # deterministic: a rerun finds its runs
    assert "/" not in odd and ":" not in odd and " " not in odd and len(odd.rsplit("-", 1)[1]) == 8
    assert odd != variant_dir("ce@data=imagefolder:/data/x_y")
    assert variant_dir("../escape") != "../escape" and ".." not in Path(variant_dir("../escape")).parts


def test_variants_must_have_distinct_names_and_directories() -> None:
    with pytest.raises(ConfigError, match="two different variants are named 'x'"):
        resolve_variants(["x:ce", "x:ce@noise0.2"], "digits")
    assert [v.name for v in resolve_variants(["ce", "ce"], "digits")] == ["ce"]
    assert [v.name for v in resolve_variants("ce,supcon", "digits")] == ["ce", "supcon"]


def test_variants_file(tmp_path: Path) -> None:
    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump({
        "seeds": 2,
        "settings": {"data": "digits", "epochs": 1, "max-steps": 3},
        "variants": {"plain": "ce", "noisy": {"method": "ce", "label_noise": 0.2, "options": {"label_smoothing": 0.1}},
                     "shift": {"method": "ce", "corruptions": True}},
    }, sort_keys=False))
    variants, settings, seeds = load_variants_file(str(f))
    assert seeds == 2 and settings == {"data": "digits", "epochs": 1, "max_steps": 3}
    assert variants == [Variant("plain", "ce"), Variant("noisy", "ce", {"label_noise": 0.2}, {"label_smoothing": 0.1}),
                        Variant("shift", "ce", corruptions=True)]
    f.write_text(yaml.safe_dump({"variants": [{"method": "ce", "batch_size": 32}, "ce@noise0.1"]}, sort_keys=False))
    assert [v.name for v in load_variants_file(str(f))[0]] == ["ce@batch_size=32", "ce@noise0.1"]
    for bad, needle in [({"variants": ["ce"], "seed": 1}, "unknown key(s) ['seed']"), ({"settings": {}}, "'variants'"),
                        ({"variants": [{"label_noise": 0.1}]}, "needs 'method'"),
                        ({"variants": {"x": {"method": "ce", "corruptions": "yes"}}}, "true or false")]:
        f.write_text(yaml.safe_dump(bad, sort_keys=False))
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            load_variants_file(str(f))


def test_plan_checks_every_run_before_any_runs(tmp_path: Path) -> None:
    variants = [parse_variant("ce"), parse_variant("ce@noise1.5")]
    with pytest.raises(ConfigError, match="variant 'ce@noise1.5': label_noise must be a fraction"):
        plan_runs(variants, RunConfig(), [0, 1], str(tmp_path / "cmp"))
    with pytest.raises(ConfigError, match="unknown option"):
        plan_runs([parse_variant("ce"), parse_variant("ce+nope=1")], RunConfig(), [0], str(tmp_path / "cmp"))
    plans = plan_runs([parse_variant("ce"), parse_variant("ce@b32")], RunConfig(), [0, 1], str(tmp_path / "cmp"))
    # seed by seed; each plan resolved, in its own directory
    assert [(p.variant.name, p.seed) for p in plans] == [("ce", 0), ("ce@b32", 0), ("ce", 1), ("ce@b32", 1)]
    assert [p.cfg.batch_size for p in plans] == [64, 32, 64, 32]
    assert plans[1].cfg.out == str(tmp_path / "cmp" / "ce@b32" / "seed0")


def test_compare_cli_checks_all_configs_before_the_first_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    code = main(["compare", "--variants", "ce", "ce@noise0.2+label_smoothing=2", *FAST, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "label_smoothing=2.0: must be <=" in err
    assert not out.exists()  # nothing trained
    # checks a method makes only when it is built (7 heads cannot split the CNN's 128 features) also come first
    code = main(["compare", "--variants", "ce", "batchformer+num_heads=7", *FAST, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "variant 'batchformer+num_heads=7': option num_heads=7 must divide" in err
    assert not out.exists()


def test_compare_runs_variants_resumably(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--variants", "ce", "ce@noise0.4", "nb:ce@b32+label_smoothing=0.1", *FAST, "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["methods"] == ["ce", "ce@noise0.4", "nb"] and not res["failed"]
    assert res["variants"]["nb"] == {"method": "ce", "settings": {"batch_size": 32},
                                     "options": {"label_smoothing": "0.1"}, "dir": "nb"}
    noisy = RunConfig.from_yaml(str(out / "ce@noise0.4" / "seed0" / "config.yaml"))
    nb = RunConfig.from_yaml(str(out / "nb" / "seed0" / "config.yaml"))
    assert noisy.label_noise == 0.4 and noisy.max_steps == 4 and (nb.batch_size, nb.options) == (32, {
        "label_smoothing": 0.1})
    assert json.loads((out / "ce" / "seed0" / "metrics.json").read_text())["label_noise"] == 0.0
    md = (out / "results.md").read_text()
    assert "| variant |" in md and "| ce@noise0.4 |" in md and "label noise 40%" in md and "max 4 steps" in md
    # a rerun skips every finished run
    assert main(argv) == 0
    assert all(r["action"].startswith("skipped") for r in json.loads((out / "results.json").read_text())["runs"])
    # the same names with another configuration are refused before anything runs
    capsys.readouterr()
    assert main([*argv[:-2], "--batch-size", "16", "--out", str(out)]) == 2
    assert "holds a run of another configuration (batch_size: 64 there, 16 now)" in capsys.readouterr().err


def test_compare_cli_variants_file_and_flags_precedence(tmp_path: Path) -> None:
    f = tmp_path / "v.yaml"
    f.write_text(yaml.safe_dump({"seeds": 1, "settings": {"data": "digits", "epochs": 3, "max_steps": 2},
                                 "variants": {"a": "ce", "b": "ce@steps3"}}, sort_keys=False))
    out = tmp_path / "cmp"
    # file settings < flags < the variant's own settings
    assert main(["compare", "--variants-file", str(f), "--epochs", "1", "--max-steps", "4", "--threads", "1",
                 "--no-progress", "--protocol", "accuracy", "--out", str(out)]) == 0
    a = RunConfig.from_yaml(str(out / "a" / "seed0" / "config.yaml"))
    b = RunConfig.from_yaml(str(out / "b" / "seed0" / "config.yaml"))
    assert (a.epochs, a.max_steps, b.max_steps) == (1, 4, 3)


def test_the_documented_study_file_plans_every_run(tmp_path: Path) -> None:
    """docs/study.yaml (the command of docs/results.md) resolves: 25 variants x 3 seeds, in the old layout."""
    study = Path(__file__).resolve().parents[1] / "docs" / "study.yaml"
    variants, settings, seeds = load_variants_file(str(study))
    plans = plan_runs(resolve_variants(variants, settings["data"]), RunConfig(**settings), range(seeds),
                      str(tmp_path / "study"))
    assert len(plans) == 25 * 3 and {p.cfg.data for p in plans} == {"fashion-mnist"}
    by_name = {p.variant.name: p for p in plans if p.seed == 0}
    assert by_name["curation/simclr-b32-frd-pairwise"].cfg.out == str(
        tmp_path / "study" / "curation" / "simclr-b32-frd-pairwise" / "seed0")
    assert by_name["curation/simclr-b32-frd-pairwise"].cfg.options["curate"] == "frd-pairwise"
    vit = by_name["domain-shift/vit-miba"]
    assert vit.corruptions and vit.cfg.max_steps == 100 and vit.cfg.backbone == "vit-tiny"
    assert not by_name["supervised/ce"].corruptions and by_name["supervised/ce"].cfg.max_steps == 200
