"""The ``batchmates`` command: train, evaluate and compare methods, list datasets and methods, run benchmarks.

Every subcommand has ``--help`` with examples. Errors in arguments or missing data print one clear message
(naming the argument and the fix) and exit with status 2 (bad arguments) or 1 (run failure), without a traceback;
set ``BATCHMATES_DEBUG=1`` to see the traceback.

Paper: none (library infrastructure).

Library choices: the run-setting flags of ``train`` and ``compare`` are generated from the schema of
:class:`batchmates.config.RunConfig` (one declaration per setting); ``compare`` takes named variants
(:mod:`batchmates.training.variants`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from batchmates.bench.runner import BENCH_GROUPS  # the group table, for the `bench` choices (imports no torch)
from batchmates.cli_takeout import TAKEOUT_COMMANDS, add_takeout_parsers  # export, embed (no torch)
from batchmates.config import PROTOCOLS, add_run_arguments, settings_from_args  # the run-setting schema (no torch)

__all__ = ["main", "build_parser"]


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless there is nothing to show (unset, off) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _epilog(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


# --------------------------------------------------------------------------------------------- arguments
def _add_run_args(p: argparse.ArgumentParser, *, single: bool) -> None:
    """The run settings of ``train`` and ``compare``, generated from the schema of :class:`RunConfig` (compare
    sets the method, seed and output directory per run, so it has no flags for them)."""
    add_run_arguments(p, exclude=() if single else ("method", "seed", "out"))
    p.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="method option (repeatable); `batchmates methods` lists each method's options"
                   + ("" if single else "; in compare prefix the method: --opt supcon.temperature=0.1"))


def build_parser() -> argparse.ArgumentParser:
    from batchmates import __version__

    parser = argparse.ArgumentParser(
        prog="batchmates",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="batchmates: batch-relational representation learning (losses and layers that use the other "
                    "samples of the mini-batch), trained and compared on Lightning.",
        epilog=_epilog("""
            examples:
              batchmates data list
              batchmates methods
              batchmates train --method ce --data digits --out runs/ce
              batchmates train --method ce --data fashion-mnist --backbone resnet-small --epochs 12 --out runs/fm
              batchmates train --resume runs/fm
              batchmates eval runs/ce --protocol knn --protocol linear
              batchmates compare --methods all --data digits --seeds 2 --out runs/demo
              batchmates bench losses --quick
            """),
    )
    parser.add_argument("--version", action="version", version=f"batchmates {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train", help="train one method on one dataset", formatter_class=_Formatter,
        description="Train a method and write config.yaml, metrics.json/.csv, curves.png, last.ckpt and TensorBoard "
                    "logs to --out. Settings left unset use the method's defaults for the dataset; the resolved "
                    "values are written to config.yaml.",
        epilog=_epilog("""
            examples:
              batchmates train --method ce --data digits --epochs 5 --out runs/ce
              batchmates train --method ce --attn-layer se --data fashion-mnist --out runs/ce-se
              batchmates train --method ce --data digits --opt label_smoothing=0.1
              batchmates train --config runs/ce/config.yaml --out runs/ce-again
              batchmates train --resume runs/ce          # continue an interrupted run from runs/ce/last.ckpt
              batchmates train --method ce --help-method # the method's options
              batchmates train --method ce --devices 2 --strategy ddp --accelerator cpu   # 2-process DDP
              torchrun --nproc-per-node 2 -m batchmates train --method ce --devices 2 --strategy ddp
            """),
    )
    p.add_argument("--config", help="start from a config.yaml written by an earlier run (flags override it)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR from DIR/last.ckpt")
    p.add_argument("--overwrite", action="store_true", help="allow --out to hold an earlier run's checkpoint")
    p.add_argument("--reevaluate", action="store_true", help="with --resume of a finished run: evaluate it again "
                   "(a finished run is otherwise left unchanged)")
    p.add_argument("--help-method", action="store_true", help="describe --method and its options, then exit")
    _add_run_args(p, single=True)
    p.add_argument("--curate", action="append", dest="opt", type=lambda v: f"curate={v}", metavar="KIND", help="batch curation of simclr/supcon/barlow: frd-batch (one Gaussian FRD per batch), frd-pairwise, pair-sq-l2 (= --opt curate=KIND); see docs/curation.md")  # noqa: E501

    p = sub.add_parser(
        "eval", help="evaluate a trained run (accuracy, kNN, linear probe, corruptions)", formatter_class=_Formatter,
        description="Evaluate the run in DIR and merge the results into DIR/metrics.json under 'eval'.",
        epilog=_epilog("""
            examples:
              batchmates eval runs/ce
              batchmates eval runs/ce --protocol knn --protocol linear
              batchmates eval runs/ce --corruptions --severity 3 --severity 5
            """),
    )
    p.add_argument("run_dir", metavar="DIR", help="a directory written by `batchmates train`")
    p.add_argument("--protocol", action="append", choices=PROTOCOLS, help="protocol (repeatable; default all three)")
    p.add_argument("--corruptions", action="store_true", help="also evaluate on corrupted test sets (domain shift)")
    p.add_argument("--eval-mode", choices=("independent", "batch"), default=None,
                   help="override the run's eval_mode of batch-relational layers; 'batch' results are merged under "
                        "'eval_batch' (test batches of the training batch size)")
    p.add_argument("--severity", action="append", type=int, help="corruption severity 1-5 (repeatable; default all)")
    p.add_argument("--kind", action="append", help="corruption kind (repeatable; default all)")
    p.add_argument("--device", default="cpu", help="device for feature extraction, e.g. cpu or cuda")

    p = sub.add_parser(
        "compare", help="train methods or named variants x seeds and tabulate mean ± std", formatter_class=_Formatter,
        description="Train every variant (a method, plus run settings, plus method options) for every seed into "
                    "OUT/<variant>/seed<k>, evaluate them, and write OUT/results.md, OUT/results.json and "
                    "OUT/accuracy.png. Every run's configuration is checked before the first run starts; finished "
                    "runs are skipped and interrupted ones resumed. A variant is METHOD[@SETTING]...[+OPTION]...: "
                    "@KEY=VALUE sets a run setting (or @bN batch size, @noiseF label noise, @epN epochs, @stepsN "
                    "max steps, @lrF learning rate), +KEY=VALUE a method option, and NAME: in front names it. "
                    "Settings: flags < variant. With --variants-file: file settings < flags < variant.",
        epilog=_epilog("""
            examples:
              batchmates compare --methods all --data digits --seeds 2 --out runs/demo
              batchmates compare --methods ce,supcon --data fashion-mnist --seeds 3 --epochs 5 --out runs/fm
              batchmates compare --variants ce ce@noise0.4 btn@noise0.4 --data digits --out runs/noisy
              batchmates compare --variants simclr@b32 "simclr@b32+curate=frd-pairwise" --out runs/curate
              batchmates compare --variants "se:ce@attn_layer=se" ce --data digits --out runs/se
              batchmates compare --methods ce,ibaformer --data digits --corruptions --out runs/shift
              batchmates compare --variants-file docs/study.yaml --out runs/study --threads 1
            """),
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--methods", help="'all' (every method supporting --data; the default) or a list: ce,supcon")
    what.add_argument("--variants", nargs="+", metavar="SPEC", help="named variants, e.g. ce ce@noise0.4 "
                      "'simclr@b32+curate=frd-pairwise' (see the description)")
    what.add_argument("--variants-file", metavar="FILE", help="a YAML file of variants, with optional common "
                      "settings and seeds (see batchmates.training.variants)")
    p.add_argument("--seeds", help="number of seeds N (seeds 0..N-1) or a list like 0,3,7 (default: 1, or the "
                   "file's seeds)")
    p.add_argument("--out", default="runs/compare", help="output directory")
    p.add_argument("--corruptions", action="store_true", help="also evaluate on corrupted test sets")
    p.add_argument("--severity", action="append", type=int, help="corruption severity 1-5 (repeatable; default all)")
    _add_run_args(p, single=False)

    p = sub.add_parser(
        "study", help="run a study (variants x shared seeds) and report each claim with a verdict",
        formatter_class=_Formatter,
        description="Train every variant of the study FILE for every seed into OUT/<variant>/seed<k> (skipping "
                    "finished runs, resuming interrupted ones), then write OUT/results.json, OUT/results.md and "
                    "plots: per variant mean ± 95% CI; per claim the paired difference to its baseline with its CI, "
                    "ttest_rel and Wilcoxon p-values and a verdict (reproduced, not reproduced, inconclusive). The "
                    "report is rewritten after every run; on a finished OUT nothing trains and the same report is "
                    "written. Settings: file < flags < variant.",
        epilog=_epilog("""
            examples:
              batchmates study docs/study/fashion-mnist.yaml --out docs/results/fashion-mnist --threads 1 --jobs 2
              batchmates study docs/study/fashion-mnist.yaml --out docs/results/fashion-mnist --report
              batchmates study docs/study/engine-precision.yaml --out runs/prec --seeds 2 --epochs 1
            """),
    )
    p.add_argument("file", metavar="FILE", help="a study file: variants, settings, seeds, claims (see "
                   "batchmates.training.study)")
    p.add_argument("--out", required=True, help="the study's directory (one run directory per variant and seed)")
    p.add_argument("--seeds", help="instead of the file's seeds: a count N (seeds 0..N-1) or a list like 0,3,7")
    p.add_argument("--jobs", type=int, default=1, help="runs trained side by side in separate processes (give each "
                   "--threads)")
    p.add_argument("--only", help="train only these: claim ids or variant globs, comma-separated (e.g. "
                   "supcon,attention or 'sup/*'); the report covers every finished run")
    p.add_argument("--report", action="store_true", help="train nothing: write the report of the finished runs")
    p.add_argument("--dry-run", action="store_true", help="check and print the plan (every run resolved, every "
                   "variant built once); train and write nothing")
    add_run_arguments(p, exclude=("method", "seed", "out"))

    p = sub.add_parser("data", help="datasets: `batchmates data list`", formatter_class=_Formatter,
                       description="Show each dataset, whether its files are present, where, and its size.",
                       epilog="examples:\n  batchmates data list\n  batchmates data list --data-dir ~/data\n")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    pl = dsub.add_parser("list", help="list datasets and where their files are", formatter_class=_Formatter,
                         description="List every dataset: present or not, location, size, how to get it.")
    pl.add_argument("--data-dir", help="look only here (as --data-dir of train does)")

    p = sub.add_parser("methods", help="list registered methods and their options", formatter_class=_Formatter,
                       description="List every registered method (supervised or not, batch-relational or not), "
                                   "its options for --opt KEY=VALUE, and its defaults on a dataset.",
                       epilog="examples:\n  batchmates methods\n  batchmates methods ce --data fashion-mnist\n")
    p.add_argument("name", nargs="?", help="show one method only")
    p.add_argument("--data", default="digits", help="show the defaults for this dataset")

    p = sub.add_parser(
        "bench", help="speed/memory benchmarks of the losses, modules and curation", formatter_class=_Formatter,
        description="Run the benchmarks of batchmates.bench and write OUT/<group>-<device>.json and a section of "
                    "OUT/benchmarks.md (Markdown table and hardware); --update-docs writes the repository's "
                    "bench/ and docs/benchmarks.md instead.",
        epilog="examples:\n  batchmates bench losses --quick\n  batchmates bench all --device cuda --update-docs\n",
    )
    p.add_argument("group", choices=[*BENCH_GROUPS, "all"], help="which benchmarks")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--out", help="directory for <group>-<device>.json (default: runs/bench; bench/ with "
                   "--update-docs)")
    p.add_argument("--doc", help="Markdown file whose section to replace (default: OUT/benchmarks.md; "
                   "docs/benchmarks.md with --update-docs)")
    p.add_argument("--update-docs", action="store_true", help="write the repository's tracked results (bench/*.json "
                   "and docs/benchmarks.md) instead of a run directory")

    add_takeout_parsers(sub, _Formatter, _epilog)  # export, embed
    return parser


# --------------------------------------------------------------------------------------------- commands
class CLIError(Exception):
    """A user error: message printed without traceback; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _method_help(name: str, data: str = "digits") -> str:
    from batchmates.training.catalog import method_help

    return method_help(name, data)


