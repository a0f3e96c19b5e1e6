"""The ``batchmates export`` and ``batchmates embed`` sub-commands (take a trained model out), for the CLI.

Each command is one call into :mod:`batchmates.training.export_run`; :mod:`batchmates.cli` adds the parsers with
:func:`add_takeout_parsers` and dispatches to :data:`TAKEOUT_COMMANDS`.

Paper: none (library infrastructure).

Library choices: ``export`` writes ``DIR/export/backbone.safetensors`` (or ``.onnx``) by default; ``embed`` needs
``--out`` (its suffix picks the format) and embeds the run's test split unless told otherwise.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["add_takeout_parsers", "cmd_export", "cmd_embed", "TAKEOUT_COMMANDS"]


def add_takeout_parsers(sub: Any, formatter: type, epilog: Callable[[str], str]) -> None:
    """Add the ``export`` and ``embed`` parsers to the sub-parsers ``sub`` (``formatter``/``epilog``: the CLI's)."""
    p = sub.add_parser(
        "export", help="write a run's backbone (safetensors or ONNX) with a JSON card", formatter_class=formatter,
        description="Write the trained backbone of DIR alone (no head or classifier) and a JSON card beside it "
                    "(architecture, input size, normalisation, the run's metrics). A timm/torchvision backbone keeps "
                    "its original key names: it loads with strict=True into timm.create_model(NAME, num_classes=0).",
        epilog=epilog("""
            examples:
              batchmates export runs/supcon
              batchmates export runs/supcon --format onnx --out model.onnx
            """),
    )
    p.add_argument("run_dir", metavar="DIR", help="a directory written by `batchmates train`")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "onnx"], help="file format")
    p.add_argument("--out", metavar="FILE", help="output file (default: DIR/export/backbone.safetensors or .onnx)")

    p = sub.add_parser(
        "embed", help="write a run's embeddings of a dataset split (.npy, .npz, .parquet)", formatter_class=formatter,
        description="Embed every image of a split with the run's backbone (eval mode, as `batchmates eval`) and "
                    "write features [N, D] and labels [N].",
        epilog=epilog("""
            examples:
              batchmates embed runs/supcon --split test --out test.npz
              batchmates embed runs/supcon --data digits --split train --out train.parquet
            """),
    )
    p.add_argument("run_dir", metavar="DIR", help="a directory written by `batchmates train`")
    p.add_argument("--data", help="dataset (default: the run's); resized to the run's image size")
    p.add_argument("--data-dir", help="where the dataset files are")
    p.add_argument("--split", default="test", choices=["train", "test", "unlabeled"], help="which split")
    p.add_argument("--out", required=True, metavar="FILE", help="FILE.npy (labels in FILE.labels.npy), .npz or "
                   ".parquet")
    p.add_argument("--device", default="cpu", help="device for feature extraction, e.g. cpu or cuda")


def cmd_export(args: argparse.Namespace) -> int:
    from batchmates.training.export_run import describe, export_run

    print(describe(export_run(args.run_dir, fmt=args.format, out=args.out)))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from batchmates.training.export_run import describe, embed_run

    print(describe(embed_run(args.run_dir, out=args.out, data=args.data, split=args.split, data_dir=args.data_dir,
                             device=args.device)))
    return 0


TAKEOUT_COMMANDS = {"export": cmd_export, "embed": cmd_embed}
