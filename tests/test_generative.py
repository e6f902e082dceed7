"""Generative evaluation (greedy continuations scored by exact match and "contains") and the many-edit
collapse rule: the scoring rules on texts, a tiny model scored 1 on what it generates verbatim and 0 on what
it does not (plain and through a chat template), the per-case eval's summary and table, the curve's sample."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from conftest import DATA, ROOT

from rome.pipeline.core.loading import configure, load_model
from rome.pipeline.core.probability import greedy_tokens
from rome.pipeline.core.requests import EditRequest
from rome.pipeline.errors import UserError
from rome.pipeline.evaluation.cases import EvalCase
from rome.pipeline.evaluation.generative import (
    GenerativeEval,
    contains,
    continuation,
    exact_match,
    generative_settings,
    score_generative,
)
from rome.pipeline.evaluation.scale_report import collapse_point, curve_plot, curve_sample, merge_runs

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
MAX_TOKENS = 12


def test_continuation_exact_match_and_contains_rules():
    assert continuation("  French, and English.  More text") == "French, and English."
    assert continuation("\n\nParis\nLondon") == "Paris"
    assert continuation("3.5 million people") == "3.5 million people"  # a decimal point is no sentence end
    assert exact_match(" French.", "French") and exact_match('"**French** is', "french")
    assert not exact_match(" Frenchman", "French")  # a whole word, not a prefix of one
    assert exact_match(" the French language.", "French") and not exact_match(" the French", "The French Open")
    assert exact_match(" The Hague", "The Hague") and not exact_match(" theatre", "atre")
    assert not exact_match(" spoken French", "French") and contains(" spoken French", "French")
    assert not contains("Frenchman", "French") and contains("New  York City", "new york")
    assert exact_match("The capital is Paris.", "Paris", echo="the capital is")  # a chat reply's echo removed
    assert not exact_match("", "Paris") and not contains("Paris", "")


def _greedy_word(model, tok, text: str, add_special_tokens: bool = True) -> str | None:
    """The first word of the model's greedy continuation of ``text`` (``MAX_TOKENS`` tokens), decoded by hand
    (one argmax per full forward pass: no ``generate``, no batching), or None when it does not start with a
    word that ends inside it."""
    ids = torch.tensor([tok(text, add_special_tokens=add_special_tokens)["input_ids"]])
    said = continuation(tok.decode(greedy_tokens(model, ids, MAX_TOKENS), skip_special_tokens=True))
    m = re.match(r"([a-z]{2,})(?=[^\w])", said.lower())
    return m.group(1) if m else None


def _case(index, subject, prompt, new, neighbour=None, neighbour_target=None):
    request = EditRequest(
        prompt,
        subject,
        new,
        "zzqv",
        paraphrases=(prompt.replace("{}", subject),),
        neighbours=(neighbour,) if neighbour else (),
    )
    return EvalCase(index, index, "counterfact-flat", request, (neighbour_target,) if neighbour else ())


SUBJECTS = ["Danielle Darrieux", "Paris", "The Beatles", "Toko Yasuda", "Edwin of Northumbria", "Michel Rocard"]
PROMPTS = ["{} was born in", "The capital of {} is", "{} plays the", "{} is a", "The language of {} is"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_target_the_model_generates_verbatim_scores_1_and_another_0(tiny_model_dir, family, capsys):
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    found = []  # (subject, template, the model's own first word)
    for subject in SUBJECTS:
        for template in PROMPTS:
            word = _greedy_word(model, tok, template.replace("{}", subject))
            if word:
                found.append((subject, template, word))
    assert len(found) >= 3, found
    cases = []
    for i, (subject, template, word) in enumerate(found[:3]):
        other = f"{subject} is"  # its neighbour: another prompt, another case's word as its true object
        cases.append(_case(2 * i, subject, template, word, template.replace("{}", subject), word))
        cases.append(_case(2 * i + 1, subject, template, "xylophonezz", other, "xylophonezz"))
    settings = GenerativeEval(True, MAX_TOKENS, 4, False, "Complete the sentence: {prompt}")  # batches mix cases
    scored = score_generative(model, tok, cases, settings)
    for i in range(0, len(cases), 2):
        said = scored[i]["metrics"]
        assert said["es_gen_em"] == 1.0 and said["es_gen_contains"] == 1.0, scored[i]
        assert said["ps_gen_em"] == 1.0 and said["ns_gen_em"] == 1.0 and said["ns_gen_contains"] == 1.0
        not_said = scored[i + 1]["metrics"]
        assert not_said["es_gen_em"] == 0.0 and not_said["es_gen_contains"] == 0.0, scored[i + 1]
        assert not_said["ns_gen_em"] == 0.0 and not any(k.split("_")[1] == "chat" for k in not_said)
        assert scored[i]["texts"]["es_gen"][0].lower().startswith(cases[i].request.target_new)
    # deterministic: the same scores from one case at a time (no batch partners)
    for c, s in zip(cases[:2], scored[:2]):
        assert score_generative(model, tok, [c], settings)[0]["metrics"] == s["metrics"]
    off = score_generative(model, tok, cases, GenerativeEval(False, MAX_TOKENS, 4, False, "{prompt}"))
    assert all(o == {"metrics": {}, "texts": {}} for o in off)
    capsys.readouterr()
    with_bar = score_generative(model, tok, cases, settings, desc="unedited: greedy answers")
    assert with_bar == scored and "unedited: greedy answers" in capsys.readouterr().err  # a bar, the same scores


def test_the_chat_form_goes_through_the_template(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    node = configure([]).eval.generative
    assert generative_settings(node, tok).chat is False  # auto, and the tiny tokenizer has no template
    with pytest.raises(UserError, match="needs a tokenizer with a chat template"):
        generative_settings(configure(["eval.generative.chat=true"]).eval.generative, tok)
    tok.chat_template = (
        "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}Bot:{% endif %}"
    )
    settings = generative_settings(node, tok)
    assert settings.chat is True and settings.chat_prompt == node.chat_prompt
    found = None
    for subject in SUBJECTS:
        for template in PROMPTS:
            ask = settings.chat_prompt.format(prompt=template.replace("{}", subject))
            text = tok.apply_chat_template(
                [{"role": "user", "content": ask}], tokenize=False, add_generation_prompt=True
            )
            assert text.startswith("User: Complete") and text.endswith("Bot:")
            word = _greedy_word(model, tok, text, add_special_tokens=False)
            if word and not found:
                found = (subject, template, word)
    assert found
    subject, template, word = found
    (said,) = score_generative(model, tok, [_case(0, subject, template, word)], settings)
    assert said["metrics"]["es_chat_em"] == 1.0 and said["metrics"]["es_chat_contains"] == 1.0
    assert {"es_gen_em", "ps_gen_em", "ps_chat_em"} <= set(said["metrics"]) and "ns_chat_em" not in said["metrics"]


def test_the_collapse_rule_on_synthetic_curves():
    def curve(ppls, knowns):
        return [
            {"edits": 10 * (i + 1), "perplexity": p, "known_accuracy": k} for i, (p, k) in enumerate(zip(ppls, knowns))
        ]

    steady = curve([20.0, 25.0, 39.9], [1.0, 0.8, 0.5])  # 39.9 < 2 x 20 and 0.5 is not below half
    assert collapse_point(steady, 20.0, 1.0, 30) == {"edits": None, "text": "none within 30 edits"}
    ppl = collapse_point(curve([20.0, 41.0, 90.0], [1.0, 0.9, 0.2]), 20.0, 1.0, 30)
    assert ppl["edits"] == 20 and "perplexity 41.00 > 2x the unedited 20.00" in ppl["text"]
    known = collapse_point(curve([21.0, 22.0], [0.6, 0.45]), 20.0, 1.0, 20)
    assert known["edits"] == 20 and known["text"] == "after 20 edits: known facts 45.0% < 0.5x the unedited 100.0%"
    assert collapse_point(curve([math.nan], [1.0]), 20.0, 1.0, 10)["edits"] == 10  # a NaN is a collapse
    assert collapse_point(curve([21.0], [0.0]), 20.0, None, 10)["edits"] is None  # no known facts: no criterion
    # checkpoints out of order still give the first in edit order
    assert collapse_point(list(reversed(curve([20.0, 50.0, 60.0], [1, 1, 1]))), 20.0, 1.0, 30)["edits"] == 20


def test_curve_sample_is_evenly_spaced_in_edit_order():
    assert curve_sample(4, None) == [0, 1, 2, 3] and curve_sample(4, 10) == [0, 1, 2, 3]
    assert curve_sample(100, 5) == [0, 25, 50, 74, 99] and curve_sample(7, 1) == [6]


def test_per_case_eval_reports_generative_columns_with_their_protocol(tiny_model_dir, small_wiki, tmp_path):
    from conftest import run_main

    out = tmp_path / "out"
    r = run_main(
        "stage=eval",
        f"model.name={tiny_model_dir('gpt2')}",
        f"model.cache_dir={tmp_path / 'cache'}",
        f"stats.dir={tmp_path / 'stats'}",
        f"data.files={small_wiki}",
        "edit.layer=2",
        "trainer.accelerator=cpu",
        "model.device=cpu",
        "eval.generation.tokens=0",  # no GE: the generative scores do not depend on it
        "edit.v.steps=3",
        f"eval.dataset={DATA / 'counterfact' / 'counterfact-edit.json'}",
        "eval.n=3",
        f"eval.out={out}",
        "eval.methods=[none,rome_identity_cov]",
        env=OFFLINE,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    keys = {f"{s}_gen_{m}" for s in ("es", "ps", "ns") for m in ("em", "contains")}
    for name in ("none", "rome_identity_cov"):
        row = summary["methods"][name]
        assert set(row["generative"]) == keys and "ge" not in row["metrics"]
        assert all(0 <= v["mean"] <= 100 and v["n"] == 3 for v in row["generative"].values())
        assert not keys & set(row["metrics"])  # the paper's metrics stay apart
    assert summary["run"]["identity"]["generative"]["max_tokens"] == configure([]).eval.generative.max_tokens
    assert "GREEDILY" in summary["generative_protocol"]
    table = (out / "table.md").read_text()
    assert "Teacher-forced (tf), the paper's protocol:" in table and "Generative (gen), greedy continuations:" in table
    assert "| Method | n | ES (gen EM) | ES (gen contains) | PS (gen EM) | PS (gen contains) | NS (gen EM) |" in table
    rec = json.loads((out / "cases.jsonl").read_text().splitlines()[1])
    assert rec["method"] == "rome_identity_cov" and set(rec["greedy"]["post"]) == {"es_gen", "ps_gen", "ns_gen"}
    assert rec["post"]["es_gen_em"] in (0.0, 1.0) and rec["timings"]["greedy"] > 0


def test_stopping_rows_once_their_text_is_settled_changes_no_continuation(tiny_model_dir):
    """Generation stops a row once a newline or a sentence end followed by whitespace settles what
    ``continuation`` reads; every row's continuation is the one of the full-length generation."""
    from rome.pipeline.core.generation import generate_tokens
    from rome.pipeline.evaluation.generative import settled

    assert settled("Paris. The") and settled("\n\n Paris\n") and not settled("\n Paris") and not settled("St.")
    assert not settled("3.5 million") and settled("3.5 million. And")
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    prompts = [t.replace("{}", s) for s in SUBJECTS for t in PROMPTS]
    full = generate_tokens(model, tok, prompts, 24, top_k=None, exact_length=False)
    early = generate_tokens(model, tok, prompts, 24, top_k=None, exact_length=False, done=settled)
    read = lambda rows: [continuation(tok.decode(r, skip_special_tokens=True)) for r in rows]  # noqa: E731
    assert read(early) == read(full)