def cmd_train(args: argparse.Namespace) -> int:
    from batchmates.config import RunConfig, parse_opt_assignments
    from batchmates.training.preflight import check_cli_train, check_config_file, check_resume_dir

    given = settings_from_args(args)
    if args.help_method:
        if "method" not in given:
            raise CLIError("--help-method needs --method NAME (or run `batchmates methods`)")
        print(_method_help(given["method"], given.get("data", "digits")))
        return 0
    opts = parse_opt_assignments(args.opt)
    if args.resume:
        extra = set(given) - {"progress", "threads"}
        if extra or opts or args.config:
            raise CLIError(f"--resume DIR continues DIR/config.yaml unchanged; drop {sorted(extra) or ['--opt']} "
                           "(or start a new run with --config DIR/config.yaml --out NEW)")
        if notice := check_resume_dir(args.resume, reevaluate=args.reevaluate):  # before the heavy imports
            print(notice)  # a finished run is left alone
            return 0
        from batchmates.training.run import resume

        resume(args.resume, reevaluate=args.reevaluate, **{k: given[k] for k in ("progress", "threads") if k in given})
        return 0
    if args.reevaluate:
        raise CLIError("--reevaluate goes with --resume DIR (evaluate a finished run again)")
    cfg = check_config_file(args.config) if args.config else RunConfig()
    if args.config and "out" not in given:
        raise CLIError(f"--config {args.config}: also pass --out NEW_DIR (so the earlier run is not overwritten)")
    if not args.config and "out" not in given:
        given["out"] = os.path.join("runs", f"{given.get('method', cfg.method)}-{given.get('data', cfg.data)}")
    cfg = cfg.replace(**given)
    if opts:
        cfg = cfg.replace(options={**cfg.options, **opts})
    check_cli_train(cfg, overwrite=args.overwrite)  # settings, names, options, --out, devices: before the data
    from batchmates.training.run import train

    train(cfg, overwrite=args.overwrite)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.pretty import Pretty

    from batchmates.training.preflight import check_device, check_run_dir

    check_run_dir(args.run_dir, flag="eval DIR")  # before the heavy imports
    check_device(args.device)  # imports torch, not Lightning
    from batchmates.training.evaluate import evaluate
    from batchmates.training.progress import EvalProgress

    protocols = (args.protocol or list(PROTOCOLS)) + (["corruptions"] if args.corruptions else [])
    with EvalProgress(protocols, what=args.run_dir):
        res = evaluate(args.run_dir, args.protocol or list(PROTOCOLS), corruptions=args.corruptions,
                       severities=args.severity, kinds=args.kind, device=args.device, eval_mode=args.eval_mode)
    Console().print(Pretty(res))
    key = "eval_batch" if args.eval_mode == "batch" else "eval"
    print(f"results merged into {os.path.join(args.run_dir, 'metrics.json')} under {key!r}")
    return 0


