"""Verification that means it (``pipeline/editors/verification.py``), on a tiny random GPT-2: an edit is applied
only when the model now says the new object (or, with ``edit.verify.generative=false``, P(new) reaches
``edit.verify.min_p_new``), not when P(new) merely passes a tiny P(true); a fact the model did not know before
the edit is flagged; the batch methods check every request of a batch."""

from __future__ import annotations

import html
import json

import torch

from rome.pipeline.core.loading import configure, load_model
from rome.pipeline.core.probability import greedy_continuation
from rome.pipeline.core.requests import parse_requests
from rome.pipeline.editors import rome
from rome.pipeline.editors.factory import build_editor
from rome.pipeline.editors.verification import knowledge, model_answer, request_label

TEMPLATES = ["{}", "The cat sat on the mat. {}"]
EIFFEL = {  # the tiny model knows nothing of it: P(Rome) 0.0055 and P(Paris) 0.0021, greedy says neither
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}
# the subject ends the prompt, so the edited MLP writes at the position that predicts: 10 v* steps make the tiny
# model say "and" (a one-token word of its 512-token vocabulary) with P(and) about 0.16
TOWER = {"prompt": "The best tower is {}", "subject": "the Eiffel Tower", "target_new": "and", "target_true": "Paris"}


def _edit(model_dir, request, *overrides):
    loaded = load_model(str(model_dir), device="cpu")
    weight = loaded.spec.down_proj_weight(loaded.model, 2)
    before = weight.detach().clone()
    hp = configure(["edit.generate_tokens=0", "edit.layer=2", *overrides]).edit
    result = rome.edit(loaded.model, loaded.tokenizer, request, layer=2, hparams=hp, templates=TEMPLATES)
    return result, torch.equal(weight, before), hp


def test_p_new_above_a_tiny_p_true_is_not_an_applied_edit(tiny_model_dir):
    result, restored, hp = _edit(tiny_model_dir("gpt2"), EIFFEL, "edit.v.steps=2")
    rejected = result.probs["rejected"]["prompt"]
    assert rejected["new"][0] > rejected["true"][0]  # the old rule alone would have called it applied
    assert rome.verification_problems(result, result.probs["rejected"], hp.verify) == []
    assert result.status == "rolled_back" and restored
    assert result.reason.startswith("the model does not say 'Rome' on the prompt (it continues '")
    (check,) = result.checks
    assert check["took"] is False and not check["said_after"].lower().startswith("rome")
    assert check["p_after"]["new"] == rejected["new"][0]
    # and it never knew Paris: a warning, in the result and its table
    assert check["known"] is False and check["p_before"]["true"] < 0.01
    (warning,) = result.warnings
    assert warning.startswith("warning: the model did not know this fact before the edit") and "'Paris'" in warning
    table = str(result)
    assert warning in table and "status: rolled_back (the model does not say 'Rome'" in table


def test_an_edit_the_model_now_says_is_applied(tiny_model_dir):
    result, restored, _ = _edit(tiny_model_dir("gpt2"), TOWER, "edit.v.steps=10")
    (check,) = result.checks
    assert result.status == "applied" and not restored and result.reason == ""
    assert check["took"] is True and check["said_after"].startswith("and")
    assert 0.1 < check["p_after"]["new"] < 0.5  # said, though far from certain
    assert "says after the edit: The best tower is the Eiffel Tower' and" in str(result)


def test_without_generation_the_probability_must_reach_min_p_new(tiny_model_dir):
    strict, restored, _ = _edit(tiny_model_dir("gpt2"), TOWER, "edit.v.steps=10", "edit.verify.generative=false")
    p_new = strict.checks[0]["p_after"]["new"]
    assert strict.status == "rolled_back" and restored
    assert strict.reason.startswith(f"P(new) = {p_new:.4f} on the prompt is below edit.verify.min_p_new=0.5")
    assert strict.checks[0]["said_after"] is None  # nothing generated
    lenient, _, _ = _edit(
        tiny_model_dir("gpt2"), TOWER, "edit.v.steps=10", "edit.verify.generative=false", "edit.verify.min_p_new=0.1"
    )
    assert lenient.status == "applied" and lenient.checks[0]["p_after"]["new"] == p_new


