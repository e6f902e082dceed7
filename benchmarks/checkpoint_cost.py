"""What one checkpoint of the collapse monitor costs, part by part: ``python benchmarks/checkpoint_cost.py``.

A checkpoint of ``eval.mode=sequential`` (``recipes/eval_scale.py``) scores a sample of the cases edited so far
teacher-forced (ES/PS/NS) and generatively (the efficacy prompt, greedy and through the chat template), then
takes the held-out perplexity and the known facts. This times each of those on the unedited model with the
default configuration (``eval.curve_cases`` cases of ``eval.dataset``, ``eval.heldout``, ``eval.known``), twice
in turn, on ``--threads`` CPU threads (the many-edit runs use one). The perplexity is timed both ways a run takes
it: the whole model (the unedited model's, and any run editing block 0) and, as at every checkpoint of a run
whose first edited block is ``--frozen-below`` (default: the first of the model file's UltraEdit layers), with
the blocks before it skipped (``HeldoutPerplexity``; its first call, which keeps their output, is not timed).
Overrides (``key=value``) go after the
options, as for ``train.py``:

    python benchmarks/checkpoint_cost.py data.files=../shared/data/wikipedia/wikipedia_en_sample.jsonl.gz
    python benchmarks/checkpoint_cost.py model.name=gemma3-270m data.files=...
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rome.pipeline.core.loading import configure, load_configured  # noqa: E402
from rome.pipeline.evaluation.cases import load_cases  # noqa: E402
from rome.pipeline.evaluation.generative import SETS, generative_settings, score_generative  # noqa: E402
from rome.pipeline.evaluation.retention import (  # noqa: E402
    HeldoutPerplexity,
    fact_accuracy,
    heldout_texts,
    known_facts,
    perplexity,
)
from rome.pipeline.evaluation.scoring import teacher_forced_scores  # noqa: E402
from rome.pipeline.tracing.facts import load_facts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the studies)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the parts")
    parser.add_argument(
        "--frozen-below", type=int, default=None, help="the first edited block (default: the first UltraEdit layer)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = configure(["model.device=cpu", *args.overrides])
    if not cfg.data.files:
        parser.error("the held-out perplexity needs data.files=PATH (a local .jsonl.gz)")
    loaded = load_configured(cfg.model, "cpu")
    model, tok = loaded.model, loaded.tokenizer
    cases = load_cases(cfg.eval.dataset, int(cfg.eval.curve_cases))[0]
    generative = generative_settings(cfg.eval.generative, tok)
    texts, _ = heldout_texts(cfg.data.files, int(cfg.eval.heldout.articles), cfg.data.text_field)
    facts = known_facts(model, tok, load_facts(cfg.eval.known.dataset, int(cfg.eval.known.n)))
    efficacy = SETS[cases[0].kind][0]
    frozen = args.frozen_below if args.frozen_below is not None else min(cfg.edit.ultraedit.layers)
    at_checkpoint = HeldoutPerplexity(
        model, tok, loaded.spec, texts, int(cfg.eval.heldout.max_length), int(cfg.eval.heldout.batch_size), frozen
    )
    whole = at_checkpoint()  # keeps the blocks' output (untimed), as a run's first call does
    whole_name, skip_name = f"held-out perplexity, {len(texts)} articles", f"  the same, blocks 0-{frozen - 1} skipped"
    parts: dict[str, Callable[[], object]] = {
        f"teacher-forced, {len(cases)} cases": lambda: teacher_forced_scores(
            model, tok, cases, int(cfg.eval.score_batch_size)
        ),
        f"generative {efficacy}, {len(cases)} cases": lambda: score_generative(
            model, tok, cases, generative, [efficacy]
        ),
        whole_name: lambda: perplexity(
            model, tok, loaded.spec, texts, int(cfg.eval.heldout.max_length), int(cfg.eval.heldout.batch_size)
        ),
        skip_name: at_checkpoint,
        f"known facts, {len(facts)}": lambda: fact_accuracy(model, tok, facts),
    }
    print(f"{loaded.identity['name']}, {args.threads} thread(s); seconds per part, each round in turn")
    for _ in range(args.repeats):
        seconds: dict[str, float] = {}
        for name, part in parts.items():
            started = time.perf_counter()
            value = part()
            seconds[name] = time.perf_counter() - started
            print(f"{name:<44} {seconds[name]:8.2f}", flush=True)
            if name == skip_name and value != whole:
                raise SystemExit("the skipping perplexity differs from the whole model's")
        total = sum(seconds.values())
        print(f"{'the checkpoint (whole-model perplexity)':<44} {total - seconds[skip_name]:8.2f}", flush=True)
        print(f"{'the checkpoint (blocks skipped)':<44} {total - seconds[whole_name]:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