def _parse_seeds(text: str | int | list[int]) -> int | list[int]:
    if isinstance(text, int | list):
        return text
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        n = int(text)
    except ValueError:
        raise CLIError(f"--seeds {text!r}: give a count (2) or a list of seeds (0,3,7)") from None
    if n < 1:
        raise CLIError(f"--seeds must be >= 1 (got {n})")
    return n


def cmd_compare(args: argparse.Namespace) -> int:
    from batchmates.config import RunConfig, parse_opt_assignments
    from batchmates.training.compare import compare
    from batchmates.training.preflight import check_cli_compare
    from batchmates.training.variants import load_variants_file

    seeds: Any = args.seeds
    file_settings: dict[str, Any] = {}
    if args.variants_file:
        variants, file_settings, file_seeds = load_variants_file(args.variants_file)
        seeds = seeds if seeds is not None else file_seeds
    else:
        variants = args.variants or args.methods or "all"
    given = {**file_settings, **settings_from_args(args, exclude=("out",))}  # --out: the compare's directory
    data = given.pop("data", "digits")
    label_noise = given.pop("label_noise", 0.0)
    protocols = given.pop("eval_protocols", None) or list(PROTOCOLS)
    per_method: dict[str, dict[str, str]] = {}
    for key, value in parse_opt_assignments(args.opt).items():
        if "." not in key:
            raise CLIError(f"--opt {key}={value}: in compare, prefix the method, e.g. --opt supcon.{key}={value}")
        m, k = key.split(".", 1)
        per_method.setdefault(m, {})[k] = value
    check_cli_compare(variants, data, per_method, args.out)  # names, options and --out, before the heavy imports
    res = compare(variants, data, _parse_seeds(seeds if seeds is not None else "1"), args.out, RunConfig(**given),
                  protocols=protocols, label_noise=label_noise, corruptions=args.corruptions,
                  severities=args.severity, method_options=per_method)
    return 1 if res["failed"] else 0


