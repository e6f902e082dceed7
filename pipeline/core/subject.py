"""Where the subject sits in a prompt: filling ``{}`` and finding the subject's tokens.

Token positions come from the tokenizer's offset mapping, so they are right for tokenizers that add a
BOS token (Llama), for subjects at the very start of the prompt (no leading space) and for subjects that
split into several tokens -- the cases where counting the tokens of the subject alone goes wrong.
"""

from __future__ import annotations

from typing import Any

from rome.pipeline.errors import UserError

__all__ = ["fill_prompt", "subject_token_range", "to_template"]


def to_template(prompt: str, subject: str) -> str:
    """A prompt with ``{}`` where the subject goes (given either form)."""
    if not subject or not subject.strip():
        raise UserError("the subject is empty")
    if "{}" in prompt:
        return prompt
    if subject not in prompt:
        raise UserError(f"subject '{subject}' is not in the prompt '{prompt}' and the prompt has no {{}} placeholder")
    return prompt.replace(subject, "{}", 1)


def fill_prompt(template: str, subject: str) -> tuple[str, int, int]:
    """``template`` with the subject filled in, and the subject's character span [start, end)."""
    template = to_template(template, subject)
    start = template.index("{}")
    text = template[:start] + subject + template[start + 2 :]
    return text, start, start + len(subject)


def subject_token_range(tokenizer: Any, text: str, start: int, end: int) -> tuple[int, int]:
    """Token indices [first, last + 1) of the tokens that overlap characters [start, end) of ``text``,
    as the tokenizer encodes ``text`` (special tokens included)."""
    enc = tokenizer(text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hits:
        raise UserError(f"the subject at characters {start}..{end} of '{text}' maps to no token")
    return hits[0], hits[-1] + 1