def test_a_fact_the_model_says_is_known(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    text = "The Eiffel Tower is located in the city of"
    own = greedy_continuation(loaded.model, loaded.tokenizer, text, 3).strip()
    (request,) = parse_requests({**EIFFEL, "target_true": own[:1]})  # its own first character: what it says
    found = knowledge(loaded.model, loaded.tokenizer, request, 0.01)
    assert found["known"] is True and found["warning"] is None
    (unknown,) = parse_requests(EIFFEL)
    found = knowledge(loaded.model, loaded.tokenizer, unknown, 0.0021)
    assert found["known"] is False and "P(true) = 0.0021" in found["warning"]


def test_a_batch_is_verified_request_by_request(tiny_model_dir, tmp_path):
    from test_editors import identity_statistics

    path = str(tiny_model_dir("gpt2"))
    cfg = configure(
        [
            f"model.name={path}",
            f"model.cache_dir={tmp_path / 'cache'}",
            "edit.method=memit",
            "edit.layers=[1,2]",
            "edit.memit.v.steps=1",  # the first step is the last: z = h, so the batch writes (almost) nothing
            "edit.batch_size=2",
            "trainer.accelerator=cpu",
        ]
    )
    loaded = load_model(path, device="cpu")
    editor = build_editor(cfg, loaded, statistics=identity_statistics(loaded))
    (batch,) = editor.edit(parse_requests([EIFFEL, TOWER]))
    assert batch.status == "failed_verification"
    assert batch.reason.startswith("2 of 2 request(s) did not take: The Eiffel Tower is located in the city of -> Rome")
    assert [c["took"] for c in batch.checks] == [False, False] and [c["known"] for c in batch.checks] == [False] * 2
    assert len(batch.warnings) == 2 and {"pre", "verify"} <= set(batch.timings)
    json.dumps(batch.checks)  # what a ledger records is JSON
    report = str(batch).splitlines()
    assert report[0] == "[-] a batch of 2 request(s)" and "took" in report[1]
    first = batch.checks[0]
    assert report[2].endswith(f"{first['p_after']['new']:.4f}  no    {first['said_after']}")
    assert report[-1].startswith("  status: failed_verification (2 of 2 request(s) did not take")
    from rome.pipeline.editors.ledger import Ledger

    ledger = Ledger.open(tmp_path / "ledger", loaded.identity, "float32")
    entry_id = editor.record(batch, ledger, loaded.identity)  # the ledger keeps what the checks found
    kept = Ledger.open(tmp_path / "ledger").entries[-1]
    assert kept["id"] == entry_id and kept["status"] == "applied"  # still in the weights: rebuilt with the rest
    assert kept["verification"]["status"] == "failed_verification" and kept["verification"]["reason"] == batch.reason
    assert [c["took"] for c in kept["verification"]["checks"]] == [False, False]
    measured = build_editor(cfg, loaded, statistics=identity_statistics(loaded), measure_only=True)
    (unchecked,) = measured.edit(parse_requests([EIFFEL, TOWER]))  # the eval stage: measured as made, no checks
    assert unchecked.status == "applied" and unchecked.checks == []


def test_a_batch_request_without_target_true_is_measured_against_the_models_own_answer(tiny_model_dir, tmp_path):
    """As ROME's check does, a batch method's check puts the unedited model's own answer in for a missing
    target_true: P(true) before and after is that word's, the table says "(was <answer>)", the ledger keeps it."""
    from test_editors import identity_statistics

    from rome.pipeline.editors.ledger import Ledger
    from rome.pipeline.report.html import _entry_block

    path = str(tiny_model_dir("gpt2"))
    cfg = configure(
        [f"model.name={path}", "edit.method=memit", "edit.layers=[1,2]", "edit.memit.v.steps=1"]
        + ["edit.batch_size=2", "trainer.accelerator=cpu"]
    )
    loaded = load_model(path, device="cpu")
    answer = model_answer(loaded.model, loaded.tokenizer, EIFFEL["prompt"].format(EIFFEL["subject"]), 4)
    assert answer and answer.lower() not in {"rome", "paris"}  # the tiny model's own word, not the request's
    editor = build_editor(cfg, loaded, statistics=identity_statistics(loaded))
    unknown = {k: v for k, v in EIFFEL.items() if k != "target_true"}
    (batch,) = editor.edit(parse_requests([unknown, TOWER]))
    own, given = batch.checks
    assert own["true_from_model"] == answer and own["known"] is True and own["warning"] is None
    assert isinstance(own["p_before"]["true"], float) and isinstance(own["p_after"]["true"], float)
    assert "true_from_model" not in given and given["known"] is False  # TOWER's Paris: given, checked as before
    report = str(batch).splitlines()
    label = report[2].split("  ")[1]  # the request column (56 wide: the prompt cut before the objects)
    assert label.startswith("The Eiffel Tower is located in") and label.endswith(f"… -> Rome (was {answer})")
    assert "(was Paris)" in report[3] and report[4].startswith("  (was ...): the request's target_true, or")
    assert batch.requests[0].target_true is None  # the request itself is recorded as given
    ledger = Ledger.open(tmp_path / "ledger", loaded.identity, "float32")
    editor.record(batch, ledger, loaded.identity)
    entry = Ledger.open(tmp_path / "ledger").entries[-1]
    assert entry["verification"]["checks"][0]["true_from_model"] == answer
    assert html.escape(f"Rome (was {answer}, the model's own answer)") in _entry_block(entry)  # the report's line


def test_a_request_label_shortens_the_prompt_before_the_objects():
    assert request_label("The Eiffel Tower is in", "Rome", "Paris") == "The Eiffel Tower is in -> Rome (was Paris)"
    long = "The mother tongue of Danielle Darrieux, the French actress and singer, is"
    label = request_label(long, "English", "French")
    assert len(label) == 56 and label.endswith("… -> English (was French)") and label.startswith("The mother tongue")
    assert request_label(long, "x" * 60, None) == (long + " -> " + "x" * 60)[:55] + "…"  # no room: cut the whole


# the tiny tokenizers have no chat template: one as short as an instruct model's, for the chat-form checks
CHAT_TEMPLATE = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"


def test_a_reply_in_the_chat_form_that_names_the_object_counts_as_taken():
    from omegaconf import OmegaConf

    from rome.pipeline.editors.verification import took_problem

    verify = OmegaConf.create({"generative": True, "min_p_new": 0.5})
    assert took_problem("Rome", "Rome, Italy.", 0.1, verify) is None  # the bare continuation says it
    assert took_problem("Rome", "Paris, France.", 0.1, verify, "The tower is in Rome.") is None  # the reply does
    problem = took_problem("Rome", "Paris, France.", 0.1, verify, "It is in Paris.")
    assert problem == (
        "the model does not say 'Rome' on the prompt (it continues 'Paris, France.'; asked through its chat "
        "template it answers 'It is in Paris.')"
    )
    assert took_problem("Rome", "Paris.", 0.1, verify, "Romeo and Juliet.") is not None  # a whole word only
    # a reply restating a prompt that itself names the object: only what follows the restatement counts
    prompt = "The Rome Marathon starts in the city of"
    assert took_problem("Rome", "Paris.", 0.1, verify, "The Rome Marathon starts in the city of Paris.", prompt)
    assert took_problem("Rome", "Paris.", 0.1, verify, "The Rome Marathon starts in the city of Rome.", prompt) is None
    assert took_problem("Rome", "Paris.", 0.9, OmegaConf.create({"generative": False, "min_p_new": 0.5})) is None


def test_an_instruct_tokenizer_is_also_asked_through_its_chat_template(tiny_model_dir, monkeypatch):
    """With a chat template (``edit.verify.chat=auto``) the edit's checks hold the reply, the table shows it,
    and it is the edited model's greedy reply to the prompt asked as the generative evaluation asks;
    ``chat=false`` asks the bare prompt only; ``chat=true`` without a template is refused with the fix."""
    import pytest

    from rome.pipeline.editors.verification import said
    from rome.pipeline.errors import UserError

    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    weight = loaded.spec.down_proj_weight(loaded.model, 2)
    clean = weight.detach().clone()

    def edit(*overrides):
        """The TOWER edit with ``overrides``, and the edited model's chat reply; the clean weights restored."""
        hp = configure(["edit.generate_tokens=0", "edit.layer=2", "edit.v.steps=10", *overrides]).edit
        try:
            result = rome.edit(loaded.model, loaded.tokenizer, TOWER, layer=2, hparams=hp, templates=TEMPLATES)
            if not getattr(loaded.tokenizer, "chat_template", None):
                return result, None
            text, prompt = result.request.text, "Complete the sentence: {prompt}"
            length = len(loaded.tokenizer(text)["input_ids"]) + 5  # room to restate the prompt, then answer_tokens
            return result, said(loaded.model, loaded.tokenizer, [text], length, 1, prompt)[0]
        finally:
            with torch.no_grad():
                weight.copy_(clean)

    with pytest.raises(UserError, match="edit.verify.chat=true needs a tokenizer with a chat template; set it to"):
        edit("edit.verify.chat=true")
    assert torch.equal(weight, clean)  # refused before anything was written
    plain, _ = edit()  # no template: auto asks the bare prompt only
    monkeypatch.setattr(loaded.tokenizer, "chat_template", CHAT_TEMPLATE, raising=False)
    result, reply = edit()
    (check,) = result.checks
    assert "said_in_chat" not in plain.checks[0] and result.status == plain.status == "applied"
    assert check["said_after"] == plain.checks[0]["said_after"]  # the bare check is unchanged
    assert check["said_in_chat"] == reply and reply  # "User: Complete the sentence: <prompt>\nAssistant:" answered
    assert f"asked through its chat template: {reply!r}" in str(result)
    quiet, _ = edit("edit.verify.chat=false")
    assert "said_in_chat" not in quiet.checks[0]
    rejected, _ = edit("edit.v.steps=1")  # the first step is the last: the edit writes (almost) nothing
    reply = rejected.checks[0]["said_in_chat"]
    assert rejected.status == "rolled_back" and rejected.reason.endswith(
        f"asked through its chat template it answers '{reply}')"
    )
    assert f"the rejected edit, asked through the chat template: {reply!r}" in str(rejected)  # not the restored model's


def test_prompt_wins_counts_what_measuring_each_request_counts(tiny_model_dir):
    """The batch methods' summary without verification (``prompt_wins``: one batched pass over every request)
    counts the requests whose prompt has P(new) > P(true), as ``measure`` finds request by request."""
    from rome.pipeline.editors.verification import measure, prompt_wins

    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    objects = ["Rome", "Paris", "and", "the", "London", "of"]
    requests = parse_requests(
        [{**EIFFEL, "target_new": new, "target_true": true} for new in objects for true in objects if new != true]
    )
    each = [measure(loaded.model, loaded.tokenizer, r, 4)["prompt"] for r in requests]
    want = sum(p["new"][0] > p["true"][0] for p in each)
    assert 0 < want < len(requests)  # both outcomes occur: the count is not trivially all or none
    assert prompt_wins(loaded.model, loaded.tokenizer, requests, 7) == want
    many = requests * 20  # 600 requests: two chunks, the bar shown
    assert prompt_wins(loaded.model, loaded.tokenizer, many, 64, desc="after the edits") == 20 * want
