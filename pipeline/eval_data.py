"""Evaluation cases from CounterFact (nested or flat schema) or zsRE (MEND schema), detected per record.

Schemas:
- CounterFact, nested (ROME's ``counterfact.json``): ``requested_rewrite`` {prompt, subject, target_new.str/id,
  target_true.str, relation_id}, ``paraphrase_prompts``, ``neighborhood_prompts``, ``generation_prompts``;
- CounterFact, flat (EasyEdit's): prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt,
  locality_ground_truth; it has no generation prompts, so the rewrite prompt and the paraphrase serve;
- zsRE, MEND schema: src (the question), subject, alt (the new answer), answers (the true ones), rephrase,
  loc ("nq question: ..."), loc_ans. The neighbourhood prompt is ``loc + "?"`` with target ``loc_ans``,
  as in ROME's ``dsets/zsre.py``.
Every record that cannot be a case (unknown schema, missing fields, subject not in its prompt, new object
equal to the true one) becomes a ``Skipped`` with the reason; nothing is dropped silently.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import UserError
from .requests import EditRequest, request_from_record

__all__ = ["EvalCase", "Skipped", "load_cases", "detect_schema", "load_snippets", "file_digest"]

SCHEMAS = ("counterfact-nested", "counterfact-flat", "zsre")


@dataclasses.dataclass(frozen=True)
class EvalCase:
    index: int  # position in the dataset file: the key for sharding, resuming and ordering
    case_id: Any
    schema: str
    request: EditRequest
    neighbour_targets: tuple[str, ...]  # the answer each neighbourhood prompt should keep
    generation_prompts: tuple[str, ...] = ()
    relation_id: str | None = None  # with target_new_id: the key of the reference snippets (RS)
    target_new_id: str | None = None

    @property
    def kind(self) -> str:
        return "zsre" if self.schema == "zsre" else "counterfact"


@dataclasses.dataclass(frozen=True)
class Skipped:
    index: int
    case_id: Any
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def detect_schema(rec: Any) -> str:
    if not isinstance(rec, dict):
        raise UserError(f"a record must be a JSON object, got {type(rec).__name__}")
    if "requested_rewrite" in rec:
        return "counterfact-nested"
    if "src" in rec and ("alt" in rec or "loc" in rec):
        return "zsre"
    if "ground_truth" in rec or "rephrase_prompt" in rec or "locality_prompt" in rec:
        return "counterfact-flat"
    raise UserError(f"unknown schema (keys: {', '.join(sorted(map(str, rec))) or 'none'}); expected CounterFact "
                    "(requested_rewrite, or prompt/ground_truth/rephrase_prompt) or zsRE (src/alt/loc)")


def _need(rec: dict, *keys: str) -> None:
    missing = [k for k in keys if rec.get(k) in (None, "", [])]
    if missing:
        raise UserError(f"missing field(s) {', '.join(missing)}")


def _str(v: Any) -> str | None:
    return v.get("str") if isinstance(v, dict) else v


def _with_true(r: EditRequest) -> EditRequest:
    if r.target_true is None:
        raise UserError("missing field target_true (the true object)")
    return r


def _case(index: int, rec: Any, schema: str) -> EvalCase:
    if schema == "counterfact-nested":
        rw = rec["requested_rewrite"]
        if not isinstance(rw, dict):
            raise UserError("requested_rewrite is not an object")
        _need(rw, "prompt", "subject", "target_new", "target_true")
        r = _with_true(request_from_record(rec))
        tid = rw["target_new"].get("id") if isinstance(rw["target_new"], dict) else None
        return EvalCase(index, rec.get("case_id", index), schema, r, (r.target_true,) * len(r.neighbours),
                        tuple(rec.get("generation_prompts") or ()), rw.get("relation_id"), tid)
    if schema == "counterfact-flat":
        _need(rec, "prompt", "subject", "target_new", "ground_truth")
        r = _with_true(request_from_record(rec))
        loc_true = _str(rec.get("locality_ground_truth")) or r.target_true
        return EvalCase(index, rec.get("case_id", index), schema, r, (loc_true,) * len(r.neighbours),
                        (r.text, *r.paraphrases))
    _need(rec, "src", "subject", "alt", "answers")
    answers = rec["answers"] if isinstance(rec["answers"], list) else [rec["answers"]]
    loc = [f"{rec['loc']}?"] if rec.get("loc") and rec.get("loc_ans") else []
    r = request_from_record({"prompt": rec["src"], "subject": rec["subject"], "target_new": rec["alt"],
                             "target_true": answers[0], "paraphrases": [rec["rephrase"]] if rec.get("rephrase") else [],
                             "neighbours": loc, "case_id": rec.get("case_id", index)})
    return EvalCase(index, rec.get("case_id", index), schema, r, (str(rec["loc_ans"]),) * len(loc))


def _records(path: Path) -> list[Any]:
    if not path.is_file():
        raise UserError(f"eval.dataset={path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"eval.dataset={path} is not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise UserError(f"eval.dataset={path} must hold a JSON list of records (or JSON lines)")
    return data


def load_cases(path: str | Path, n: int | None = None, start: int = 0) -> tuple[list[EvalCase], list[Skipped]]:
    """Records [start, start + n) of the file as cases; the first good record's schema is the file's."""
    records = _records(Path(path))
    stop = len(records) if n is None else min(len(records), start + int(n))
    cases, skipped, schema = [], [], None
    for i in range(start, stop):
        rec = records[i]
        cid = rec.get("case_id", i) if isinstance(rec, dict) else i
        try:
            s = detect_schema(rec)
            if schema is not None and s != schema:
                raise UserError(f"schema {s} differs from the file's {schema}")
            cases.append(_case(i, rec, s))
            schema = s
        except UserError as err:
            skipped.append(Skipped(i, cid, str(err)))
    return cases, skipped


def load_snippets(path: str | Path) -> dict[tuple[str, str], list[str]]:
    """ROME's ``attribute_snippets.json``: [{relation_id, target_id, samples: [{text, ...}]}] ->
    {(relation_id, target_id): [text, ...]}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"eval.snippets={path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        out: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
        for el in data:
            out[(el["relation_id"], el["target_id"])].extend(s["text"] for s in el["samples"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"eval.snippets={path} is not ROME's attribute_snippets.json format "
                        f"([{{relation_id, target_id, samples: [{{text}}]}}]): {err!r}") from err
    return dict(out)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
