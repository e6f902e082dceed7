"""Several sequential runs on one curve: ``python benchmarks/lifelong_curve.py OUT.png LABEL=DIR ...``.

Each DIR is a finished (or stopped) ``eval.mode=sequential`` run's ``eval.out``; its edited methods are drawn
as ``<method> (<LABEL>)`` on the collapse monitor's nine panels, edits on a log scale, so that ROME's 300 edits,
MEMIT's and AlphaEdit's 1,000 and UltraEdit's 10,000 are read side by side (docs/many-edits.md). A method that
was stopped before its last batch is drawn from its saved progress (``progress/<method>.json``: the curve to its
last checkpoint) as ``<method> stopped at N (<LABEL>)``. The runs must share the model and the held-out
and known-facts checks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rome.pipeline.evaluation.scale_report import collapse_point, curve_plot, merge_runs  # noqa: E402


def with_stopped_methods(summary: dict, directory: Path) -> dict:
    """``summary`` (a run's ``summary.json``) with the methods it has not finished added from their saved
    progress, each named by where it stopped and with its collapse point over the checkpoints it reached."""
    methods, order = dict(summary["methods"]), list(summary["order"])
    for path in sorted((directory / "progress").glob("*.json")):
        progress = json.loads(path.read_text())
        name, curve = path.stem, progress.get("curve") or []
        if not curve or methods.get(name, {}).get("edits"):
            continue  # nothing measured yet, or finished (its summary row is the whole run)
        edits = int(progress["edits"])
        collapse = collapse_point(curve, summary["pre_perplexity"], 1.0 if summary.get("known_facts") else None, edits)
        label = f"{name} stopped at {edits:,}"
        methods[label] = {"edits": edits, "curve": curve, "collapse_edits": collapse["edits"]}
        order.append(label)
    return {**summary, "methods": methods, "order": order}


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
        runs[label] = with_stopped_methods(json.loads(summary.read_text()), Path(directory))
    try:
        merged = merge_runs(runs)
    except ValueError as err:
        parser.error(str(err))
    curve_plot(merged, args.out, log_x=True)
    print(f"{len(merged['order'])} curves -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
