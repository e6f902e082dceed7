"""What an edited model still knows: perplexity on held-out text and accuracy on facts it knew.

- ``heldout_texts``: the last articles of a local text file (the statistics read a file from its start, so
  with a budget that ends before them these articles never entered C; ``texts_read`` says how far C read);
- ``perplexity``: exp(mean next-token NLL over every token of those texts, truncated to ``max_length``);
  ``HeldoutPerplexity`` takes it again at every checkpoint without recomputing the blocks no edit changes;
- ``known_facts`` / ``fact_accuracy``: of known_1000's facts, those the unedited model answers (the trace
  stage's rule), and the share it still answers after editing;
- ``unrelated_facts``: the facts left once those about a subject the run edits are set aside (an edit may rightly
  change them: "Italy's capital" after "The official language of Italy" is rewritten);
- ``weight_change``: how far edited matrices have moved, ||W - W0|| / ||W0|| (Frobenius) per layer.
"""

from __future__ import annotations

import gzip
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rome.pipeline.core.arch import ArchSpec
from rome.pipeline.core.hooks import Trace, get_module, skipped
from rome.pipeline.core.padding import right_pad
from rome.pipeline.core.probability import predicts_many
from rome.pipeline.core.subject import fill_prompt
from rome.pipeline.core.timing import model_device
from rome.pipeline.errors import UserError
from rome.pipeline.tracing.facts import Fact

__all__ = [
    "heldout_texts",
    "texts_read",
    "perplexity",
    "HeldoutPerplexity",
    "known_facts",
    "fact_accuracy",
    "unrelated_facts",
    "weight_change",
]


def _lines(path: str | Path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def heldout_texts(path: str | Path, n: int, text_field: str = "text") -> tuple[list[str], range]:
    """The last ``n`` records' texts of a .jsonl(.gz) file and their record range."""
    if not str(path).endswith((".jsonl", ".jsonl.gz")):
        raise UserError(f"held-out text must come from a local .jsonl(.gz) file (data.files); got {path}")
    records = [r.get(text_field) or "" for r in _lines(path)]
    if n <= 0 or n >= len(records):
        raise UserError(f"eval.heldout.articles={n} must be between 1 and {len(records) - 1} for {path}")
    return records[-n:], range(len(records) - n, len(records))


def texts_read(path: str | Path, tokenizer: Any, tokens: int, max_length: int, text_field: str = "text") -> int:
    """How many records a one-shard statistics run of ``tokens`` tokens (texts truncated to ``max_length``)
    reads from the start of ``path``."""
    seen = 0
    for i, rec in enumerate(_lines(path)):
        if seen >= tokens:
            return i
        seen += len(tokenizer(rec.get(text_field) or "", truncation=True, max_length=max_length)["input_ids"])
    return i + 1


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    spec: ArchSpec,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
    head_rows: int = 1024,
) -> float:
    """exp of the mean next-token negative log-likelihood over all tokens of ``texts`` (each truncated).

    On a CPU this check is the collapse monitor's largest cost, so it does only the work the number needs: the
    rows go longest first (each batch's rows of similar length: little padding), the pass stops at the final
    norm, and the LM head runs on the real tokens only, ``head_rows`` at a time (the full [rows, width, vocab]
    logits of a batch are never held; the model's own soft-cap applies, ``ArchSpec.logits``). A run that takes it
    again and again while editing blocks from some layer on: ``HeldoutPerplexity``."""
    return HeldoutPerplexity(model, tokenizer, spec, texts, max_length, batch_size, head_rows=head_rows)()


