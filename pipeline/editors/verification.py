"""Verification that means it: an edit took when the model now *says* the new object, and a fact the model
did not know to begin with is flagged.

P(new) > P(true) alone calls an edit a success whenever P(true) is tiny: on SmolLM2, 3 v* steps towards
"The Eiffel Tower is located in the city of Rome" with target_true London lift P(Rome) to 0.085 over a P(London)
of 0.002 while the model still says "Paris" (docs/edit.md#verification).
So, on the rewrite prompt, an edit must also pass one of (``edit.verify`` in configs/config.yaml):

- ``generative=true`` (the default): the model's greedy continuation of the prompt starts with the new object,
  scored as the generative evaluation scores it (``pipeline.evaluation.generative.exact_match``: lower-cased,
  markup and a leading article stripped, the object as a whole word), ``answer_tokens`` tokens long or the
  object's tokens + 1, whichever is more; with ``chat`` on (auto: the tokenizer has a chat template, i.e. an
  instruct model) the prompt is also asked through the template as the generative evaluation's chat form
  (``chat_prompt``) and a reply that names the new object (``contains``) passes too: an instruct model is asked
  that way (``rome ask`` does), and an edit it answers with there has taken although the bare continuation
  may differ (on SmolLM2-135M-Instruct, 13 of the 21 in 100 CounterFact edits that fail the bare check;
  docs/eval.md, "The key variant by what the model says");
- ``generative=false``: P(new) >= ``min_p_new`` on the prompt (default 0.5: a token whose probability is
  above one half is the argmax whatever the rest of the vocabulary holds, so for a one-token object greedy
  decoding produces it; for a longer one P is the per-token geometric mean, the same bar on average).

Before the edit, a request's ``target_true`` is checked the way the trace stage keeps only known facts
(``pipeline.core.probability.predicts``: the greedy continuation, as long as the answer, starts with it).
Without one, the model's own answer (the first word of its greedy continuation, ``with_own_answer``) stands in
for it, for every method: P(true) before and after is then the old answer's, recorded as ``true_from_model``.
A fact the model did not know is still edited, with a warning line (in the edit's ``warnings`` and its table;
ROME's ledger entry records ``checks`` and ``warnings``): its "before" is not a fact being changed, so "the edit
changed it" means little.

ROME (``pipeline/editors/rome.py``) runs these checks on each request beside its own (paraphrases,
neighbours, a disabling update) and rolls a failed edit back; the batch methods (``BatchEditor`` in
``base.py``: MEMIT, AlphaEdit, UltraEdit) run them on every request of a batch and mark the batch
``failed_verification`` when one fails (a batch is not rolled back). With ``edit.verify.enabled=false``
(and in the eval stage, which measures edits as made) none of this runs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from rome.pipeline.core.generation import generate_tokens
from rome.pipeline.core.probability import (
    greedy_continuation,
    new_and_true_probs,
    predicts,
    target_log_probs,
    target_token_ids,
)
from rome.pipeline.core.requests import EditRequest
from rome.pipeline.errors import UserError
from rome.pipeline.evaluation.generative import chat_text, contains, continuation, exact_match, resolve_chat, settled

__all__ = [
    "verification_record",
    "prompt_sets",
    "measure",
    "measure_prompt",
    "prompt_wins",
    "on_prompt",
    "check_settings",
    "chat_form",
    "answer_length",
    "said",
    "replies",
    "knowledge",
    "model_answer",
    "with_own_answer",
    "took_problem",
    "check_before",
    "check_after",
    "request_label",
    "unit_report",
]


def prompt_sets(request: EditRequest) -> dict[str, list[str]]:
    return {"prompt": [request.text], "paraphrases": list(request.paraphrases), "neighbours": list(request.neighbours)}


def measure(
    model: nn.Module, tokenizer: Any, request: EditRequest, batch_size: int
) -> dict[str, dict[str, list[float]]]:
    """P(target_new) and P(target_true) on the prompt, the paraphrases and the neighbours (one batched pass)."""
    sets = {name: (ps, [request.target_true] * len(ps)) for name, ps in prompt_sets(request).items()}
    return new_and_true_probs(model, tokenizer, sets, request.target_new, batch_size)


def prompt_wins(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], batch_size: int, desc: str | None = None
) -> int:
    """How many of ``requests`` the model prefers the new object on, P(target_new) > P(target_true) on the prompt,
    in batched passes: a batch edit's summary when it did not verify. ``measure`` request by request (with the
    paraphrases and neighbours) took 63 s per 200 CounterFact requests on SmolLM2, one CPU thread: about 53
    minutes after 10,000 UltraEdit edits that took 20; this takes 8.6 minutes, shown as a bar when ``desc``
    names it (chunks of 500 requests; batches of similar length form inside each chunk)."""
    won = 0
    chunks = [requests[i : i + 500] for i in range(0, len(requests), 500)]
    for chunk in tqdm(chunks, desc=desc, disable=desc is None or len(chunks) < 2, leave=False, dynamic_ncols=True):
        texts, n = [r.text for r in chunk], len(chunk)
        targets = [r.target_new for r in chunk] + [r.target_true for r in chunk]
        log_p = target_log_probs(model, tokenizer, texts + texts, targets, batch_size)
        won += int((log_p[:n] > log_p[n:]).sum())
    return won


def check_settings(verify: Any, tokenizer: Any) -> None:
    """``edit.verify``'s threshold is a probability and its chat form is one the tokenizer can ask (checked when
    an editor is built, before any work)."""
    if not 0 < float(verify.min_p_new) <= 1:
        raise UserError(f"edit.verify.min_p_new={verify.min_p_new} must be a probability in (0, 1]")
    chat_form(verify, tokenizer)


def chat_form(verify: Any, tokenizer: Any) -> str | None:
    """The chat form's user message when the check also asks through the chat template (``edit.verify.chat``
    resolved against the tokenizer, generative checks only), else None."""
    if not verify.generative or not resolve_chat(verify.chat, tokenizer, "edit.verify.chat"):
        return None
    if "{prompt}" not in str(verify.chat_prompt):
        raise UserError(f"edit.verify.chat_prompt={verify.chat_prompt!r} must hold {{prompt}}")
    return str(verify.chat_prompt)


def answer_length(tokenizer: Any, target: str, verify: Any) -> int:
    """New tokens of the continuation that is checked for ``target``: enough to hold it and tell it from a
    longer word (``Rome`` from ``Romeo``)."""
    return max(int(verify.answer_tokens), len(target_token_ids(tokenizer, target)) + 1)


def said(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    new_tokens: int,
    batch_size: int,
    chat_prompt: str | None = None,
) -> list[str]:
    """What the model says after each prompt: its greedy continuation, cut at the first newline or sentence
    end (``pipeline.evaluation.generative.continuation``); with ``chat_prompt``, its reply to the prompt asked
    through the chat template in that form (the chat text holds its special tokens)."""
    texts = [chat_text(tokenizer, p, chat_prompt) for p in prompts] if chat_prompt else list(prompts)
    out = []
    for i in range(0, len(texts), batch_size):
        new = generate_tokens(
            model,
            tokenizer,
            texts[i : i + batch_size],
            new_tokens,
            top_k=None,
            exact_length=False,
            add_special_tokens=chat_prompt is None,
            done=settled,
        )
        out += [continuation(tokenizer.decode(row, skip_special_tokens=True)) for row in new]
    return out


def replies(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], verify: Any, chat_prompt: str | None
) -> list[str | None]:
    """Per request, the chat form's reply to its prompt (None for each without ``chat_prompt``): long enough to
    restate the prompt and then give the object."""
    if chat_prompt is None:
        return [None] * len(requests)
    length = max(len(tokenizer(r.text)["input_ids"]) + answer_length(tokenizer, r.target_new, verify) for r in requests)
    return list(said(model, tokenizer, [r.text for r in requests], length, int(verify.batch_size), chat_prompt))


def knowledge(model: nn.Module, tokenizer: Any, request: EditRequest, p_true: float | None) -> dict[str, Any]:
    """Whether the unedited model knows the fact ``request`` changes (``known``: None without a target_true)
    and what it says; ``warning``: the line for a fact it does not know."""
    if request.target_true is None:
        return {"known": None, "said_before": None, "warning": None}
    known, text = predicts(model, tokenizer, request.text, request.target_true)
    warning = None
    if not known:
        p = f"; P(true) = {p_true:.4f}" if p_true is not None else ""
        warning = (
            f"warning: the model did not know this fact before the edit: it continues '{request.text}' with "
            f"'{text.strip()}', not '{request.target_true}'{p} (the edit writes a new fact rather than change one)"
        )
    return {"known": known, "said_before": text.strip(), "warning": warning}


def model_answer(model: nn.Module, tokenizer: Any, prompt: str, max_tokens: int) -> str | None:
    """The model's own answer to ``prompt``: the first word of its greedy continuation (None if it has none)."""
    found = re.search(r"\w[\w'-]*", greedy_continuation(model, tokenizer, prompt, max_tokens))
    return found.group(0) if found else None


