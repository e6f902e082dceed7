"""Throughput of the eval stage for ROME on CPU: cases per hour, and where the time goes.

    OMP_NUM_THREADS=1 python benchmarks/eval_throughput.py --cases 6

Runs ``python train.py stage=eval eval.methods=[rome]`` on the first N CounterFact cases with the embedded
SmolLM2 (layer 6, C from the 50k-token statistics cache; computed first if missing) into a fresh output
directory, one process, ``trainer.accelerator=cpu``. A case is: score and generate on the clean model,
edit, score and generate again, restore. Reported from the per-case records: seconds in editing (k*, v*,
solve, apply), scoring (the probability passes), generating (the GE texts, before and after), and the rest
(Trainer and loop overhead), and cases per hour over the predict loop's wall time. Model load, statistics
and templates are outside the loop and not counted. The load average is printed: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def run(cases: int, tokens: int, out: Path) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "stage=eval",
        f"eval.dataset={DATA / 'counterfact' / 'counterfact-edit.json'}",
        f"eval.n={cases}",
        "eval.methods=[rome]",
        f"eval.out={out}",
        f"eval.generation.tokens={tokens}",
        "stats.tokens=50000",
        f"data.files={DATA / 'wikipedia' / 'wikipedia_en_sample.jsonl.gz'}",
        "trainer.accelerator=cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stderr[-3000:])
    process = time.perf_counter() - t
    records = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    timing = json.loads((out / "timing.json").read_text())["this_run"]
    parts = {"edit": 0.0, "score": 0.0, "generate": 0.0}
    edit_parts: dict[str, float] = {}
    for rec in records:
        parts["edit"] += rec["timings"]["edit"]
        for t_ in (rec["timings"], rec["pre_timings"]):
            parts["score"] += t_.get("score", 0.0)
            parts["generate"] += t_.get("generate", 0.0)
        for k, v in rec["info"]["timings"].items():
            edit_parts[k] = edit_parts.get(k, 0.0) + v
    loop = timing["seconds"]
    parts["other"] = loop - sum(parts.values())
    return {
        "cases": len(records),
        "generate_tokens": tokens,
        "loop_seconds": loop,
        "process_seconds": process,
        "cases_per_hour": 3600 * len(records) / loop,
        "seconds_per_case": loop / len(records),
        "share": {k: v / loop for k, v in parts.items()},
        "seconds": parts,
        "edit_breakdown_per_case": {k: v / len(records) for k, v in edit_parts.items()},
        "load_average_after": os.getloadavg(),
        "torch_threads": env["OMP_NUM_THREADS"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=50, help="eval.generation.tokens")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = run(args.cases, args.tokens, Path(tmp) / "eval")
    print(json.dumps(res, indent=2))
    s = res["share"]
    print(
        f"\nROME evaluation, CPU: {res['cases_per_hour']:.0f} cases/hour ({res['seconds_per_case']:.1f} s/case); "
        f"editing {100 * s['edit']:.0f}%, scoring {100 * s['score']:.0f}%, generating {100 * s['generate']:.0f}%, "
        f"other {100 * s['other']:.0f}%"
    )


if __name__ == "__main__":
    main()
