"""Teacher-forced probabilities (``pipeline/core/probability.py``): the pairs go in batches of similar length and
the LM head runs at the target positions only; each pair must still get what the plain full forward gives it,
in the pairs' order, on every family, and a forward without ``logits_to_keep`` must give the same."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES

from rome.pipeline.core import probability
from rome.pipeline.core.loading import load_model
from rome.pipeline.core.probability import target_argmax, target_log_probs, target_token_ids

PROMPTS = ["The Eiffel Tower is located in the city of", "Paris is", "A cat sat on the mat and then it", "He is a"]
TARGETS = ["Rome", "the capital of France", "slept", "doctor of the law"]


def plain(model, tok, prompt: str, target: str) -> torch.Tensor:
    """The mean log-probability of the target's tokens from one unpadded full forward (every position's head)."""
    p_ids, t_ids = tok(prompt)["input_ids"], target_token_ids(tok, target)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p_ids + t_ids])).logits[0].float(), -1)
    return logp[len(p_ids) - 1 : len(p_ids) - 1 + len(t_ids)].gather(-1, torch.tensor(t_ids)[:, None]).mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_each_pair_gets_its_plain_log_probability_with_the_head_at_its_targets_only(tiny_model_dir, family):
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    expected = torch.stack([plain(model, tok, p, t) for p, t in zip(PROMPTS, TARGETS)])
    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: head_rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])
    )
    try:
        got = target_log_probs(model, tok, PROMPTS, TARGETS, batch_size=3)  # two batches, sorted by length
    finally:
        hook.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # padding only moves the float rounding
    assert sum(head_rows) == sum(len(target_token_ids(tok, t)) for t in TARGETS)  # no other position's head
    argmax = target_argmax(model, tok, PROMPTS, TARGETS, batch_size=3)
    assert [tokens for _, tokens in argmax] == [target_token_ids(tok, t) for t in TARGETS]  # in the pairs' order


def test_a_forward_without_logits_to_keep_gives_the_same(tiny_model_dir, monkeypatch):
    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    kept = target_log_probs(loaded.model, loaded.tokenizer, PROMPTS, TARGETS, batch_size=3)
    monkeypatch.setattr(probability, "keeps_logits", lambda model: False)
    every = target_log_probs(loaded.model, loaded.tokenizer, PROMPTS, TARGETS, batch_size=3)
    torch.testing.assert_close(kept, every, rtol=0, atol=1e-6)