def with_own_answer(model: nn.Module, tokenizer: Any, request: EditRequest, verify: Any) -> EditRequest | None:
    """``request`` with the unedited model's own answer as its ``target_true``, when it gives none: what
    verification compares the new object with, so that an edit that leaves the old answer in place shows it.
    None when a target_true is given, the model answers nothing, or it already answers the new object."""
    if request.target_true is not None:
        return None
    answer = model_answer(model, tokenizer, request.text, int(verify.answer_tokens))
    if not answer or answer.lower() == request.target_new.lower():
        return None
    return dataclasses.replace(request, target_true=answer)


def took_problem(
    target_new: str, text: str | None, p_new: float, verify: Any, reply: str | None = None, prompt: str = ""
) -> str | None:
    """Why the edit did not take on the prompt (None: it did): the model does not say ``target_new``
    (``text``: its continuation; ``reply``: its chat-form answer to ``prompt``, which may name it instead after
    restating the prompt), or with ``generative=false`` P(new) is below ``min_p_new``."""
    if verify.generative:
        if text is not None and exact_match(text, target_new):
            return None
        if reply is not None and contains(reply, target_new, echo=prompt):
            return None
        chat = f"; asked through its chat template it answers '{reply}'" if reply is not None else ""
        return f"the model does not say '{target_new}' on the prompt (it continues '{text}'{chat})"
    if p_new >= float(verify.min_p_new):
        return None
    return f"P(new) = {p_new:.4f} on the prompt is below edit.verify.min_p_new={verify.min_p_new}"


