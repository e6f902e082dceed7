"""Generation is the decoding asked for, whatever the checkpoint's generation_config says."""

import copy

import torch
from omegaconf import OmegaConf

from rome.pipeline.core.generation import generate_tokens
from rome.pipeline.core.loading import load_model
from rome.pipeline.core.probability import greedy_continuation
from rome.pipeline.editors.templates import context_templates
from rome.pipeline.evaluation.scoring import Generation, generate

PROMPTS = ["The Eiffel Tower is", "Because the river", "I think that", "You can see the"]


def test_checkpoint_sampling_settings_do_not_leak_into_top_k_sampling_or_greedy(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    clean = copy.deepcopy(model.generation_config)
    tuned = copy.deepcopy(clean)  # an instruct checkpoint's generation_config.json
    tuned.update(do_sample=True, temperature=0.1, top_p=0.5, top_k=64, repetition_penalty=1.5, min_p=0.2)
    cfg = OmegaConf.create({"style": "seeded", "seeds": ["The", "Because"], "lengths": [[5, 3], [10, 3]], "top_k": 5})
    runs = {}
    for name, gc in (("clean", clean), ("tuned", tuned)):
        model.generation_config = gc
        runs[name] = (
            generate_tokens(model, tok, PROMPTS, 12, top_k=5, seed=3),
            generate(model, tok, PROMPTS, Generation(tokens=12, top_k=5, do_sample=True), seed=3),
            context_templates(model, tok, loaded.identity, cfg, None, seed=0),
            greedy_continuation(model, tok, PROMPTS[0], 12),
        )
        torch.manual_seed(3)  # what a bare generate(do_sample=True, top_k=5) gives: the checkpoint's settings apply
        enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
        runs[name] += (
            model.generate(
                **enc, do_sample=True, top_k=5, max_new_tokens=12, min_new_tokens=12, pad_token_id=tok.pad_token_id
            ),
        )
        assert model.generation_config is gc  # put back
    (ids, texts, templates, greedy, bare), (ids_t, texts_t, templates_t, greedy_t, bare_t) = (
        runs["clean"],
        runs["tuned"],
    )
    assert ids.shape == (4, 12) and torch.equal(ids, ids_t)
    assert texts == texts_t and templates == templates_t and len(templates) == 7 and greedy == greedy_t
    assert not torch.equal(bare, bare_t)  # the settings are real: a bare call would have used them
    # the same seed gives the same sample; another seed another one
    assert torch.equal(generate_tokens(model, tok, PROMPTS, 12, top_k=5, seed=3), ids)
    assert not torch.equal(generate_tokens(model, tok, PROMPTS, 12, top_k=5, seed=4), ids)


def test_original_style_templates_sample_from_endoftext_and_count_it(tiny_model_dir, monkeypatch):
    import unicodedata

    import pytest

    from rome.pipeline.core.loading import configure
    from rome.pipeline.editors import templates as tpl
    from rome.pipeline.errors import UserError

    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    calls, real = [], tpl.generate_tokens

    def spy(*args, **kwargs):  # what the templates asked generation for, and what it gave
        calls.append((args[2], args[3], kwargs, real(*args, **kwargs)))
        return calls[-1][-1]

    monkeypatch.setattr(tpl, "generate_tokens", spy)
    seeded_cfg = configure([]).edit.templates
    assert seeded_cfg.style == "seeded"  # the default
    original = context_templates(model, tok, loaded.identity, OmegaConf.merge(seeded_cfg, {"style": "original"}), None)
    seeded = context_templates(model, tok, loaded.identity, seeded_cfg, None)
    (prompts_o, new_o, kw_o, ids_o), (prompts_s, new_s, kw_s, _) = calls
    # ROME's: 20 rows from <|endoftext|> alone, a length counts it (5 -> 4 new tokens, 10 -> 9)
    assert prompts_o == ["<|endoftext|>"] * 20 and new_o == 9 and kw_o["add_special_tokens"] is False
    for i, template in enumerate(original[1:]):
        text = tok.decode(ids_o[i, : 4 if i < 10 else 9], skip_special_tokens=True)
        text = unicodedata.normalize("NFKD", text).replace("\n\n", " ").replace("{", " ").replace("}", " ")
        assert template == text + ". {}"
    # MEMIT's: the seed words, lengths count new tokens
    assert (
        prompts_s[:6] == ["The", "Therefore", "Because", "I", "You", "The"]
        and new_s == 10
        and kw_s["add_special_tokens"]
    )
    assert len(original) == len(seeded) == 21 and original[0] == seeded[0] == "{}" and original != seeded
    assert all(t.count("{") == 1 and t.endswith(". {}") for t in original[1:] + seeded[1:])
    assert all(t.split(" ")[0].startswith(w) for t, w in zip(seeded[1:], prompts_s))
    assert tpl.start_text(tok) == "<|endoftext|>"
    with pytest.raises(UserError, match="style=nope"):
        context_templates(model, tok, loaded.identity, OmegaConf.merge(seeded_cfg, {"style": "nope"}), None)
