"""Generative evaluation: what the model says when it is asked, not what it would say if led.

The paper's metrics are teacher-forced: the target's tokens are fed in and only their probability is read,
which can call an edit a success although the model never produces the target (Yang et al. 2025, "The
Mirage of Model Editing", arXiv 2502.11177). Here every prompt of a case is continued GREEDILY by the model
itself, with no teacher forcing and no truncation to the target's length, and the text is scored:

- continuation: the new tokens, decoded, leading whitespace removed, cut at the first newline and then after
  the first sentence end (``.``, ``!`` or ``?`` followed by whitespace or the end of the text);
- normalised: lower-cased, whitespace runs made one space, leading quotes / asterisks / underscores /
  backticks / brackets stripped (the markup an instruct model puts around an answer);
- exact match (EM): the normalised continuation, a leading article (a, an, the) removed unless the target
  starts with one, starts with the normalised target as a whole word (the character after it, if any, is not
  a letter, digit or underscore): " the French language." matches "French", " Frenchman" does not;
- contains: the normalised target occurs in the normalised continuation as a whole word.

Prompt sets: the rewrite prompt and its paraphrases against the new object (efficacy, generalisation) and
the neighbourhood prompts against their true object (specificity). With a chat template (instruct models)
each prompt is also asked through it as ``eval.generative.chat_prompt`` (a zsRE question as it is); the
reply is scored the same way after a leading echo of the prompt is removed ("chat" metrics).
Every generation is batched across prompts and cases (``batch_size`` per ``generate`` call), greedy and so
deterministic.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from rome.pipeline.core.generation import generate_tokens
from rome.pipeline.errors import UserError
from rome.pipeline.evaluation.cases import EvalCase

__all__ = [
    "GenerativeEval",
    "generative_settings",
    "resolve_chat",
    "chat_text",
    "continuation",
    "normalise",
    "exact_match",
    "contains",
    "score_generative",
    "SETS",
    "metric_keys",
]

# the prompt sets and the name of their score, per dataset kind (the teacher-forced metric they stand beside)
SETS = {"counterfact": ("es", "ps", "ns"), "zsre": ("efficacy", "paraphrase", "specificity")}
FORMS = ("gen", "chat")  # the plain prompt continued; the prompt asked through the chat template
SCORES = ("em", "contains")


def metric_keys(kind: str) -> list[str]:
    """Every generative metric key of a dataset kind, e.g. ``es_gen_em``, ``ns_chat_contains``."""
    return [f"{s}_{form}_{score}" for form in FORMS for s in SETS[kind] for score in SCORES]


@dataclasses.dataclass(frozen=True)
class GenerativeEval:
    """``eval.generative`` in configs/config.yaml, with ``chat`` resolved against the tokenizer."""

    enabled: bool
    max_tokens: int  # new tokens at most per prompt (the text is then cut at the first sentence end / newline)
    batch_size: int  # prompts per generate call
    chat: bool  # also ask each prompt through the tokenizer's chat template
    chat_prompt: str  # the user message, with {prompt} where the prompt goes (a question ending in ? as it is)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_chat(value: Any, tokenizer: Any, key: str) -> bool:
    """A ``chat`` setting (null or auto: when the tokenizer has a chat template; true; false) as a bool;
    ``key`` names it in the error."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat = {None: has_template, "auto": has_template, "true": True, "false": False}.get(
        value if isinstance(value, bool) else (None if value is None else str(value).lower()), value
    )
    if not isinstance(chat, bool):
        raise UserError(f"{key}={value} must be null (auto), auto, true or false")
    if chat and not has_template:
        raise UserError(f"{key}=true needs a tokenizer with a chat template; set it to auto or false")
    return chat


def chat_text(tokenizer: Any, prompt: str, chat_prompt: str) -> str:
    """``prompt`` asked through the tokenizer's chat template as the user's message: ``chat_prompt`` with
    {prompt} filled in, or a question (ending in ?) as it is; the text holds its special tokens."""
    ask = prompt if prompt.rstrip().endswith("?") else chat_prompt.format(prompt=prompt)
    return tokenizer.apply_chat_template([{"role": "user", "content": ask}], tokenize=False, add_generation_prompt=True)


def generative_settings(node: Any, tokenizer: Any) -> GenerativeEval:
    """The settings from the ``eval.generative`` node; ``chat`` null (or auto) is on when the tokenizer has a
    chat template."""
    chat = resolve_chat(node.chat, tokenizer, "eval.generative.chat")
    if int(node.max_tokens) <= 0 or int(node.batch_size) <= 0:
        raise UserError(
            f"eval.generative.max_tokens={node.max_tokens} and batch_size={node.batch_size} must be positive "
            "(eval.generative.enabled=false turns the generative evaluation off)"
        )
    if "{prompt}" not in str(node.chat_prompt):
        raise UserError(f"eval.generative.chat_prompt={node.chat_prompt!r} must hold {{prompt}}")
    return GenerativeEval(bool(node.enabled), int(node.max_tokens), int(node.batch_size), chat, str(node.chat_prompt))


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_ARTICLE = re.compile(r"(a|an|the) ")
_LEAD = "\"'*_`([{“‘"  # markup around an answer, stripped before matching


def continuation(text: str) -> str:
    """The generated text up to its first newline, then up to and including its first sentence end."""
    text = text.lstrip().split("\n", 1)[0]
    end = _SENTENCE_END.search(text)
    return text[: end.end()] if end else text


_SETTLED = re.compile(r"\S[^\n]*\n|[.!?]\s")


