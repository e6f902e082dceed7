"""``stage=ask`` (and ``rome.ask``) on a tiny random GPT-2: prompts from the command line or a file, answered
with a ledger's edits applied (the weights restored afterwards) or by a saved edited model, beside the unedited
model's answers; greedy by default, sampling seeded; bad input refused in one line before the model loads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import main_in_process as main

from rome.pipeline.core.loading import configure, load_model
from rome.pipeline.core.probability import greedy_continuation
from rome.pipeline.core.requests import parse_requests
from rome.pipeline.core.saving import save_model
from rome.pipeline.editors.factory import build_editor
from rome.pipeline.editors.ledger import Ledger
from rome.pipeline.errors import UserError
from rome.pipeline.evaluation.ask import read_prompts

TOWER = {"prompt": "The best tower is {}", "subject": "the Eiffel Tower", "target_new": "and", "target_true": "Paris"}
ASKED = "The best tower is the Eiffel Tower"


@pytest.fixture(scope="module")
def edited(tiny_model_dir, tmp_path_factory):
    """A ledger with one ROME edit of the tiny GPT-2 (C = I) that makes it say "and", and the model saved."""
    path, out = str(tiny_model_dir("gpt2")), tmp_path_factory.mktemp("ask")
    cfg = configure(
        [
            f"model.name={path}",
            f"model.cache_dir={out / 'cache'}",
            "edit.layer=2",
            "edit.mom2_adjustment=false",
            "edit.v.steps=10",
            "edit.generate_tokens=0",
            "trainer.accelerator=cpu",
        ]
    )
    loaded = load_model(path, device="cpu")
    base = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    editor = build_editor(cfg, loaded)
    (edit,) = editor.edit(parse_requests(TOWER))
    assert edit.status == "applied"
    ledger = Ledger.open(out / "ledger", loaded.identity, "float32")
    editor.record(edit, ledger, loaded.identity)
    save_model(loaded, out / "saved", "edit.save_to", {"ledger": str(ledger.dir), "edits": [1]})
    said = greedy_continuation(loaded.model, loaded.tokenizer, ASKED, 30)
    unedited = greedy_continuation(load_model(path, device="cpu").model, loaded.tokenizer, ASKED, 30)
    return {
        "model": path,
        "ledger": out / "ledger",
        "saved": out / "saved",
        "base": base,
        "said": said,
        "unedited": unedited,
    }


def _lines(out: str, prompt: str) -> tuple[str, str]:
    lines = out.splitlines()
    at = lines.index(prompt)
    return lines[at + 1], lines[at + 2]


def test_a_ledger_s_edits_answered_beside_the_unedited_model(edited):
    code, out, errors = main(
        "stage=ask",
        f"model.name={edited['model']}",
        "model.device=cpu",
        f"ledger={edited['ledger']}",
        f"prompt={ASKED}",
        "prompts=['The Eiffel Tower is located in the city of']",
    )
    assert code == 0, errors
    before, after = _lines(out, ASKED)
    assert before == f"  before: {' '.join(edited['unedited'].split())}"
    assert after == f"  after:  {' '.join(edited['said'].split())}" and after.startswith("  after:  and")
    assert "with the 1 active edit(s) of the ledger" in out and "greedy, 30 new tokens at most" in out
    assert "The Eiffel Tower is located in the city of" in out.splitlines()


def test_the_python_ask_restores_the_weights_and_a_saved_model_is_asked_beside_its_base(edited):
    import rome

    loaded = load_model(edited["model"], device="cpu")
    answers = rome.ask(loaded, ASKED, ledger=edited["ledger"])
    assert answers.after == [" ".join(edited["said"].split())] and answers.before != answers.after
    assert all(torch.equal(p, edited["base"][name]) for name, p in loaded.model.named_parameters())
    saved = edited["saved"]
    code, out, errors = main("stage=ask", f"model.name={saved}", "model.device=cpu", f"prompt={ASKED}")
    assert code == 0, errors
    assert _lines(out, ASKED) == (f"  before: {answers.before[0]}", f"  after:  {answers.after[0]}")
    assert f"before: {edited['model']}, the base model | after: {edited['saved']}" in out


def test_prompts_from_a_file_and_sampling_seeded(edited, tmp_path):
    listed = tmp_path / "prompts.json"
    listed.write_text(json.dumps([ASKED, {"prompt": "{} is in", "subject": "Rome"}]))
    lines = tmp_path / "prompts.txt"
    lines.write_text(f"{ASKED}\n\nRome is in\n")
    assert read_prompts(None, None, listed) == read_prompts(None, None, lines) == [ASKED, "Rome is in"]
    assert read_prompts("{} is in", ["b"], None, subject="Rome") == ["Rome is in", "b"]
    args = ["stage=ask", f"model.name={edited['model']}", "model.device=cpu", f"ask.file={listed}"]
    sampled = [main(*args, "ask.do_sample=true", "ask.top_k=5", "seed=3") for _ in range(2)]
    assert sampled[0][0] == 0 and sampled[0][1] == sampled[1][1]  # the same seed, the same answers
    assert "sampled (temperature 1.0, top 5, seed 3)" in sampled[0][1] and "answer:" in sampled[0][1]
    greedy = main(*args)[1]  # no ledger: the model's own answers, one line each
    assert _lines(greedy, ASKED)[0] == f"  answer: {' '.join(edited['unedited'].split())}"


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no prompt: pass prompt="),
        (["prompt={} is in"], "holds {} for a subject: pass subject="),
        (["prompt=x", "ask.file=/nonexistent/p.txt"], "ask.file=/nonexistent/p.txt is not a file"),
        (["prompt=x", "ledger=/nonexistent/ledger"], "no ledger at /nonexistent/ledger/ledger.json"),
        (["prompt=x", "ask.chat=true"], "ask.chat=true needs a tokenizer with a chat template"),
        (["prompt=x", "ask.max_tokens=0"], "ask.max_tokens=0 must be positive"),
    ],
)
def test_bad_input_is_one_line(edited, args, message):
    code, _, errors = main("stage=ask", f"model.name={edited['model']}", "model.device=cpu", *args)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors


def test_a_ledger_of_another_model_is_refused_before_loading(edited):
    code, _, errors = main("stage=ask", "model.name=gpt2-xl", f"ledger={edited['ledger']}", "prompt=x")
    assert code == 2 and f"holds edits of model {edited['model']}, not gpt2-xl" in errors[0]
    with pytest.raises(UserError, match="must be a name"):
        import rome

        rome.ask(object(), "x")
