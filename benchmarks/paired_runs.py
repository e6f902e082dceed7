"""One method's per-case scores in two eval runs, paired by case: for settings that cannot share a run (an
``edit.*`` setting, not a method's own), e.g. ``edit.templates.style`` (docs/edit.md).

    python benchmarks/paired_runs.py outputs/templates_seeded outputs/templates_original --method rome

Reads each run's case log (``cases.rank*.jsonl``), keeps the cases both scored, and prints per metric both
means with their 95% intervals and the flips: cases where B scores above A / where A scores above B (a
per-case rate such as PS is an average over prompts, so "above" compares those averages), with an exact
two-sided sign test over the flips.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rome.pipeline.evaluation.case_log import CaseLog
from rome.pipeline.evaluation.metrics import mean_ci

METRICS = ("es", "ps", "ns", "es_gen_em", "ps_gen_em", "ps_gen_contains", "ns_gen_em", "es_chat_em", "es_chat_contains")


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p of ``wins`` against ``losses`` at p = 1/2 (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def scores(run: Path, method: str) -> dict[object, dict[str, float]]:
    """{case index: the method's post-edit scores} of one run."""
    return {key[0]: rec["post"] for key, rec in CaseLog(run).finished().items() if key[1] == method}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="the first run's eval.out")
    parser.add_argument("b", type=Path, help="the second run's eval.out")
    parser.add_argument("--method", default="rome", help="the method both runs scored (default: rome)")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), help="per-case keys of the case log")
    args = parser.parse_args()
    a, b = scores(args.a, args.method), scores(args.b, args.method)
    cases = sorted(set(a) & set(b))
    if not cases:
        raise SystemExit(f"error: no case that both {args.a} and {args.b} scored with method '{args.method}'")
    print(f"{args.method}: {len(cases)} cases scored in both; A = {args.a}, B = {args.b}")
    print("| metric | A | B | B above A / A above B | sign test p |")
    print("|---|---|---|---|---|")
    for m in args.metrics:
        pairs = [(a[c][m], b[c][m]) for c in cases if m in a[c] and m in b[c]]
        if not pairs:
            continue
        (ma, ha), (mb, hb) = mean_ci([x for x, _ in pairs]), mean_ci([y for _, y in pairs])
        wins, losses = sum(y > x for x, y in pairs), sum(x > y for x, y in pairs)
        print(
            f"| {m} | {100 * ma:.1f} ± {100 * ha:.1f} | {100 * mb:.1f} ± {100 * hb:.1f} | {wins}/{losses} | "
            f"{sign_test(wins, losses):.3f} |"
        )


if __name__ == "__main__":
    main()
