"""P(x | prompt) as the paper defines it: exp(mean log-probability of the tokens of " " + x after prompt),
batched over (prompt, target) pairs; greedy continuations; and whether the model predicts an answer."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rome.pipeline.core.generation import generate_tokens
from rome.pipeline.core.padding import right_pad
from rome.pipeline.core.timing import model_device

__all__ = [
    "target_log_probs",
    "target_probs",
    "target_argmax",
    "greedy_continuation",
    "target_token_ids",
    "keeps_logits",
    "new_and_true_probs",
    "answer_tokens",
    "greedy_tokens",
    "predicts",
    "predicts_many",
]


def target_token_ids(tokenizer: Any, target: str) -> list[int]:
    """Tokens of ``" " + target`` as they follow a prompt (no special tokens)."""
    return tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (every family transformers ships; a remote-code model
    may not): its LM head then runs on the positions asked for only."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _teacher_forced(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int,
    read: Callable[[torch.Tensor, torch.Tensor], Any],
) -> list[Any]:
    """For each (prompt, target), in the pairs' order: ``read(logp, tokens)`` of the log-probabilities [n, vocab]
    at the positions predicting the n tokens of " " + target, and those tokens.

    Only the work the scores need: the pairs go in batches of similar length (right-padded, so little padding),
    and the LM head and the log-softmax run at the target positions alone (``logits_to_keep``, a row mask), not
    over every position of every prompt: 2.2x faster on SmolLM2, 5x on Gemma 3 270M, whose 262k-token vocabulary
    made the head most of the cost; the scores move by float rounding only (docs/benchmarks.md, "Teacher-forced
    scoring")."""
    device = model_device(model)
    pairs = []
    for p, t in zip(prompts, targets):
        p_ids = tokenizer(p)["input_ids"]
        pairs.append((p_ids + target_token_ids(tokenizer, t), len(p_ids)))
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    keep_only = keeps_logits(model)
    out: list[Any] = [None] * len(pairs)
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        ids, mask = right_pad([pairs[i][0] for i in batch], tokenizer.pad_token_id or 0, device)
        wanted = torch.zeros(ids.shape, dtype=torch.bool)  # the positions that predict a target token
        for row, i in enumerate(batch):
            row_ids, start = pairs[i]
            wanted[row, start - 1 : len(row_ids) - 1] = True
        wanted = wanted.to(device)  # made on the host: one copy, not a launch per row
        logits = None
        if keep_only:  # [wanted positions, vocab], row by row, each row's positions in order
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=wanted).logits
            logits = logits.reshape(-1, logits.shape[-1])
        if logits is None or len(logits) != int(wanted.sum()):  # no such argument, or a forward that reads it
            logits = model(input_ids=ids, attention_mask=mask).logits[wanted]  # otherwise: every position's head
        logp = torch.log_softmax(logits.float(), dim=-1)
        first = 0
        for row, i in enumerate(batch):
            row_ids, start = pairs[i]
            n = len(row_ids) - start
            out[i] = read(logp[first : first + n], ids[row, start : start + n])
            first += n
    return out


@torch.no_grad()
def target_log_probs(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], batch_size: int
) -> torch.Tensor:
    """Mean log-probability of each target's tokens after its prompt, teacher-forced; shape [n]."""
    read = lambda logp, tok: logp.gather(-1, tok[:, None]).mean()  # noqa: E731
    return torch.stack(_teacher_forced(model, tokenizer, prompts, targets, batch_size, read)).cpu()


@torch.no_grad()
def target_argmax(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], batch_size: int
) -> list[tuple[list[int], list[int]]]:
    """Teacher-forced top-1 predictions and the target tokens, per (prompt, target) pair."""
    read = lambda logp, tok: (logp.argmax(-1).tolist(), tok.tolist())  # noqa: E731
    return _teacher_forced(model, tokenizer, prompts, targets, batch_size, read)


def target_probs(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], batch_size: int
) -> torch.Tensor:
    return target_log_probs(model, tokenizer, prompts, targets, batch_size).exp()


