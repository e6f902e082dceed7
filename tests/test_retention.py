"""What an edited model still knows: the known-facts check batched (``predicts_many``) decides every fact as the
one-at-a-time rule does; the held-out perplexity equals the model's own loss."""

import math

import pytest
import torch
from conftest import FAMILIES
from transformers import AutoModelForCausalLM, AutoTokenizer

from rome.pipeline.core.arch import arch_for
from rome.pipeline.core.hooks import get_module
from rome.pipeline.core.probability import greedy_tokens, predicts, predicts_many
from rome.pipeline.evaluation.retention import HeldoutPerplexity, perplexity, unrelated_facts
from rome.pipeline.tracing.facts import Fact


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


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text"])  # gemma3_text: the final logits soft-capped
def test_perplexity_is_the_models_own_loss_over_every_token(tiny_model_dir, family):
    """Rows of different lengths batched (padding), the pass stopped at the final norm and the LM head run in
    chunks of 7 tokens give exp of the mean of the model's own per-token loss (HF's ``labels=`` loss, row by
    row, weighted by each row's tokens), with truncation to max_length."""
    path = tiny_model_dir(family)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = [
        "The Eiffel Tower is located in Paris, the capital of France.",
        "A cat",
        "Toyota was founded in Japan in 1937 by Kiichiro Toyoda, and it makes cars and trucks and buses.",
        "x",  # one token (or two with BOS): no prediction when one
        "Michael Jordan plays basketball.",
    ]
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t, truncation=True, max_length=16)["input_ids"]])
            if ids.shape[1] > 1:
                nll += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
                count += ids.shape[1] - 1
    got = perplexity(model, tok, arch_for(model), texts, max_length=16, batch_size=2, head_rows=7)
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert perplexity(model, tok, arch_for(model), texts, 16, batch_size=5) == pytest.approx(got, rel=1e-6)


def test_facts_about_an_edited_subject_are_set_aside():
    """An edit may rightly change what the model says about its own subject: the retention check keeps the rest."""
    facts = [
        Fact(0, "Italy", "{}'s capital,", "Rome", "0"),
        Fact(1, "Vinson Massif", "{} is located in the continent of", "Antarctica", "1"),
        Fact(2, "Madame  de Montesson", "{} died in the city of", "Paris", "2"),
        Fact(3, "Italy national football team", "{} plays", "football", "3"),
    ]
    kept, aside = unrelated_facts(facts, ["ITALY", "Madame de Montesson", "Danielle Darrieux"])
    assert [f.index for f in kept] == [1, 3] and [f.index for f in aside] == [0, 2]  # whole subjects only
    assert unrelated_facts(facts, []) == (facts, [])


TEXTS = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Toyota was founded in Japan in 1937 by Kiichiro Toyoda, and it makes cars and trucks and buses.",
    "Michael Jordan plays basketball.",
    "A cat sat on the mat and then it slept for a long time in the sun.",
    "x y",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_checkpoints_perplexity_skips_the_blocks_no_edit_changes_and_equals_the_whole_pass(tiny_model_dir, family):
    """The blocks before the first edited one run once: every later call hands their kept output on and gives
    what the whole model gives, bit for bit, before and after an edit of a later block."""
    path = tiny_model_dir(family)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    spec = arch_for(model)
    ppl = HeldoutPerplexity(model, tok, spec, TEXTS, max_length=16, batch_size=2, frozen_below=1)
    whole = perplexity(model, tok, spec, TEXTS, max_length=16, batch_size=2)
    assert ppl() == whole and ppl.kept is not None and ppl.skips == 0  # the first call: whole pass, then checked
    first_block_ran = []
    handle = get_module(model, spec.mlp_name(0)).register_forward_hook(lambda *a: first_block_ran.append(1))
    try:
        assert ppl() == whole and ppl.skips == 1 and not first_block_ran
        weight = spec.down_proj_weight(model, 1)
        with torch.no_grad():
            weight.mul_(3.0)  # an edit of block 1: the perplexity moves, and the skipping call follows it
        edited = perplexity(model, tok, spec, TEXTS, max_length=16, batch_size=2)
        assert edited != whole and first_block_ran
        first_block_ran.clear()
        assert ppl() == edited and not first_block_ran
    finally:
        handle.remove()


def test_a_perplexity_whose_kept_states_would_not_fit_runs_the_whole_model(tiny_model_dir):
    path = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ppl = HeldoutPerplexity(model, tok, arch_for(model), TEXTS, 16, 2, frozen_below=1, keep_bytes=100)
    whole = perplexity(model, tok, arch_for(model), TEXTS, 16, 2)
    assert ppl() == whole and ppl() == whole and ppl.kept is None and ppl.skips == 0
