"""What one checkpoint of the collapse monitor costs, part by part: ``python benchmarks/checkpoint_cost.py``.

A checkpoint of ``eval.mode=sequential`` (``recipes/eval_scale.py``) scores a sample of the cases edited so far
teacher-forced (ES/PS/NS) and generatively (the efficacy prompt, greedy and through the chat template), then
takes the held-out perplexity and the known facts. This times each of those on the unedited model with the
default configuration (``eval.curve_cases`` cases of ``eval.dataset``, ``eval.heldout``, ``eval.known``), twice
in turn, on ``--threads`` CPU threads (the many-edit runs use one). Overrides (``key=value``) go after the
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
from rome.pipeline.evaluation.retention import fact_accuracy, heldout_texts, known_facts, perplexity  # noqa: E402
from rome.pipeline.evaluation.scoring import teacher_forced_scores  # noqa: E402
from rome.pipeline.tracing.facts import load_facts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the studies)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the parts")
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
    parts: dict[str, Callable[[], object]] = {
        f"teacher-forced, {len(cases)} cases": lambda: teacher_forced_scores(
            model, tok, cases, int(cfg.eval.score_batch_size)
        ),
        f"generative {efficacy}, {len(cases)} cases": lambda: score_generative(
            model, tok, cases, generative, [efficacy]
        ),
        f"held-out perplexity, {len(texts)} articles": lambda: perplexity(
            model, tok, loaded.spec, texts, int(cfg.eval.heldout.max_length), int(cfg.eval.heldout.batch_size)
        ),
        f"known facts, {len(facts)}": lambda: fact_accuracy(model, tok, facts),
    }
    print(f"{loaded.identity['name']}, {args.threads} thread(s); seconds per part, each round in turn")
    for _ in range(args.repeats):
        total = 0.0
        for name, part in parts.items():
            started = time.perf_counter()
            part()
            seconds = time.perf_counter() - started
            total += seconds
            print(f"{name:<36} {seconds:8.2f}", flush=True)
        print(f"{'the checkpoint':<36} {total:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