def new_and_true_probs(
    model: torch.nn.Module,
    tokenizer: Any,
    sets: Mapping[str, tuple[Sequence[str], Sequence[str | None]]],
    target_new: str,
    batch_size: int,
) -> dict[str, dict[str, list[float]]]:
    """P(target_new) and P(true object) on named prompt sets, in one batched pass over all pairs.

    ``sets``: name -> (prompts, the true object of each prompt, or None where there is none). Returns
    name -> {"new": [...], "true": [...]} ("true" empty when no true object is known); empty sets are left out.
    """
    prompts, targets, spans = [], [], {}
    for name, (ps, trues) in sets.items():
        ps, trues = list(ps), list(trues)
        if not ps:
            continue
        known = all(t is not None for t in trues)
        spans[name] = (len(prompts), len(ps), known)
        prompts += ps + (ps if known else [])
        targets += [target_new] * len(ps) + (trues if known else [])
    p = target_probs(model, tokenizer, prompts, targets, batch_size).tolist() if prompts else []
    return {
        name: {"new": p[s : s + n], "true": p[s + n : s + 2 * n] if known else []}
        for name, (s, n, known) in spans.items()
    }


def greedy_continuation(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """Plain greedy decoding (no repetition penalty a checkpoint may set), up to end-of-text."""
    new = generate_tokens(model, tokenizer, [prompt], max_new_tokens, top_k=None, exact_length=False)
    return tokenizer.decode(new[0], skip_special_tokens=True)


# Whether the model knows a fact (the trace stage keeps only those; the retention metric counts them). The
# rule decodes by hand, one argmax per full forward pass without a cache, so it is exact and the same on
# every model, whatever generation settings a checkpoint ships.


def answer_tokens(tokenizer: Any, text: str, answer: str) -> list[int]:
    """The token ids the answer continues ``text`` with (a space between them unless one is there)."""
    sep = "" if text[-1:].isspace() or answer[:1].isspace() else " "
    prompt_ids = tokenizer(text)["input_ids"]
    full_ids = tokenizer(text + sep + answer)["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return full_ids[len(prompt_ids) :]
    # The tokenizer merged across the boundary: fall back to the answer encoded on its own.
    return tokenizer(sep + answer, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def greedy_tokens(model: torch.nn.Module, input_ids: torch.Tensor, k: int) -> list[int]:
    """The model's greedy continuation of ``input_ids`` [1, T], ``k`` tokens long."""
    ids = input_ids.to(model_device(model))
    out = []
    for _ in range(k):
        nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
        out.append(int(nxt))
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return out


def predicts(model: torch.nn.Module, tokenizer: Any, text: str, answer: str) -> tuple[bool, str]:
    """Does the model know this fact?  Rule: its greedy continuation, as many tokens long as the answer,
    starts with the answer (both stripped, case-insensitive).  Returns (known, the continuation)."""
    want = answer_tokens(tokenizer, text, answer)
    got = tokenizer.decode(greedy_tokens(model, torch.tensor([tokenizer(text)["input_ids"]]), len(want)))
    return got.strip().lower().startswith(answer.strip().lower()), got


def predicts_many(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], answers: Sequence[str], batch_size: int = 32
) -> list[tuple[bool, str]]:
    """``predicts`` for many facts at once (the many-edit runs check hundreds at every checkpoint): facts whose
    answers are as many tokens long are decoded together, greedily, left-padded, with the KV cache. The rule is
    ``predicts``'s; only the arithmetic is batched (a tie between the top two tokens could break differently)."""
    wants = [len(answer_tokens(tokenizer, t, a)) for t, a in zip(texts, answers)]
    out: list[tuple[bool, str]] = [(False, "")] * len(texts)
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(wants):
        groups.setdefault(k, []).append(i)
    for k, members in sorted(groups.items()):
        for j in range(0, len(members), batch_size):
            chunk = members[j : j + batch_size]
            new = generate_tokens(model, tokenizer, [texts[i] for i in chunk], k, top_k=None, exact_length=False)
            for i, row in zip(chunk, new):
                got = tokenizer.decode(row.tolist(), skip_special_tokens=True)
                out[i] = (got.strip().lower().startswith(answers[i].strip().lower()), got)
    return out
