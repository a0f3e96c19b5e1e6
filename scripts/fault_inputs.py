"""Run every bad-input case of tests/_faults.py as a user would (`python -m batchmates ...`, one process
each) and print the table of docs/reliability.md: tried / clear error / traceback / silent / unclear / skipped.

    .venv/bin/python scripts/fault_inputs.py [--in-process] [--only WORD] [--show]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _faults import CASES, Scratch, run_case  # noqa: E402  (a test helper, beside the tests)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in-process", action="store_true", help="call batchmates.cli.main instead of subprocesses")
    ap.add_argument("--only", help="only cases whose name contains this")
    ap.add_argument("--show", action="store_true", help="print each reply")
    args = ap.parse_args()
    counts: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Scratch(Path(tmp), subprocess=not args.in_process)
        print("| group | bad input | outcome | exit | s | message (first line) |\n|---|---|---|---:|---:|---|")
        for case in CASES:
            if args.only and args.only not in case.name:
                continue
            o = run_case(case, scratch)
            counts[o.status] += 1
            first = next((ln for ln in o.text.splitlines() if "error" in ln.lower() or "finished" in ln), "")
            print(f"| {case.group} | {case.name} | {o.status}{' (' + o.why + ')' if o.why else ''} | {o.code} | "
                  f"{o.seconds:.1f} | {first.strip()[:110].replace('|', '/')} |", flush=True)
            if args.show or o.status not in ("clear", "skipped"):
                print(o.text[-3000:], file=sys.stderr)
    tried = sum(counts.values()) - counts["skipped"]
    print(f"\ntried {tried}: clear {counts['clear']}, traceback {counts['traceback']}, silent {counts['silent']}, "
          f"unclear {counts['unclear']} (skipped {counts['skipped']})")
    return 0 if tried == counts["clear"] else 1


if __name__ == "__main__":
    sys.exit(main())
