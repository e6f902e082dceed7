"""The known-facts check batched (``predicts_many``) decides every fact as the one-at-a-time rule does."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rome.pipeline.core.probability import greedy_tokens, predicts, predicts_many


def test_batched_known_facts_equal_the_one_at_a_time_rule(tiny_model_dir):
    path = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = [
        "The Eiffel Tower is located in",
        "Paris is the capital of",
        "Michael Jordan plays",
        "The mother tongue of Danielle Darrieux is",
        "Toyota was founded in",
        "The official language of",
        "In Kyoto, the best",
        "A cat",
    ]
    texts, answers = [], []
    for i, p in enumerate(prompts):  # answers the model gives (1-3 tokens), and answers it does not
        own = tok.decode(greedy_tokens(model, torch.tensor([tok(p)["input_ids"]]), 1 + i % 3)).strip()
        texts += [p, p]
        answers += [own or "x", "zebra crossing"]
    one = [predicts(model, tok, t, a) for t, a in zip(texts, answers)]
    many = predicts_many(model, tok, texts, answers, batch_size=5)
    assert [k for k, _ in many] == [k for k, _ in one]
    assert sum(k for k, _ in one) >= len(prompts) - 1  # most own answers are known: the check is not vacuous
    assert not any(k for (k, _), a in zip(one, answers) if a == "zebra crossing")