class HeldoutPerplexity:
    """``perplexity`` of the same texts, taken at every checkpoint of a many-edit run.

    The run edits blocks ``frozen_below`` and later only, so the blocks before them give the held-out texts the
    same hidden states at every checkpoint (for UltraEdit on SmolLM2-135M, layers 19-27: 19 of the 30 blocks).
    The first call runs the whole model and keeps the input of block ``frozen_below`` (on the model's device,
    if it takes at most ``keep_bytes``); every later call runs the model with those blocks skipped
    (``hooks.skipped``: they hand on the kept states), which gives the whole pass's number exactly: block
    ``frozen_below`` on receives the same tensors. The first call checks that once, bit for bit, and drops the
    kept states (with a note) where it does not hold; every call then runs the whole model."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        spec: ArchSpec,
        texts: Sequence[str],
        max_length: int,
        batch_size: int,
        frozen_below: int = 0,
        head_rows: int = 1024,
        keep_bytes: int = 1 << 30,
    ) -> None:
        self.model, self.spec, self.head_rows = model, spec, head_rows
        self.frozen_below, self.keep_bytes = frozen_below, keep_bytes
        device = model_device(model)
        rows = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
        rows = sorted((r for r in rows if len(r) > 1), key=len, reverse=True)  # the sum does not depend on the order
        pad = tokenizer.pad_token_id or 0
        self.batches = [right_pad(rows[i : i + batch_size], pad, device) for i in range(0, len(rows), batch_size)]
        self.count = sum(len(r) - 1 for r in rows)  # the tokens predicted: every one but each row's first
        self.kept: list[torch.Tensor] | None = None  # block frozen_below's input, per batch
        self.skips = 0  # calls that skipped the frozen blocks

    @torch.no_grad()
    def __call__(self) -> float:
        if self.kept is not None:
            self.skips += 1
            return self._perplexity(self._skipping_pass())
        if self.frozen_below <= 0:
            return self._perplexity(self._pass())
        block = get_module(self.model, self.spec.block_name(self.frozen_below))
        kept: list[torch.Tensor] = []
        total = self._pass(block, kept)
        if sum(t.numel() * t.element_size() for t in kept) > self.keep_bytes:
            self.frozen_below = 0  # too large to keep: every call runs the whole model
        else:
            self.kept = kept
            if not torch.equal(self._skipping_pass(), total):
                warnings.warn(
                    f"held-out perplexity: skipping the blocks before layer {self.frozen_below} changes its value "
                    "on this model, so every checkpoint runs the whole model",
                    stacklevel=2,
                )
                self.kept, self.frozen_below = None, 0
        return self._perplexity(total)

    def _perplexity(self, total: torch.Tensor) -> float:
        return float(torch.exp(total / self.count))

    def _skipping_pass(self) -> torch.Tensor:
        """The summed NLL, the blocks before ``frozen_below`` handing on the kept states."""
        blocks = [get_module(self.model, self.spec.block_name(i)) for i in range(self.frozen_below)]
        current: list[torch.Tensor] = []
        with skipped(blocks, lambda: current[0]):
            total = torch.zeros((), dtype=torch.float64, device=model_device(self.model))
            for (ids, mask), hidden in zip(self.batches, self.kept):
                current[:] = [hidden]
                self._add_nll(ids, mask, total)
        return total

    def _pass(self, block: nn.Module | None = None, kept: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The summed NLL of the whole model; with ``block``, its input per batch appended to ``kept``."""
        total = torch.zeros((), dtype=torch.float64, device=model_device(self.model))
        for ids, mask in self.batches:
            if block is None:
                self._add_nll(ids, mask, total)
                continue
            with Trace(block, retain_input=True) as entry:
                self._add_nll(ids, mask, total)
            kept.append(entry.input)
        return total

    def _add_nll(self, ids: torch.Tensor, mask: torch.Tensor, total: torch.Tensor) -> None:
        """Add one batch's next-token NLL to ``total`` (float64), ``head_rows`` tokens at a time."""
        with Trace(get_module(self.model, self.spec.final_norm), retain_output=True, stop=True) as final:
            self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        keep = mask[:, 1:].bool()
        hidden, targets = final.output[:, :-1][keep], ids[:, 1:][keep]
        for j in range(0, len(targets), self.head_rows):
            logits = self.spec.logits(self.model, hidden[j : j + self.head_rows])
            nll = torch.nn.functional.cross_entropy(logits, targets[j : j + self.head_rows], reduction="none")
            total += nll.double().sum()


def known_facts(model: nn.Module, tokenizer: Any, facts: Sequence[Fact]) -> list[Fact]:
    """The facts the model knows, by the trace stage's rule (``pipeline.core.probability.predicts``: its greedy
    continuation, as long as the answer, starts with the answer), decoded in batches (``predicts_many``)."""
    texts = [fill_prompt(f.prompt, f.subject)[0] for f in facts]
    known = predicts_many(model, tokenizer, texts, [f.answer for f in facts])
    return [f for f, (yes, _) in zip(facts, known) if yes]


def fact_accuracy(model: nn.Module, tokenizer: Any, facts: Sequence[Fact]) -> float:
    """The share of ``facts`` the model knows."""
    return len(known_facts(model, tokenizer, facts)) / max(1, len(facts))


def _subject_key(subject: str) -> str:
    return " ".join(subject.split()).casefold()


def unrelated_facts(facts: Sequence[Fact], edited_subjects: Sequence[str]) -> tuple[list[Fact], list[Fact]]:
    """(kept, set aside): ``facts`` split by whether their subject is one of ``edited_subjects`` (compared
    case-insensitively, whitespace collapsed). A retention check that kept them would count an edit that rightly
    changes what the model says about its own subject as knowledge lost: CounterFact records 0-9,999 share a
    subject with 35 of the 70 known_1000 facts SmolLM2-135M answers (4 within records 0-999)."""
    edited = {_subject_key(s) for s in edited_subjects}
    kept, aside = [], []
    for fact in facts:
        (aside if _subject_key(fact.subject) in edited else kept).append(fact)
    return kept, aside


@torch.no_grad()
def weight_change(weights: Mapping[int, torch.Tensor], clean: Mapping[int, torch.Tensor]) -> dict[str, float]:
    """{str(layer): ||W - W0|| / ||W0||} (Frobenius norms in float32) of each edited matrix against its clean
    copy; keys are strings so the record reads the same from JSON."""
    return {
        str(layer): float((w.float() - clean[layer].float()).norm() / clean[layer].float().norm())
        for layer, w in sorted(weights.items())
    }