def test_runs_of_different_lengths_merge_onto_one_curve(tmp_path):
    """benchmarks/lifelong_curve.py: ROME's 300 edits beside UltraEdit's 10,000, each method labelled by its run."""
    identity = {"model": {"name": "m"}, "heldout": {"articles": 20}, "known": {"n": 300}}

    def run(method, edits):
        curve = [{"edits": e, "es": 90.0, "perplexity": 20.0 + e / 1000, "known_accuracy": 0.9} for e in edits]
        m = {"edits": edits[-1], "curve": curve, "collapse_edits": None}
        return {"identity": identity, "order": ["none", method], "title": f"{method} run", "pre_perplexity": 20.0}, {
            "none": {"edits": 0, "curve": []},
            method: m,
        }

    runs = {}
    for label, method, edits, known in (("300", "rome", [50, 300], [1, 2, 3]), ("10k", "ultraedit", [100, 10000], [1])):
        summary, methods = run(method, edits)
        runs[label] = {**summary, "methods": methods, "known_facts": known}
    merged = merge_runs(runs)
    assert merged["order"] == ["rome (300)", "ultraedit (10k)"] and merged["pre_perplexity"] == 20.0
    # the longer run set aside more facts about its edited subjects: the title says how many each kept
    assert merged["title"] == "300: rome run (known facts: 3)\n10k: ultraedit run (known facts: 1)"
    assert merge_runs({"a": runs["300"], "b": runs["300"]})["title"] == "a: rome run\nb: rome run"
    assert merged["methods"]["ultraedit (10k)"]["curve"][-1]["edits"] == 10000
    curve_plot(merged, tmp_path / "one.png", log_x=True)
    assert (tmp_path / "one.png").read_bytes()[:4] == b"\x89PNG"
    other = {**runs["10k"], "identity": {**identity, "model": {"name": "other"}}}
    with pytest.raises(ValueError, match="run 10k differs from the first in model: not one curve"):
        merge_runs({"300": runs["300"], "10k": other})


