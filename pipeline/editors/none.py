"""The unedited model as an editor: the baseline row of an evaluation ("none"). It changes nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from rome.pipeline.core.requests import EditRequest
from rome.pipeline.editors.base import Edit, Editor, LayerStatistics, register

__all__ = ["NoEditor"]


@dataclasses.dataclass
class NoEdit(Edit):
    requests: list[EditRequest]


@register("none")
class NoEditor(Editor):
    edits_weights = False

    @classmethod
    def from_config(
        cls, name: str, cfg: Any, loaded: Any, conf: Any, statistics: LayerStatistics | None, measure_only: bool
    ) -> Editor:
        return cls(name, loaded.model, loaded.tokenizer, loaded.spec, conf, [])

    def begin(self, requests: Sequence[EditRequest]) -> NoEdit:
        return NoEdit(list(requests))

    def apply(self, edit: NoEdit) -> None:
        edit.status = "applied"
