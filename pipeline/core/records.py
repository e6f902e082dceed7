"""Fact records of every schema the project reads, mapped once to the same fields.

Schemas (detected per record):
- ``counterfact-nested``: ROME's ``counterfact.json``: ``requested_rewrite`` {prompt, subject, target_new.str/id,
  target_true.str, relation_id}, ``paraphrase_prompts``, ``neighborhood_prompts``, ``generation_prompts``;
- ``counterfact-flat``: EasyEdit's: prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt,
  locality_ground_truth;
- ``zsre``: the MEND schema: src (the question), subject, alt, answers, rephrase, loc ("nq question: ..."),
  loc_ans. The neighbourhood prompt is ``loc + "?"`` with target ``loc_ans``. The edit's new object is
  ``answers[0]`` under ROME's convention (``zsre_target="answer"``: ROME's ``dsets/zsre.py`` edits towards
  the true answer and never uses ``alt``) or ``alt`` under MEND's/EasyEdit's (``zsre_target="alt"``);
- ``known``: ROME's ``known_1000.json`` (subject, prompt or template, attribute);
- ``request``: ours: prompt, subject, target_new, target_true, paraphrases, neighbours.
The files they come in (.json lists, .jsonl lines, .yaml) are read by ``read_records``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rome.pipeline.errors import UserError

__all__ = ["Record", "detect_schema", "read_record", "read_records", "ZSRE_TARGETS"]

ZSRE_TARGETS = ("answer", "alt")


@dataclasses.dataclass(frozen=True)
class Record:
    schema: str
    case_id: Any
    prompt: Any  # the prompt, with {} or the subject itself (checked by the consumer)
    subject: Any
    target_new: str | None
    target_true: str | None
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[str, ...] = ()
    neighbour_targets: tuple[str, ...] = ()  # the answer each neighbourhood prompt should keep (None: target_true)
    generation_prompts: tuple[str, ...] = ()
    relation_id: str | None = None
    target_new_id: str | None = None


def detect_schema(rec: Any) -> str:
    if not isinstance(rec, dict):
        raise UserError(f"a record must be a JSON object, got {type(rec).__name__}")
    if "requested_rewrite" in rec:
        return "counterfact-nested"
    if "src" in rec and ("alt" in rec or "loc" in rec):
        return "zsre"
    if "ground_truth" in rec or "rephrase_prompt" in rec or "locality_prompt" in rec:
        return "counterfact-flat"
    if "attribute" in rec or "known_id" in rec:
        return "known"
    if "prompt" in rec or "subject" in rec or "target_new" in rec:
        return "request"
    raise UserError(
        f"unknown schema (keys: {', '.join(sorted(map(str, rec))) or 'none'}); expected CounterFact "
        "(requested_rewrite, or prompt/ground_truth/rephrase_prompt), zsRE (src/alt/loc), a known_1000 "
        "fact (subject/prompt/attribute) or a request (prompt/subject/target_new)"
    )


def _str(value: Any) -> str | None:
    if isinstance(value, dict):  # CounterFact {"str": ..., "id": ...}
        value = value.get("str")
    return None if value is None else str(value)


def _strings(value: Any, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    values = (value,) if isinstance(value, str) else tuple(value)
    if any(not isinstance(v, str) or not v.strip() for v in values):
        raise UserError(f"'{field}' holds an empty or non-text prompt; remove it or give the prompt's text")
    return values


def read_record(rec: Any, index: int = 0, zsre_target: str = "answer") -> Record:
    """The fields of one record of any schema above (nothing checked beyond the schema's shape)."""
    schema = detect_schema(rec)
    case_id = rec.get("case_id", rec.get("known_id", index))
    if schema == "counterfact-nested":
        rw = rec["requested_rewrite"]
        if not isinstance(rw, dict):
            raise UserError("requested_rewrite is not an object")
        tid = rw.get("target_new", {}).get("id") if isinstance(rw.get("target_new"), dict) else None
        return Record(
            schema,
            case_id,
            rw.get("prompt"),
            rw.get("subject"),
            _str(rw.get("target_new")),
            _str(rw.get("target_true")),
            _strings(rec.get("paraphrase_prompts"), "paraphrase_prompts"),
            _strings(rec.get("neighborhood_prompts"), "neighborhood_prompts"),
            (),
            _strings(rec.get("generation_prompts"), "generation_prompts"),
            rw.get("relation_id"),
            tid,
        )
    if schema == "counterfact-flat":
        neighbours = _strings(rec.get("locality_prompt"), "locality_prompt")
        loc_true = _str(rec.get("locality_ground_truth"))
        r = Record(
            schema,
            case_id,
            rec.get("prompt"),
            rec.get("subject"),
            _str(rec.get("target_new")),
            _str(rec.get("ground_truth")),
            _strings(rec.get("rephrase_prompt"), "rephrase_prompt"),
            neighbours,
            (loc_true,) * len(neighbours) if loc_true else (),
        )
        # no generation prompts in this schema: the rewrite prompt and its paraphrase stand in
        return dataclasses.replace(r, generation_prompts=tuple(p for p in (_filled(r), *r.paraphrases) if p))
    if schema == "zsre":
        if zsre_target not in ZSRE_TARGETS:
            raise UserError(f"eval.zsre_target={zsre_target} is not one of {', '.join(ZSRE_TARGETS)}")
        answers = rec.get("answers")
        answers = answers if isinstance(answers, list) else [answers] if answers is not None else []
        answer = _str(answers[0]) if answers else None
        loc = (f"{rec['loc']}?",) if rec.get("loc") and rec.get("loc_ans") else ()
        new, true = (answer, None) if zsre_target == "answer" else (_str(rec.get("alt")), answer)
        return Record(
            schema,
            case_id,
            rec.get("src"),
            rec.get("subject"),
            new,
            true,
            _strings(rec.get("rephrase") or None, "rephrase"),
            loc,
            (str(rec["loc_ans"]),) * len(loc),
        )
    if schema == "known":
        # ``prompt`` first: known_1000's ``template`` sometimes lacks the prompt's last word
        return Record(
            schema,
            case_id,
            rec.get("prompt") or rec.get("template"),
            rec.get("subject"),
            None,
            _str(rec.get("attribute")),
        )
    return Record(
        schema,
        case_id,
        rec.get("prompt"),
        rec.get("subject"),
        _str(rec.get("target_new")),
        _str(rec.get("target_true")),
        _strings(rec.get("paraphrases"), "paraphrases"),
        _strings(rec.get("neighbours", rec.get("neighbors")), "neighbours"),
    )


def _filled(r: Record) -> str | None:
    if isinstance(r.prompt, str) and isinstance(r.subject, str):
        return r.prompt.replace("{}", r.subject, 1)
    return None


def _json_error(err: json.JSONDecodeError, where: str) -> UserError:
    return UserError(f"{where} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}")


def parse_text(text: str, where: str) -> Any:
    """JSON (with its error position), else YAML (a superset of JSON, for hand-written requests)."""
    import yaml

    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            try:  # YAML flow style (unquoted keys) is accepted too; the JSON position is the useful message
                return yaml.safe_load(text)
            except yaml.YAMLError:
                raise _json_error(err, where) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(
            f"{where} is not valid JSON/YAML{at}: {getattr(err, 'problem', None) or str(err).splitlines()[0]}"
        ) from None


def read_records(path: str | Path, what: str, single: bool = True) -> list[Any]:
    """The records of a .json/.yaml file (a list, or one record when ``single``) or a .jsonl file (one
    record a line)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what}={path} is a directory; name a .json, .jsonl or .yaml file")
    if not path.is_file():
        raise UserError(
            f"{what}={path} does not exist"
            if path.suffix
            else f"{what}={path} is neither a file nor inline JSON/YAML (a file needs a .json, .jsonl or .yaml "
            'extension; inline: request=\'{"prompt": ..., "subject": ..., "target_new": ...}\')'
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {what}={path}: {err}") from None
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(
                        f"{what}={path} line {n} is not valid JSON: {err.msg} at column {err.colno}"
                    ) from None
        return out
    data = parse_text(text, f"{what}={path}")
    if not isinstance(data, list) and not single:
        raise UserError(f"{what}={path} must hold a JSON list of records (or JSON lines)")
    return data if isinstance(data, list) else [data]