def test_a_stopped_run_is_drawn_from_its_saved_progress(tmp_path):
    """benchmarks/lifelong_curve.py on a run stopped mid-method: the method in progress is drawn from
    progress/<method>.json to its last checkpoint, named by where it stopped, its collapse point from those
    checkpoints; a finished method is drawn from the summary only."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from lifelong_curve import with_stopped_methods

    identity = {"model": {"name": "m"}, "heldout": {"articles": 20}, "known": {"n": 300}}
    curve = [{"edits": e, "es": 90.0, "perplexity": 20.0, "known_accuracy": k} for e, k in ((100, 0.9), (200, 0.4))]
    summary = {
        "identity": identity,
        "order": ["none", "rome"],
        "title": "t",
        "pre_perplexity": 20.0,
        "known_facts": [1, 2],
        "methods": {"none": {"edits": 0, "curve": []}, "rome": {"edits": 300, "curve": curve, "collapse_edits": 200}},
    }
    run = tmp_path / "run"
    (run / "progress").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "progress" / "memit.json").write_text(json.dumps({"edits": 200, "batches": 2, "curve": curve}))
    (run / "progress" / "rome.json").write_text(json.dumps({"edits": 100, "curve": curve[:1]}))  # finished since
    (run / "progress" / "alphaedit.json").write_text(json.dumps({"edits": 0, "curve": []}))  # no checkpoint yet
    merged = with_stopped_methods(summary, run)
    assert merged["order"] == ["none", "rome", "memit stopped at 200"]
    # known facts 40% < half of the unedited 100% at 200 edits: the collapse point of the checkpoints reached
    assert merged["methods"]["memit stopped at 200"] == {"edits": 200, "curve": curve, "collapse_edits": 200}
    assert merged["methods"]["rome"] is summary["methods"]["rome"]
    out = tmp_path / "curve.png"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "lifelong_curve.py"), str(out), f"a={run}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.strip() == f"2 curves -> {out}" and out.read_bytes()[:4] == b"\x89PNG"