def check_before(model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], verify: Any) -> list[dict]:
    """Per request, on the unedited model: P(new) and P(true) on its prompt and whether it knows the fact; a
    request without a target_true is measured against the model's own answer (``true_from_model``: known by
    construction)."""
    checks = []
    for r in requests:
        own = with_own_answer(model, tokenizer, r, verify)
        p = measure_prompt(model, tokenizer, own or r, int(verify.batch_size))
        if own is not None:
            answer = own.target_true
            checks.append(
                {"p_before": p, "true_from_model": answer, "known": True, "said_before": answer, "warning": None}
            )
        else:
            checks.append({"p_before": p, **knowledge(model, tokenizer, r, p["true"])})
    return checks


def _compared(request: EditRequest, check: dict) -> EditRequest:
    """The request as its check measured it before the edit (with the model's own answer, if it stood in)."""
    own = check.get("true_from_model")
    return dataclasses.replace(request, target_true=own) if own else request


def check_after(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], checks: list[dict], verify: Any
) -> list[str]:
    """Per request, on the edited model: P(new) and P(true) on its prompt, what it says, whether the edit took
    (into ``checks``); returns a problem line per request that did not take."""
    texts: list[str | None] = [None] * len(requests)
    if verify.generative:
        length = max(answer_length(tokenizer, r.target_new, verify) for r in requests)
        texts = said(model, tokenizer, [r.text for r in requests], length, int(verify.batch_size))
    chats = replies(model, tokenizer, requests, verify, chat_form(verify, tokenizer))
    problems = []
    for r, check, text, reply in zip(requests, checks, texts, chats):
        p = measure_prompt(model, tokenizer, _compared(r, check), int(verify.batch_size))
        problem = took_problem(r.target_new, text, p["new"], verify, reply, r.text)
        check.update(p_after=p, said_after=text, took=problem is None)
        if reply is not None:
            check["said_in_chat"] = reply
        if problem:
            problems.append(f"{r.text} -> {r.target_new}: {problem}")
    return problems


