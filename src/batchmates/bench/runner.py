"""Run benchmark groups: the group table, the JSON result files and the Markdown section writer.

``batchmates bench GROUP`` is :func:`run_benchmarks`: for every group it imports each benchmark module of
:data:`BENCH_GROUPS`, calls its ``run(device, quick) -> list[BenchRow]``, writes ``OUT/<group>-<device>.json``
(``-quick`` for quick runs) and replaces that group's section of the Markdown document (``docs/benchmarks.md``).

Paper: none; every benchmark module says which of its figures a paper states.
Library choices: a failing benchmark is reported (in the JSON ``notes``, the document and the exit status) and
the others still run; a benchmark module that does not exist is noted as "not available" (not a failure);
sections are delimited by ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` markers so a rerun replaces only
its own section; files are written atomically.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module for BENCH_GROUPS: keep it free of torch
    from batchmates.bench.common import BenchRow

__all__ = ["BENCH_GROUPS", "run_benchmarks", "run_group", "update_benchmarks_doc"]

#: group -> benchmark modules of :mod:`batchmates.bench` (each with ``run(device, quick)``).
BENCH_GROUPS: dict[str, tuple[str, ...]] = {
    "losses": ("supcon", "barlow_twins", "swav", "cc_loss"),
    "modules": ("batch_attention", "batch_transformer"),
    "curation": ("curation",),
    "train": ("train",),  # the whole training step against a bare loop (framework overhead, aug, bf16, compile)
}


def _log(message: str) -> None:
    print(message, flush=True)


def run_group(
    group: str, device: str, quick: bool, *, log: Callable[[str], None] = _log
) -> tuple[list[BenchRow], list[str]]:
    """Rows of every benchmark of ``group``, and notes on the ones that failed or do not exist (the rest still run)."""
    if group not in BENCH_GROUPS:
        raise ValueError(f"benchmark group {group!r} is unknown; choose one of {[*BENCH_GROUPS, 'all']}")
    rows: list[BenchRow] = []
    notes: list[str] = []
    for name in BENCH_GROUPS[group]:
        full = f"batchmates.bench.{name}"
        try:
            module = importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name != full:
                raise
            notes.append(f"{name}: not available (module {full} does not exist)")
            log(f"[bench] {group}/{name}: not available")
            continue
        log(f"[bench] {group}/{name}: running on {device}{' (quick)' if quick else ''}")
        try:
            rows.extend(module.run(device, quick))
        except Exception as e:  # noqa: BLE001 - report, keep the other benchmarks
            notes.append(f"{name}: failed: {type(e).__name__}: {e}")
            print(f"[bench] {group}/{name}: FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return rows, notes


def update_benchmarks_doc(doc: str, section: str, body: str) -> None:
    """Replace (or append) the ``section`` of the Markdown file ``doc`` with ``body`` under a ``## section`` title."""
    from batchmates.io import atomic_write_text

    start, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    block = f"{start}\n## {section}\n\n{body.rstrip()}\n{end}"
    try:
        with open(doc, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = "# Benchmarks\n\nWritten by `batchmates bench`; each section is replaced when its group is rerun.\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(doc, text)


def _summaries(group: str, rows: list[BenchRow]) -> str:
    """The lines of every benchmark module of ``group`` that defines ``summary(rows) -> str`` (its ratios)."""
    out = []
    for name in BENCH_GROUPS.get(group, ()):
        try:
            module = importlib.import_module(f"batchmates.bench.{name}")
        except ModuleNotFoundError:
            continue
        text = module.summary(rows) if callable(getattr(module, "summary", None)) else ""
        if text:
            out.append(text.rstrip() + "\n\n")
    return "".join(out)


def _section_body(rows: list[BenchRow], hardware: str, quick: bool, notes: list[str]) -> str:
    from batchmates.bench.common import rows_to_markdown

    body = rows_to_markdown(rows, hardware) if rows else f"Hardware: {hardware}\n\n(no rows)\n"
    if quick:
        body = "Quick run (small sizes).\n\n" + body
    if notes:
        body += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return body


def run_benchmarks(
    group: str,
    *,
    device: str = "cpu",
    quick: bool = False,
    out: str = "bench",
    doc: str = os.path.join("docs", "benchmarks.md"),
    log: Callable[[str], None] = _log,
) -> int:
    """Run ``group`` (or ``"all"``) on ``device``, write the JSON files and document sections; 1 if one failed.

    Raises:
        ValueError: an unknown group, or ``device="cuda..."`` where CUDA is not available.
    """
    if group != "all" and group not in BENCH_GROUPS:
        raise ValueError(f"benchmark group {group!r} is unknown; choose one of {[*BENCH_GROUPS, 'all']}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    from batchmates.bench.common import hardware_description
    from batchmates.io import atomic_write_json

    hardware = hardware_description(device)
    kind = "cuda" if device.startswith("cuda") else device
    status = 0
    for name in list(BENCH_GROUPS) if group == "all" else [group]:
        rows, notes = run_group(name, device, quick, log=log)
        status = max(status, int(any(": failed: " in n for n in notes)))
        payload = {"group": name, "device": device, "quick": quick, "hardware": hardware,
                   "rows": [r.to_dict() for r in rows], "notes": notes}  # fmt: skip
        atomic_write_json(os.path.join(out, f"{name}-{kind}{'-quick' if quick else ''}.json"), payload)
        body = _summaries(name, rows) + _section_body(rows, hardware, quick, notes)
        update_benchmarks_doc(doc, f"{name} ({kind}{', quick' if quick else ''})", body)
        log(body)
    return status
