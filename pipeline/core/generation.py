"""Text generation with exactly the decoding asked for: top-k sampling (at temperature 1 unless asked), or greedy.

``model.generate`` fills every setting a call leaves unset from the checkpoint's ``generation_config``
(an instruct model's temperature, top_p, repetition_penalty, min_p, ...), so ``do_sample=True, top_k=5``
alone is not the paper's top-k sampling for such a model. Here the checkpoint contributes its special
token ids only; every other setting is transformers' neutral default or given explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rome.pipeline.core.timing import model_device

__all__ = ["generate_tokens"]

_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


@torch.no_grad()
def generate_tokens(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    new_tokens: int,
    *,
    top_k: int | None,
    seed: int | None = None,
    exact_length: bool = True,
    add_special_tokens: bool = True,
    temperature: float = 1.0,
    done: Callable[[str], bool] | None = None,
) -> torch.Tensor:
    """The new tokens [prompts, new_tokens] after each prompt (one left-padded batch): top-k sampling from
    the model's own distribution (at ``temperature``, nothing else) when ``top_k``, else greedy. ``exact_length``:
    end-of-text is suppressed until ``new_tokens`` are out. ``seed`` seeds torch's generators (all devices).
    ``done(text)``: True once a row's text so far can no longer change what the caller reads from it (a scorer
    that cuts at the first sentence end): that row stops there, and the call once every row has (greedy rows
    are computed independently, so the rows read the same as without it; the rest is padding)."""
    from transformers import GenerationConfig

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues at the right edge
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    finally:
        tokenizer.padding_side = side
    enc = enc.to(model_device(model))
    if seed is not None:
        torch.manual_seed(seed)
    neutral = dict(repetition_penalty=1.0, no_repeat_ngram_size=0)
    decoding: dict[str, Any] = (
        dict(do_sample=True, top_k=top_k, temperature=float(temperature), top_p=1.0, typical_p=1.0, **neutral)
        if top_k
        else dict(do_sample=False, **neutral)
    )
    own = model.generation_config
    model.generation_config = GenerationConfig(**{k: getattr(own, k, None) for k in _TOKEN_IDS})
    start = enc["input_ids"].shape[1]
    stopping = None if done is None else [_text_done(tokenizer, start, done)]
    try:
        out = model.generate(
            **enc,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens if exact_length else None,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=stopping,
            **decoding,
        )
    finally:
        model.generation_config = own
    return out[:, start:]


def _text_done(tokenizer: Any, start: int, done: Callable[[str], bool]) -> Any:
    """A stopping criterion: per row, has the text generated so far settled what the caller reads (``done``)?"""
    from transformers import StoppingCriteria

    class TextDone(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor([done(t) for t in texts], dtype=torch.bool, device=input_ids.device)

    return TextDone()
