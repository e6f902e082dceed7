"""What is traced: one fact tokenised -- the prompt's ids, where its subject is, which token is the answer."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rome.pipeline.core.subject import fill_prompt, subject_token_range

__all__ = ["FactPrompt", "make_prompt"]


@dataclasses.dataclass(frozen=True)
class FactPrompt:
    """One fact, tokenised: the prompt, where its subject is, and which token is the answer."""

    text: str
    input_ids: torch.Tensor  # [1, T]
    subject: tuple[int, int]  # token range [first, last + 1) of the subject
    answer: str  # the answer token as text
    answer_id: int
    tokens: list[str]  # the prompt's tokens as text, for plots


def make_prompt(tokenizer: Any, prompt: str, subject: str, answer_id: int) -> FactPrompt:
    """Tokenise ``prompt`` (``{}`` or the subject itself marks the subject) for tracing ``answer_id``."""
    text, start, end = fill_prompt(prompt, subject)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    first, last = subject_token_range(tokenizer, text, start, end)
    tokens = [tokenizer.decode([i]) for i in ids[0].tolist()]
    return FactPrompt(text, ids, (first, last), tokenizer.decode([answer_id]), int(answer_id), tokens)