def on_prompt(measured: dict[str, dict[str, list[float]]]) -> dict[str, float | None]:
    """P(new) and P(true) (None without a target_true) on the prompt, from ``measure``'s or
    ``new_and_true_probs``' result."""
    p = measured["prompt"]
    return {"new": p["new"][0], "true": p["true"][0] if p["true"] else None}


def measure_prompt(model: nn.Module, tokenizer: Any, request: EditRequest, batch_size: int) -> dict[str, float | None]:
    """P(new) and P(true) (None without a target_true) on the request's prompt alone."""
    sets = {"prompt": ([request.text], [request.target_true])}
    return on_prompt(new_and_true_probs(model, tokenizer, sets, request.target_new, batch_size))


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


REQUEST_WIDTH = 56  # the request column of a batch's table: the prompt is cut before its new object is


def request_label(text: str, target_new: str, target_true: str | None, width: int = REQUEST_WIDTH) -> str:
    """``text -> new (was true)`` in at most ``width`` characters: the prompt shortened first, so that what the
    request writes stays readable."""
    tail = f" -> {target_new}" + (f" (was {target_true})" if target_true else "")
    if len(text) + len(tail) <= width:
        return text + tail
    room = width - len(tail) - 1
    if room < 12:  # an object too long to keep whole: cut the whole label
        return (text + tail)[: width - 1] + "…"
    return text[:room].rstrip() + "…" + tail


def unit_report(
    entry_id: int | None, requests: Sequence[EditRequest], checks: list[dict], status: str, reason: str
) -> str:
    """A batch's lines for a terminal: per request P(true) and P(new) before and after on its prompt, what the
    model says after and whether the edit took; the warnings; the batch's status."""
    lines = [f"[{entry_id or '-'}] a batch of {len(requests)} request(s)"]
    if checks:
        lines.append(
            f"  {'request':<{REQUEST_WIDTH}} {'P(true) before':>14} {'P(true) after':>14} {'P(new) before':>14} "
            f"{'P(new) after':>13}  took  says after"
        )
    for i, r in enumerate(requests):
        c = checks[i] if i < len(checks) else {}
        before, after = c.get("p_before", {}), c.get("p_after", {})
        took = {True: "yes", False: "no", None: "-"}[c.get("took")]
        name = request_label(r.text, r.target_new, r.target_true or c.get("true_from_model"))
        lines.append(
            f"  {name:<{REQUEST_WIDTH}} {_p(before.get('true')):>14} {_p(after.get('true')):>14} "
            f"{_p(before.get('new')):>14} {_p(after.get('new')):>13}  {took:<4}  {c.get('said_after') or ''}"
            + (f" | chat: {c['said_in_chat']}" if c.get("said_in_chat") is not None else "")
        )
    if any(c.get("true_from_model") for c in checks):
        lines.append(
            "  (was ...): the request's target_true, or the model's own answer before the edit where it gives none"
        )
    lines += [f"  {c['warning']}" for c in checks if c.get("warning")]
    lines.append(f"  status: {status}" + (f" ({reason})" if reason else ""))
    return "\n".join(lines)


def verification_record(checks: list[dict], status: str, reason: str) -> dict[str, Any]:
    """What a batch's ledger entry keeps of its verification (empty when it was not verified): per request the
    checks (P before / after, what the model said, whether it took, the warning), the batch's verdict and why.
    The entry's own ``status`` stays ``applied``: a batch that failed verification is still in the weights."""
    if not checks:
        return {}
    return {"verification": {"status": status, "reason": reason, "checks": checks}}
