"""The unedited model: every case's "none" row is its pre-edit score."""

from __future__ import annotations

from .base import Method, register


@register("none")
class NoEdit(Method):
    edits = False

    def apply(self, ctx, case, seed):
        return {"timings": {}}
