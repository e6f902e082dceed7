"""Several sequential runs on one curve: ``python benchmarks/lifelong_curve.py OUT.png LABEL=DIR ...``.

Each DIR is a finished (or stopped) ``eval.mode=sequential`` run's ``eval.out``; its edited methods are drawn
as ``<method> (<LABEL>)`` on the collapse monitor's nine panels, edits on a log scale, so that ROME's 300 edits,
MEMIT's and AlphaEdit's 1,000 and UltraEdit's 10,000 are read side by side (docs/many-edits.md). The runs must
share the model and the held-out and known-facts checks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rome.pipeline.evaluation.scale_report import curve_plot, merge_runs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("runs", nargs="+", help="LABEL=DIR: a sequential run's eval.out and its legend label")
    args = parser.parse_args(argv)
    runs = {}
    for spec in args.runs:
        label, sep, directory = spec.partition("=")
        summary = Path(directory) / "summary.json"
        if not sep or not summary.is_file():
            parser.error(f"{spec}: expected LABEL=DIR with DIR/summary.json (a sequential eval.out)")
        runs[label] = json.loads(summary.read_text())
    try:
        merged = merge_runs(runs)
    except ValueError as err:
        parser.error(str(err))
    curve_plot(merged, args.out, log_x=True)
    print(f"{len(merged['order'])} curves -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
