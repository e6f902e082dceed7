"""Evaluation cases: CounterFact (nested or flat schema) or zsRE (MEND schema) records, read by
``pipeline.records`` and checked for what an evaluation needs. Every record that cannot be a case (unknown
schema, missing fields, subject not in its prompt, new object equal to the true one) becomes a ``Skipped``
with the reason; nothing is dropped silently."""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from rome.pipeline.core.records import detect_schema, read_record, read_records
from rome.pipeline.core.requests import EditRequest, request_from_record
from rome.pipeline.errors import UserError

__all__ = ["EvalCase", "Skipped", "load_cases", "load_snippets", "dataset_title", "EVAL_SCHEMAS", "ZSRE_CONVENTION"]

EVAL_SCHEMAS = ("counterfact-nested", "counterfact-flat", "zsre")
# what a zsRE edit writes (eval.zsre_target), as the titles say it
ZSRE_CONVENTION = {
    "answer": "edits write the true answer answers[0] (ROME's dsets/zsre.py)",
    "alt": "edits write alt (MEND's and EasyEdit's convention)",
}


def dataset_title(kind: str, zsre_target: str) -> str:
    """The dataset as a title names it: "CounterFact", or "zsRE (<what its edits write>)"."""
    return "CounterFact" if kind == "counterfact" else f"zsRE ({ZSRE_CONVENTION[zsre_target]})"


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


def _case(index: int, rec: Any, zsre_target: str) -> EvalCase:
    r = read_record(rec, index, zsre_target)
    if r.schema not in EVAL_SCHEMAS:
        raise UserError(f"a {r.schema} record is not an evaluation case (CounterFact or zsRE)")
    missing = [k for k in ("prompt", "subject", "target_new") if getattr(r, k) in (None, "")]
    if r.schema != "zsre" or zsre_target == "alt":
        missing += [] if r.target_true else ["target_true (the true object)"]
    if missing:
        raise UserError(f"missing field(s) {', '.join(missing)}")
    request = request_from_record(rec, zsre_target)
    return EvalCase(
        index,
        r.case_id,
        r.schema,
        request,
        r.neighbour_targets or (request.target_true,) * len(request.neighbours),
        r.generation_prompts,
        r.relation_id,
        r.target_new_id,
    )


def load_cases(
    path: str | Path, n: int | None = None, start: int = 0, zsre_target: str = "answer"
) -> tuple[list[EvalCase], list[Skipped]]:
    """Records [start, start + n) of the file as cases; the first good record's schema is the file's."""
    records = read_records(path, "eval.dataset", single=False)
    if start >= len(records):
        raise UserError(f"eval.start={start} is past the end of eval.dataset={path} ({len(records)} records)")
    stop = len(records) if n is None else min(len(records), start + int(n))
    if n is not None and start + int(n) > len(records):  # said before any work, not discovered in the table
        print(
            f"note: eval.n={n} from record {start} asks for more than {path} holds ({len(records)} records): "
            f"{stop - start} case(s) will run",
            file=sys.stderr,
        )
    cases, skipped, schema = [], [], None
    for i in range(start, stop):
        rec = records[i]
        cid = rec.get("case_id", i) if isinstance(rec, dict) else i
        try:
            s = detect_schema(rec)
            if schema is not None and s != schema:
                raise UserError(f"schema {s} differs from the file's {schema}")
            cases.append(_case(i, rec, zsre_target))
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
        raise UserError(
            f"eval.snippets={path} is not ROME's attribute_snippets.json format "
            f"([{{relation_id, target_id, samples: [{{text}}]}}]): {err!r}"
        ) from err
    return dict(out)
