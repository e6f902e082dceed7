"""P(x | prompt) as the paper defines it: exp(mean log-probability of the tokens of " " + x after prompt),
batched over (prompt, target) pairs; and greedy continuations."""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["target_log_probs", "target_probs", "target_argmax", "greedy_continuation", "target_token_ids"]


def target_token_ids(tokenizer: Any, target: str) -> list[int]:
    """Tokens of ``" " + target`` as they follow a prompt (no special tokens)."""
    return tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]


def _teacher_forced(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str],
                    batch_size: int):
    """For each (prompt, target): log-probabilities [n, vocab] at the positions predicting the n tokens of
    " " + target, and those tokens; batched, right-padded."""
    device = next(model.parameters()).device
    for i in range(0, len(prompts), batch_size):
        rows, spans = [], []
        for p, t in zip(prompts[i : i + batch_size], targets[i : i + batch_size]):
            p_ids = tokenizer(p)["input_ids"]
            t_ids = target_token_ids(tokenizer, t)
            rows.append(p_ids + t_ids)
            spans.append((len(p_ids), len(t_ids)))
        width = max(map(len, rows))
        pad = tokenizer.pad_token_id or 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for row, (start, n) in enumerate(spans):
            pos = torch.arange(start - 1, start - 1 + n, device=device)
            yield logp[row, pos], ids[row, start : start + n]


@torch.no_grad()
def target_log_probs(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str],
                     batch_size: int = 32) -> torch.Tensor:
    """Mean log-probability of each target's tokens after its prompt, teacher-forced; shape [n]."""
    out = [logp.gather(-1, tok[:, None]).mean() for logp, tok in _teacher_forced(model, tokenizer, prompts, targets, batch_size)]
    return torch.stack(out).cpu()


@torch.no_grad()
def target_argmax(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str],
                  batch_size: int = 32) -> list[tuple[list[int], list[int]]]:
    """Teacher-forced top-1 predictions and the target tokens, per (prompt, target) pair."""
    return [(logp.argmax(-1).tolist(), tok.tolist())
            for logp, tok in _teacher_forced(model, tokenizer, prompts, targets, batch_size)]


def target_probs(model, tokenizer, prompts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
    return target_log_probs(model, tokenizer, prompts, targets).exp()


@torch.no_grad()
def greedy_continuation(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 12) -> str:
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
