"""Fact files for tracing: ROME's ``known_1000.json`` and files of the same shape.

A record needs a subject, a prompt (``prompt`` with the subject in it, or ``template`` with ``{}``) and
its true answer (``attribute``; CounterFact's ``ground_truth`` or ``target_true`` are read too); the
schemas are ``pipeline.records``'.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rome.pipeline.core.records import read_record, read_records
from rome.pipeline.errors import UserError

__all__ = ["Fact", "load_facts"]


@dataclasses.dataclass(frozen=True)
class Fact:
    index: int  # position in the file: seeds the fact's noise, names its output directory
    subject: str
    prompt: str  # with ``{}`` for the subject
    answer: str
    id: str  # the record's own id (known_id / case_id) or the index


def _fact(i: int, rec: Any, where: str) -> Fact:
    try:
        r = read_record(rec, i)
    except UserError as err:
        raise UserError(f"{where}: record {i}: {err}") from None
    subject, prompt, answer = r.subject, r.prompt, r.target_true
    if not (isinstance(subject, str) and isinstance(prompt, str) and isinstance(answer, str)):
        raise UserError(
            f"{where}: record {i} lacks a subject, a template/prompt or an attribute (answer); "
            "trace files look like known_1000.json"
        )
    if "{}" not in prompt and subject in prompt:
        prompt = prompt.replace(subject, "{}", 1)  # else tracing says the subject is missing, and skips it
    return Fact(i, subject, prompt, answer, str(r.case_id))


def load_facts(path: str | Path, n: int | None = None, start: int = 0) -> list[Fact]:
    """Facts ``start`` .. ``start + n`` (to the end when n is None) of a JSON list file, keeping their
    index in the file (it seeds their noise); one clear UserError if unreadable."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"fact file {path} does not exist (known facts: ../shared/data/known_1000.json)")
    data = read_records(path, "trace.dataset", single=False)
    if not data:
        raise UserError(f"fact file {path} must hold a non-empty JSON list of records like known_1000.json")
    if n is not None and int(n) <= 0:
        raise UserError(f"trace.n={n} must be a positive number of records (or null for all)")
    if int(start) < 0 or int(start) >= len(data):
        raise UserError(f"trace.start={start} is outside the {len(data)} records of {path}")
    stop = None if n is None else int(start) + int(n)
    return [_fact(int(start) + i, rec, str(path)) for i, rec in enumerate(data[int(start) : stop])]