def cmd_study(args: argparse.Namespace) -> int:
    from batchmates.training.study import run_study

    if args.jobs < 1:
        raise CLIError(f"--jobs must be >= 1 (got {args.jobs})")
    seeds = _parse_seeds(args.seeds) if args.seeds is not None else None
    seeds = list(range(seeds)) if isinstance(seeds, int) else seeds
    res = run_study(args.file, args.out, seeds=seeds, jobs=args.jobs, overrides=settings_from_args(args),
                    report_only=args.report, dry_run=args.dry_run,
                    only=[x.strip() for x in args.only.split(",") if x.strip()] if args.only else None)
    if args.dry_run:
        return 0
    for c in res["claims"]:
        print(f"[study] {c['verdict']:>15}: {c['claim']}")
    print(f"[study] {res['runs_finished']} of {res['runs_planned']} runs finished; report in "
          f"{os.path.join(args.out, 'results.md')}")
    return 1 if any("failed" in m for m in res["missing"]) else 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command != "list":
        raise CLIError("usage: batchmates data list [--data-dir DIR]")
    from rich.console import Console
    from rich.table import Table

    from batchmates.data import describe_datasets

    t = Table(title="datasets")
    for c in ("name", "present", "location", "size"):
        t.add_column(c)
    missing = []
    for row in describe_datasets(args.data_dir):
        present = bool(row.get("present"))
        t.add_row(str(row["name"]), "yes" if present else "[red]no[/]", str(row.get("location", "")),
                  str(row.get("size", "")))
        if not present and row.get("how"):
            missing.append((row["name"], row["how"]))
    con = Console()
    con.print(t)
    for name, how in missing:
        how_text = how if isinstance(how, str) else "; ".join(map(str, how))
        con.print(f"[bold]{name}[/]: {how_text}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from batchmates.training.catalog import method_names  # a cached snapshot: no torch import once it exists

    names = [args.name] if args.name else method_names()
    print("\n\n".join(_method_help(n, args.data) for n in names))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from batchmates.bench.runner import run_benchmarks

    out, doc = args.out, args.doc
    if args.update_docs:  # the tracked result files of the repository
        out, doc = out or "bench", doc or os.path.join("docs", "benchmarks.md")
    out = out or os.path.join("runs", "bench")
    return run_benchmarks(args.group, device=args.device, quick=args.quick, out=out,
                          doc=doc or os.path.join(out, "benchmarks.md"))


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "compare": cmd_compare, "study": cmd_study, "data": cmd_data,
            "methods": cmd_methods, "bench": cmd_bench, **TAKEOUT_COMMANDS}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``batchmates`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from batchmates.config import ConfigError, RunError  # light: the method registry's errors are ValueErrors

    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("batchmates: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`batchmates methods | head`): not an error
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CLIError, ConfigError, RunError, OSError, ValueError) as e:
        # a bad input (2) or a run that cannot start or continue (1): one paragraph, no traceback
        if os.environ.get("BATCHMATES_DEBUG"):
            raise
        code = e.code if isinstance(e, CLIError) else (1 if isinstance(e, RunError | OSError) else 2)
        msg = str(e).strip() or type(e).__name__
        if isinstance(e, OSError) and e.args and not isinstance(e.args[0], str):
            msg = f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        print(f"batchmates {args.command}: error: {msg}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
