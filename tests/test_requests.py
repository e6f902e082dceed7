import json
import re

import pytest

from rome.pipeline.core.requests import parse_requests
from rome.pipeline.core.subject import fill_prompt, subject_token_range
from rome.pipeline.errors import UserError

EIFFEL = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}


def test_inline_json_yaml_and_literal_subject():
    (r,) = parse_requests(json.dumps(EIFFEL))
    assert r.prompt == "{} is located in the city of" and r.text == "The Eiffel Tower is located in the city of"
    (y,) = parse_requests("prompt: The Eiffel Tower is in\nsubject: The Eiffel Tower\ntarget_new: Rome\n")
    assert y.prompt == "{} is in"
    assert parse_requests([EIFFEL, {**EIFFEL, "target_new": "Oslo"}])[1].target_new == "Oslo"


def test_files_and_counterfact_schemas(tmp_path):
    flat = {
        "case_id": 0,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "subject": "Danielle Darrieux",
        "ground_truth": "French",
        "rephrase_prompt": "Danielle Darrieux spoke",
        "locality_prompt": "Michel Rocard is a native speaker of",
        "locality_ground_truth": "French",
    }
    nested = {
        "case_id": 0,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
        },
        "paraphrase_prompts": ["a", "b"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
    }
    (tmp_path / "r.json").write_text(json.dumps([flat, nested]))
    a, b = parse_requests(str(tmp_path / "r.json"))
    assert (a.prompt, a.target_true, a.paraphrases, a.neighbours) == (
        "The mother tongue of {} is",
        "French",
        ("Danielle Darrieux spoke",),
        ("Michel Rocard is a native speaker of",),
    )
    assert (b.prompt, b.target_new, b.target_true, len(b.paraphrases)) == (
        "The mother tongue of {} is",
        "English",
        "French",
        2,
    )
    (tmp_path / "r.jsonl").write_text(json.dumps(EIFFEL) + "\n" + json.dumps(flat) + "\n")
    assert len(parse_requests(str(tmp_path / "r.jsonl"))) == 2
    (tmp_path / "r.yaml").write_text("- prompt: '{} is in'\n  subject: X\n  target_new: Y\n")
    assert parse_requests(str(tmp_path / "r.yaml"))[0].subject == "X"


@pytest.mark.parametrize(
    "bad, match",
    [
        ({**EIFFEL, "subject": "The Louvre", "prompt": "The Eiffel Tower is in"}, "not in the prompt"),
        ({**EIFFEL, "target_new": " "}, "target_new"),
        ({**EIFFEL, "target_true": "rome"}, "equals the true object"),
        ({"prompt": "{} is in", "subject": "X"}, "target_new"),
        ('{"prompt": "{} is in", "subject": ', "not valid JSON: Expecting value at line 1, column 34"),
        ("missing.json", "does not exist"),
        ("my-requests", "is neither a file nor inline JSON/YAML (a file needs a .json, .jsonl or .yaml extension"),
        ("/", "is a directory"),
        (
            '[{"prompt": "{} is in", "subject": "X",\n  "target_new" "Y"}]',
            "not valid JSON: Expecting ':' delimiter at line 2, column 16",
        ),
        ({**EIFFEL, "prompt": "{} and {}"}, "exactly one"),
        ({**EIFFEL, "paraphrases": ["The Eiffel Tower is in", ""]}, "'paraphrases' holds an empty or non-text prompt"),
        ({**EIFFEL, "neighbours": [" "]}, "'neighbours' holds an empty or non-text prompt"),
    ],
)
def test_bad_requests(bad, match):
    with pytest.raises(UserError, match=re.escape(match)):
        parse_requests(json.dumps(bad) if isinstance(bad, dict) else bad)


def subject_last_token(tokenizer, template: str, subject: str) -> int:
    """Index of the subject's last token in the tokenised, filled-in prompt (what the editors read k* at)."""
    text, start, end = fill_prompt(template, subject)
    return subject_token_range(tokenizer, text, start, end)[1] - 1


def test_subject_tokens_with_bos_at_start_and_multi_token(tiny_model_dir):
    from transformers import AutoTokenizer

    for family in ("gpt2", "llama"):  # llama's tokenizer adds <s>
        tok = AutoTokenizer.from_pretrained(tiny_model_dir(family))
        for template in ("{} is located in the city of", "Where is {}? It is in"):
            text, a, b = fill_prompt(template, "The Eiffel Tower")
            first, end = subject_token_range(tok, text, a, b)
            ids = tok(text)["input_ids"]
            assert tok.decode(ids[first:end]).strip() == "The Eiffel Tower"
            assert end - first > 1  # several tokens
            assert subject_last_token(tok, template, "The Eiffel Tower") == end - 1
        if family == "llama":
            assert tok(text)["input_ids"][0] == tok.bos_token_id and first >= 1
