"""Where two ledgers' models part: the held-out perplexity of each after its first N edits, and how far apart
their edited weights are, on one thread count, so that a difference is the edits' and not the scoring's.

    python benchmarks/ledger_perplexity.py /tmp/ledger_a /tmp/ledger_b --at 1000,6000,10000 --threads 1

Each ledger (an ``edit.out``, made on the same model) is rebuilt on the base weights up to the first entry that
brings it to N edits, as ``stage=revert`` rebuilds one; the perplexity is the eval stage's (``eval.heldout``: the
last 20 articles of ``data.files``, 512 tokens each). ``--threads`` sets torch's CPU threads for the scoring: the
same ledger scored on 1 and on 2 threads tells the scoring's own noise apart. For the reproducibility study of
docs/many-edits.md ("What running a command again changes").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rome.pipeline.core.loading import configure, load_configured
from rome.pipeline.editors.ledger import Ledger
from rome.pipeline.evaluation.ask import ledger_applied
from rome.pipeline.evaluation.retention import heldout_texts, perplexity


def first_entries(ledger: Ledger, edits: int) -> Ledger:
    """The ledger's first entries holding ``edits`` requests (an error if no prefix holds exactly that many)."""
    count = 0
    for i, entry in enumerate(ledger.entries):
        count += len(entry.get("requests") or [entry.get("request")])
        if count == edits:
            return Ledger(ledger.dir, {**ledger.data, "entries": ledger.entries[: i + 1]})
    raise SystemExit(f"error: {ledger.dir} has no prefix of exactly {edits} edits ({count} in all)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ledgers", nargs="+", type=Path, help="edit.out directories made on one model")
    parser.add_argument("--at", default="1000", help="comma-separated edit counts (default 1000)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the scoring (default 1)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="../shared/data/wikipedia/wikipedia_en_sample.jsonl.gz")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = configure([f"model.name={args.model}"])
    loaded = load_configured(cfg.model, "cpu")
    texts, records = heldout_texts(args.data, int(cfg.eval.heldout.articles))
    ledgers = [Ledger.open(d, create=False) for d in args.ledgers]
    print(f"held-out perplexity (records {records.start}-{records.stop - 1}), {args.threads} thread(s)")
    for edits in (int(n) for n in args.at.split(",")):
        weights = []
        for ledger in ledgers:
            prefix = first_entries(ledger, edits)
            with ledger_applied(loaded, prefix):  # the base weights again on leaving, bitwise
                ppl = perplexity(
                    loaded.model,
                    loaded.tokenizer,
                    loaded.spec,
                    texts,
                    int(cfg.eval.heldout.max_length),
                    int(cfg.eval.heldout.batch_size),
                )
                weights.append({name: w.detach().clone() for name, w in prefix.edited_weights(loaded.model).items()})
            print(f"  {ledger.dir}: after {edits} edits: ppl {ppl:.6g}", flush=True)
        for other in weights[1:]:
            diff = max(
                float((other[n].double() - w.double()).norm() / w.double().norm()) for n, w in weights[0].items()
            )
            print(f"  after {edits} edits: max relative weight difference to the first ledger's model {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
