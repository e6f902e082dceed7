"""What differs between two runs of one command: two statistics directories (``stats.dir``), two edit ledgers
(``edit.out``) or two sequential evaluations (``eval.out``), for the reproducibility study of docs/many-edits.md.

    python benchmarks/run_diff.py /tmp/stats_a /tmp/stats_b     # the safetensors files: bytes, then tensors
    python benchmarks/run_diff.py outputs/seq_a outputs/seq_b    # methods/*.json, every number but the clocks

Files are paired by their path below each directory. A tensor pair prints its relative Frobenius difference
(0: bitwise equal); a JSON pair prints each number that differs (timings left out: they always do).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from rome.pipeline.core.digest import file_sha256

CLOCKS = ("seconds", "per_second", "timings", "eta")  # fields that are wall-clock times


def leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) for every scalar inside ``obj``."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from leaves(value, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def diff_tensors(a: Path, b: Path) -> list[str]:
    if file_sha256(a) == file_sha256(b):
        return ["same bytes"]
    x, y = load_file(a), load_file(b)
    lines = ["bytes differ"] if set(x) == set(y) else [f"tensors differ: {sorted(set(x) ^ set(y))}"]
    for name in sorted(set(x) & set(y)):
        p, q = x[name].double(), y[name].double()
        rel = ((p - q).norm() / p.norm().clamp_min(1e-300)).item() if p.shape == q.shape else float("nan")
        lines.append(f"{name} {tuple(p.shape)}: relative difference {rel:.3g}")
    return lines


def diff_json(a: Path, b: Path) -> list[str]:
    x, y = dict(leaves(json.loads(a.read_text()))), dict(leaves(json.loads(b.read_text())))
    keys = [k for k in x if not any(c in k for c in CLOCKS) and x[k] != y.get(k)]
    keys += [k for k in y if k not in x and not any(c in k for c in CLOCKS)]
    return [f"{k}: {x.get(k)} | {y.get(k)}" for k in keys] or ["the same (but the clocks)"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    files = sorted(p.relative_to(args.a) for p in args.a.rglob("*") if p.suffix in (".safetensors", ".json"))
    files = [f for f in files if f.parts[0] == "methods" or f.suffix == ".safetensors"]
    if not files:
        print(f"error: {args.a} holds no methods/*.json and no .safetensors file", file=sys.stderr)
        return 2
    for rel in files:
        if not (args.b / rel).exists():
            print(f"{rel}: only in {args.a}")
            continue
        compare = diff_tensors if rel.suffix == ".safetensors" else diff_json
        print(f"{rel}:")
        for line in compare(args.a / rel, args.b / rel):
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
