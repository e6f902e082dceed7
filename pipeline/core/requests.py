"""Edit requests: parse inline JSON/YAML, files, CounterFact records (nested or flat) into one shape."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

from rome.pipeline.core.records import parse_text, read_record, read_records
from rome.pipeline.core.subject import to_template
from rome.pipeline.errors import UserError

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


def request_from_record(rec: Any, zsre_target: str = "answer") -> EditRequest:
    """One request from a record of any schema ``pipeline.records`` reads (ours, CounterFact, zsRE)."""
    if not isinstance(rec, dict):
        raise UserError(f"a request must be a mapping with prompt, subject and target_new, got {type(rec).__name__}")
    r = read_record(rec, zsre_target=zsre_target)
    return _validated(
        prompt=r.prompt,
        subject=r.subject,
        target_new=r.target_new,
        target_true=r.target_true,
        paraphrases=r.paraphrases,
        neighbours=r.neighbours,
        case_id=r.case_id,
    )


def _validated(**f: Any) -> EditRequest:
    for key in ("prompt", "subject", "target_new"):
        if not isinstance(f[key], str) or not f[key].strip():
            raise UserError(
                f"request field '{key}' is missing or empty (a request needs prompt, subject and target_new)"
            )
    prompt = to_template(f["prompt"], f["subject"])
    if prompt.count("{}") != 1:
        raise UserError(f"the prompt '{prompt}' must hold exactly one {{}} for the subject")
    new, true = f["target_new"].strip(), (f["target_true"] or "").strip() or None
    if true is not None and new.lower() == true.lower():
        raise UserError(f"target_new '{new}' equals the true object; an edit must change the fact")
    return EditRequest(prompt, f["subject"], new, true, f["paraphrases"], f["neighbours"], f["case_id"])


def parse_requests(value: Any) -> list[EditRequest]:
    """``request=`` as given: a mapping or list (already parsed), inline JSON/YAML, or a file path
    (.json, .jsonl, .yaml/.yml) holding one request or a list."""
    if value is None:
        raise UserError(
            'no request: pass request=\'{"prompt": "{} is in", "subject": "X", "target_new": "Y"}\' or a file'
        )
    if hasattr(value, "items") or (isinstance(value, Iterable) and not isinstance(value, str)):
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(value) if not isinstance(value, (dict, list)) else value
    else:
        stripped = str(value).strip()
        inline = stripped.startswith(("{", "[")) or "\n" in stripped or ": " in stripped
        data = (
            parse_text(stripped, "request")
            if inline and not os.path.isfile(stripped)
            else read_records(stripped, "request")
        )
    records = data if isinstance(data, list) else [data]
    if not records:
        raise UserError("the request list is empty")
    return [request_from_record(r) for r in records]