def settled(text: str) -> bool:
    """True once more tokens cannot change ``continuation(text)``: a newline after some text, or a sentence end
    followed by whitespace (generation may stop there)."""
    return bool(_SETTLED.search(text.lstrip()))


def normalise(text: str) -> str:
    """Lower-cased, whitespace runs made one space, leading quotes / markup stripped."""
    return " ".join(text.lower().split()).lstrip(_LEAD)


def _target(target: str) -> str:
    return " ".join(target.lower().split())


def exact_match(text: str, target: str, echo: str = "") -> bool:
    """``text`` (a continuation) starts with ``target`` as a whole word, both normalised, after a leading
    article of the text (unless the target has one); ``echo``: a prefix the text may repeat first (a chat reply
    restating the prompt), removed before matching."""
    t, want = _after_echo(normalise(text), echo), _target(target)
    article = _ARTICLE.match(t)
    if article and not _ARTICLE.match(want):
        t = t[article.end() :]
    if not want or not t.startswith(want):
        return False
    rest = t[len(want) :]
    return not rest or not (rest[0].isalnum() or rest[0] == "_")


def contains(text: str, target: str, echo: str = "") -> bool:
    """``target`` occurs in ``text`` as a whole word, both normalised; ``echo``: a prefix the text may repeat
    first, not searched (a prompt that itself names the target is not an answer naming it)."""
    want = _target(target)
    return bool(want) and re.search(rf"(?<!\w){re.escape(want)}(?!\w)", _after_echo(normalise(text), echo)) is not None


def _after_echo(text: str, echo: str) -> str:
    """``text`` (normalised) without a leading repetition of ``echo`` (a chat reply restating the prompt)."""
    if echo and text.startswith(_target(echo)):
        return normalise(text[len(_target(echo)) :])
    return text


@dataclasses.dataclass(frozen=True)
class _Job:
    case: int  # position in the case list
    set: str  # es / ps / ns (or zsRE's names)
    form: str  # gen / chat
    prompt: str  # as the case has it
    target: str
    text: str  # what the model is given


def _jobs(cases: Sequence[EvalCase], settings: GenerativeEval, tokenizer: Any, sets: Sequence[str]) -> list[_Job]:
    jobs = []
    for i, c in enumerate(cases):
        r = c.request
        names = SETS[c.kind]
        groups = {
            names[0]: [(r.text, r.target_new)],
            names[1]: [(p, r.target_new) for p in r.paraphrases],
            names[2]: list(zip(r.neighbours, c.neighbour_targets)),
        }
        for name, pairs in groups.items():
            if name not in sets:
                continue
            for prompt, target in pairs:
                if not target:
                    continue
                jobs.append(_Job(i, name, "gen", prompt, target, prompt))
                if settings.chat:
                    chat = chat_text(tokenizer, prompt, settings.chat_prompt)
                    jobs.append(_Job(i, name, "chat", prompt, target, chat))
    return jobs


@torch.no_grad()
def score_generative(
    model: torch.nn.Module,
    tokenizer: Any,
    cases: Sequence[EvalCase],
    settings: GenerativeEval,
    sets: Sequence[str] | None = None,
    between: Callable[[], None] | None = None,
    desc: str | None = None,
) -> list[dict[str, Any]]:
    """Per case: {"metrics": {"<set>_<form>_<em|contains>": mean over the set's prompts}, "texts": {"<set>_<form>":
    [continuation, ...]}}. ``sets``: only these prompt sets (default all). Prompts of all cases are generated
    together, sorted by length (less padding), ``settings.batch_size`` per call; the chat form's text already
    holds its special tokens, so it is encoded without adding them. ``desc``: a progress bar of that name over
    the ``generate`` calls (minutes for hundreds of cases on a CPU)."""
    out: list[dict[str, Any]] = [{"metrics": {}, "texts": {}} for _ in cases]
    if not settings.enabled or not cases:
        return out
    jobs = _jobs(cases, settings, tokenizer, sets or [s for c in cases[:1] for s in SETS[c.kind]])
    texts: list[str] = [""] * len(jobs)
    calls = []  # (form, job indices): each form's prompts sorted by length, batch_size per generate call
    for form in FORMS:
        todo = sorted((j for j, job in enumerate(jobs) if job.form == form), key=lambda j: len(jobs[j].text))
        calls += [(form, todo[b : b + settings.batch_size]) for b in range(0, len(todo), settings.batch_size)]
    for form, chunk in tqdm(calls, desc=desc, disable=desc is None, leave=False, dynamic_ncols=True):
        if between is not None:
            between()  # the caller's stop check: a long scoring can be abandoned between calls
        new = generate_tokens(
            model,
            tokenizer,
            [jobs[j].text for j in chunk],
            settings.max_tokens,
            top_k=None,
            exact_length=False,
            add_special_tokens=form == "gen",
            done=settled,
        )
        for j, row in zip(chunk, new):
            texts[j] = continuation(tokenizer.decode(row, skip_special_tokens=True))
    hits: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for job, text in zip(jobs, texts):
        echo = job.prompt if job.form == "chat" else ""
        score = (float(exact_match(text, job.target, echo)), float(contains(text, job.target)))
        hits.setdefault((job.case, f"{job.set}_{job.form}"), []).append(score)
        out[job.case]["texts"].setdefault(f"{job.set}_{job.form}", []).append(text)
    for (i, key), scores in hits.items():
        out[i]["metrics"][f"{key}_em"] = sum(s[0] for s in scores) / len(scores)
        out[i]["metrics"][f"{key}_contains"] = sum(s[1] for s in scores) / len(scores)
    return out
