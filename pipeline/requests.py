"""Edit requests: parse inline JSON/YAML, files, CounterFact records (nested or flat) into one shape."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable

import yaml

from .errors import UserError
from .subject import to_template

__all__ = ["EditRequest", "parse_requests", "request_from_record"]


@dataclasses.dataclass(frozen=True)
class EditRequest:
    prompt: str  # template with {} where the subject goes
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()  # full prompts (subject filled in)
    neighbours: tuple[str, ...] = ()  # prompts about other subjects whose answer is target_true
    case_id: Any = None

    @property
    def text(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["paraphrases"], d["neighbours"] = list(self.paraphrases), list(self.neighbours)
        return d


def _str(value: Any) -> str | None:
    if isinstance(value, dict):  # CounterFact {"str": ..., "id": ...}
        value = value.get("str")
    return None if value is None else str(value)


def _list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (str(value),) if isinstance(value, str) else tuple(str(v) for v in value)


def request_from_record(rec: dict[str, Any]) -> EditRequest:
    """One request from our schema, CounterFact's nested schema or the flat (EasyEdit) schema."""
    if not isinstance(rec, dict):
        raise UserError(f"a request must be a mapping with prompt, subject and target_new, got {type(rec).__name__}")
    if "requested_rewrite" in rec:  # original nested CounterFact
        rw = rec["requested_rewrite"]
        fields = dict(prompt=rw.get("prompt"), subject=rw.get("subject"), target_new=_str(rw.get("target_new")),
                      target_true=_str(rw.get("target_true")), paraphrases=_list(rec.get("paraphrase_prompts")),
                      neighbours=_list(rec.get("neighborhood_prompts")), case_id=rec.get("case_id"))
    elif "ground_truth" in rec or "rephrase_prompt" in rec:  # flat CounterFact
        fields = dict(prompt=rec.get("prompt"), subject=rec.get("subject"), target_new=_str(rec.get("target_new")),
                      target_true=_str(rec.get("ground_truth")), paraphrases=_list(rec.get("rephrase_prompt")),
                      neighbours=_list(rec.get("locality_prompt")), case_id=rec.get("case_id"))
    else:
        fields = dict(prompt=rec.get("prompt"), subject=rec.get("subject"), target_new=_str(rec.get("target_new")),
                      target_true=_str(rec.get("target_true")), paraphrases=_list(rec.get("paraphrases")),
                      neighbours=_list(rec.get("neighbours", rec.get("neighbors"))), case_id=rec.get("case_id"))
    return _validated(**fields)


def _validated(**f: Any) -> EditRequest:
    for key in ("prompt", "subject", "target_new"):
        if not isinstance(f[key], str) or not f[key].strip():
            raise UserError(f"request field '{key}' is missing or empty (a request needs prompt, subject and target_new)")
    prompt = to_template(f["prompt"], f["subject"])
    if prompt.count("{}") != 1:
        raise UserError(f"the prompt '{prompt}' must hold exactly one {{}} for the subject")
    new, true = f["target_new"].strip(), (f["target_true"] or "").strip() or None
    if true is not None and new.lower() == true.lower():
        raise UserError(f"target_new '{new}' equals the true object; an edit must change the fact")
    return EditRequest(prompt, f["subject"], new, true, f["paraphrases"], f["neighbours"], f["case_id"])


def _load_text(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as err:
        raise UserError(f"request {where} is not valid JSON/YAML: {str(err).splitlines()[0]}") from err


def parse_requests(value: Any) -> list[EditRequest]:
    """``request=`` as given: a mapping or list (already parsed), inline JSON/YAML, or a file path
    (.json, .jsonl, .yaml/.yml) holding one request or a list."""
    if value is None:
        raise UserError("no request: pass request='{\"prompt\": \"{} is in\", \"subject\": \"X\", \"target_new\": \"Y\"}' or a file")
    if hasattr(value, "items") or (isinstance(value, Iterable) and not isinstance(value, str)):
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(value) if not isinstance(value, (dict, list)) else value
    elif os.path.isfile(value):
        text = open(value, encoding="utf-8").read()
        if value.endswith(".jsonl"):
            try:
                data = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as err:
                raise UserError(f"request file {value} is not valid JSON lines: {err}") from err
        else:
            data = _load_text(text, f"file {value}")
    else:
        stripped = value.strip()
        if not stripped.startswith(("{", "[")) and (stripped.endswith((".json", ".jsonl", ".yaml", ".yml"))):
            raise UserError(f"request file {value} does not exist")
        data = _load_text(value, "text")
    records = data if isinstance(data, list) else [data]
    if not records:
        raise UserError("the request list is empty")
    return [request_from_record(r) for r in records]
