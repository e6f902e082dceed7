"""Seconds per fact: batched causal tracing against the one-pass-per-cell method (ROME's), same run,
same model, same facts, same noise; checks the scores agree and prints a Markdown table.

    OMP_NUM_THREADS=1 python benchmarks/trace_speed.py --facts 3

Both methods trace all three kinds (hidden, MLP window, attention window); noise samples, window, batch
size, seed and noise factor are configs/config.yaml's trace.* and seed unless given.
Wall-clock and process CPU seconds are both reported: on a shared machine the CPU seconds are the
steadier measure.  The facts are the first ``--facts`` records of the dataset the model predicts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rome.pipeline.core.loading import configure, default_cache_dir, load_model  # noqa: E402
from rome.pipeline.core.probability import answer_tokens, predicts  # noqa: E402
from rome.pipeline.core.subject import fill_prompt  # noqa: E402
from rome.pipeline.tracing.engine import KINDS, trace_fact  # noqa: E402
from rome.pipeline.tracing.facts import load_facts  # noqa: E402
from rome.pipeline.tracing.noise import subject_noise  # noqa: E402
from rome.pipeline.tracing.prompt import make_prompt  # noqa: E402
from rome.pipeline.tracing.reference import trace_fact_per_cell  # noqa: E402


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "known_1000.json"))
    ap.add_argument("--facts", type=int, default=3)
    ap.add_argument("--samples", type=int, help="noise samples per fact (default: trace.samples)")
    ap.add_argument("--window", type=int, help="layers restored together (default: trace.window)")
    ap.add_argument("--batch-size", type=int, help="rows per batched pass (default: trace.batch_size)")
    ap.add_argument("--seed", type=int, help="noise seed of the first record (default: seed)")
    ap.add_argument("--out", help="also write the measurements to this JSON file")
    args = ap.parse_args()
    # the configuration is the one place the tracing defaults live; the flags only override them
    cfg = configure([f"model.name={args.model}", "model.device=cpu"])
    for flag, value in (
        ("samples", cfg.trace.samples),
        ("window", cfg.trace.window),
        ("batch_size", cfg.trace.batch_size),
        ("seed", cfg.seed),
    ):
        if getattr(args, flag) is None:
            setattr(args, flag, int(value))

    lm = load_model(args.model, device="cpu")
    noise, _ = subject_noise(
        lm.model,
        lm.spec,
        lm.tokenizer,
        lm.identity,
        args.dataset,
        default_cache_dir(),
        factor=float(cfg.trace.noise_factor),
    )
    chosen = []
    for f in load_facts(args.dataset):
        text = fill_prompt(f.prompt, f.subject)[0]
        if predicts(lm.model, lm.tokenizer, text, f.answer)[0]:
            answer_id = answer_tokens(lm.tokenizer, text, f.answer)[0]
            chosen.append((f, make_prompt(lm.tokenizer, f.prompt, f.subject, answer_id)))
        if len(chosen) == args.facts:
            break
    common = dict(noise=noise, samples=args.samples, window=args.window, kinds=KINDS)  # all three kinds, as ROME
    rows = []
    for f, p in chosen:
        seed = args.seed + f.index
        fast, fw, fc = timed(
            lambda p=p, seed=seed: trace_fact(lm.model, lm.spec, p, seed=seed, batch_size=args.batch_size, **common)
        )
        ref, rw, rc = timed(lambda p=p, seed=seed: trace_fact_per_cell(lm.model, lm.spec, p, seed=seed, **common))
        diff = max(float(np.abs(fast.effects[k] - ref.effects[k]).max()) for k in KINDS)
        diff = max(diff, abs(fast.p_clean - ref.p_clean), abs(fast.p_corrupted - ref.p_corrupted))
        rows.append(
            dict(
                fact=f"{f.subject} -> {f.answer}",
                tokens=len(p.tokens),
                subject=list(p.subject),
                batched_wall=fw,
                batched_cpu=fc,
                per_cell_wall=rw,
                per_cell_cpu=rc,
                max_abs_diff=diff,
            )
        )
        print(json.dumps(rows[-1]), flush=True)

    n = len(rows)
    tot = {k: sum(r[k] for r in rows) for k in ("batched_wall", "batched_cpu", "per_cell_wall", "per_cell_cpu")}
    print(
        f"\n{args.model}, {n} known facts of {Path(args.dataset).name}, {args.samples} noise samples, "
        f"window {args.window}, three kinds, torch threads {torch.get_num_threads()}\n"
    )
    print("| fact | tokens | batched s (CPU s) | one pass per cell s (CPU s) | speedup wall (CPU) | max abs diff |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['fact']} | {r['tokens']} | {r['batched_wall']:.1f} ({r['batched_cpu']:.1f}) | "
            f"{r['per_cell_wall']:.1f} ({r['per_cell_cpu']:.1f}) | {r['per_cell_wall'] / r['batched_wall']:.1f}x "
            f"({r['per_cell_cpu'] / r['batched_cpu']:.1f}x) | {r['max_abs_diff']:.1e} |"
        )
    print(
        f"| **per fact** | | **{tot['batched_wall'] / n:.1f}** ({tot['batched_cpu'] / n:.1f}) | "
        f"**{tot['per_cell_wall'] / n:.1f}** ({tot['per_cell_cpu'] / n:.1f}) | "
        f"**{tot['per_cell_wall'] / tot['batched_wall']:.1f}x** ({tot['per_cell_cpu'] / tot['batched_cpu']:.1f}x) | "
        f"{max(r['max_abs_diff'] for r in rows):.1e} |"
    )
    if args.out:
        record = {"args": vars(args), "threads": torch.get_num_threads(), "rows": rows}
        Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
