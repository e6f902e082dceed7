"""Score one case on the model as it is now: the paper's probabilities (or zsRE token accuracy), then
text generated from the generation prompts for fluency (GE) and the reference score (RS), and the generative
scores (``pipeline.evaluation.generative``: greedy continuations, exact match and "contains").

Every forward pass of a case's scoring is one batched call; generation is one batched ``generate`` call.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rome.pipeline.core.generation import generate_tokens
from rome.pipeline.core.probability import new_and_true_probs, target_argmax, target_probs
from rome.pipeline.evaluation.cases import EvalCase
from rome.pipeline.evaluation.generative import GenerativeEval, score_generative
from rome.pipeline.evaluation.metrics import TfIdf, counterfact_case, fluency, token_accuracy

__all__ = [
    "Generation",
    "References",
    "score_case",
    "generate",
    "counterfact_scores",
    "zsre_scores",
    "teacher_forced_scores",
]


@dataclasses.dataclass(frozen=True)
class Generation:
    """How GE/RS texts are generated (``eval.generation`` in configs/config.yaml)."""

    tokens: int  # new tokens per generation prompt (0: no generation, no GE)
    top_k: int  # the paper samples top-k (k = 5); do_sample=False is greedy
    do_sample: bool


@dataclasses.dataclass
class References:
    """Reference snippets per (relation_id, target id) and the TF-IDF fitted on all of them."""

    snippets: dict[tuple[str, str], list[str]]
    tfidf: TfIdf

    @classmethod
    def build(cls, snippets: dict[tuple[str, str], list[str]]) -> References:
        return cls(snippets, TfIdf(t for texts in snippets.values() for t in texts))

    def score(self, case: EvalCase, texts: Sequence[str]) -> float | None:
        refs = self.snippets.get((case.relation_id, case.target_new_id))
        if not refs:
            return None
        return self.tfidf.similarity(" ".join(texts), " ".join(refs))


def _counterfact_probs(
    model: nn.Module, tok: Any, case: EvalCase, batch_size: int
) -> dict[str, dict[str, list[float]]]:
    r = case.request
    sets = {
        "prompt": ([r.text], [r.target_true]),
        "paraphrases": (r.paraphrases, [r.target_true] * len(r.paraphrases)),
        "neighbours": (r.neighbours, case.neighbour_targets),
    }
    return new_and_true_probs(model, tok, sets, r.target_new, batch_size)


def counterfact_scores(
    model: nn.Module, tok: Any, cases: Sequence[EvalCase], batch_size: int
) -> list[dict[str, float]]:
    """ES/EM, PS/PM, NS/NM of many CounterFact cases, their prompts batched across cases (``batch_size``
    (prompt, target) pairs per forward pass): the many-edit runs score hundreds of cases at a time."""
    prompts: list[str] = []
    targets: list[str] = []
    spans: list[dict[str, tuple[int, int]]] = []
    for c in cases:
        r = c.request
        sets = {
            "prompt": ([r.text], [r.target_true]),
            "paraphrases": (list(r.paraphrases), [r.target_true] * len(r.paraphrases)),
            "neighbours": (list(r.neighbours), list(c.neighbour_targets)),
        }
        own = {}
        for name, (ps, trues) in sets.items():
            if ps:
                own[name] = (len(prompts), len(ps))
                prompts += ps + ps
                targets += [r.target_new] * len(ps) + trues
        spans.append(own)
    p = target_probs(model, tok, prompts, targets, batch_size).tolist() if prompts else []
    return [
        counterfact_case({name: {"new": p[s : s + n], "true": p[s + n : s + 2 * n]} for name, (s, n) in own.items()})
        for own in spans
    ]


def zsre_scores(model: nn.Module, tok: Any, cases: Sequence[EvalCase], batch_size: int) -> list[dict[str, float]]:
    """Efficacy, paraphrase and specificity accuracy (zsRE's teacher-forced token accuracy) of many cases, their
    prompts batched across cases (``batch_size`` (prompt, answer) pairs per forward pass)."""
    prompts: list[str] = []
    targets: list[str] = []
    spans: list[tuple[int, int, int]] = []  # per case: first pair, paraphrases, neighbours
    for c in cases:
        r = c.request
        spans.append((len(prompts), len(r.paraphrases), len(r.neighbours)))
        prompts += [r.text, *r.paraphrases, *r.neighbours]
        targets += [r.target_new] * (1 + len(r.paraphrases)) + list(c.neighbour_targets)
    acc = [token_accuracy(p, t) for p, t in target_argmax(model, tok, prompts, targets, batch_size)] if prompts else []
    out = []
    for start, n_para, n_neigh in spans:
        own = {"efficacy": acc[start]}
        if n_para:
            own["paraphrase"] = sum(acc[start + 1 : start + 1 + n_para]) / n_para
        if n_neigh:
            own["specificity"] = sum(acc[start + 1 + n_para : start + 1 + n_para + n_neigh]) / n_neigh
        out.append(own)
    return out


def teacher_forced_scores(
    model: nn.Module, tok: Any, cases: Sequence[EvalCase], batch_size: int
) -> list[dict[str, float]]:
    """The paper's metrics of many cases of one dataset kind: CounterFact's probabilities or zsRE's accuracy."""
    kinds = {c.kind for c in cases}
    if len(kinds) > 1:
        raise ValueError(f"cases of several kinds scored together: {sorted(kinds)}")
    if kinds == {"zsre"}:
        return zsre_scores(model, tok, cases, batch_size)
    return counterfact_scores(model, tok, cases, batch_size)


@torch.no_grad()
def generate(model: nn.Module, tok: Any, prompts: Sequence[str], gen: Generation, seed: int) -> list[str]:
    """Prompt + continuation for every prompt, in one left-padded batch; seeded (sampling is per case)."""
    new = generate_tokens(model, tok, prompts, gen.tokens, top_k=gen.top_k if gen.do_sample else None, seed=seed)
    return [p + tok.decode(row, skip_special_tokens=True) for p, row in zip(prompts, new)]


def score_case(
    model: torch.nn.Module,
    tok: Any,
    case: EvalCase,
    gen: Generation,
    seed: int,
    batch_size: int,
    refs: References | None = None,
    generative: GenerativeEval | None = None,
) -> dict[str, Any]:
    """{"metrics": {...}, "probs": {...} (CounterFact), "generations": [...], "greedy": {...} (with
    ``generative``: the greedy continuations, their scores in "metrics"), "timings": {"score", "generate",
    "greedy"}}."""
    t = time.perf_counter()
    out: dict[str, Any] = {}
    if case.kind == "counterfact":
        out["probs"] = _counterfact_probs(model, tok, case, batch_size)
        out["metrics"] = counterfact_case(out["probs"])
    else:
        out["metrics"] = zsre_scores(model, tok, [case], batch_size)[0]
    timings = {"score": time.perf_counter() - t}
    if case.kind == "counterfact" and gen.tokens > 0 and case.generation_prompts:
        t = time.perf_counter()
        texts = generate(model, tok, case.generation_prompts, gen, seed)
        out["generations"] = texts
        out["metrics"]["ge"] = fluency(texts)
        rs = refs.score(case, texts) if refs is not None else None
        if rs is not None:
            out["metrics"]["rs"] = rs
        timings["generate"] = time.perf_counter() - t
    if generative is not None and generative.enabled:
        t = time.perf_counter()
        (scored,) = score_generative(model, tok, [case], generative)
        out["metrics"].update(scored["metrics"])
        out["greedy"] = scored["texts"]
        timings["greedy"] = time.perf_counter() - t
    out["timings"] = timings
    return out
