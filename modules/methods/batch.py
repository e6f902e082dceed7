"""MEMIT and AlphaEdit in the per-case protocol: refused with the mode that runs them. They write batches of
edits across several layers, which the per-case evaluator (one edited matrix restored after every case)
does not measure; ``eval.mode=sequential`` or ``eval.mode=batch`` does (recipes/eval_scale.py)."""

from __future__ import annotations

from pipeline.errors import UserError

from .base import Method, register


class _BatchMethod(Method):
    def setup(self, ctx):
        raise UserError(f"{self.name} edits batches across layers: evaluate it with eval.mode=sequential "
                        "(or eval.mode=batch), e.g. eval.methods=[rome,memit,alphaedit] eval.mode=sequential eval.batch_size=100")


register("memit")(type("Memit", (_BatchMethod,), {}))
register("alphaedit")(type("AlphaEdit", (_BatchMethod,), {}))
