"""ROME as the eval stage measures it: ``pipeline.rome`` directly (no Trainer nested in ``predict_step``).

``mom2_adjustment: true`` uses C from the statistics cache (the paper); ``false`` uses C = I (what EasyEdit
ships). Hyperparameters are the ``edit`` group's, with the method's own ``layer`` and ``variant`` over them. For evaluation the edit is measured as made: the
edit stage's verification and rollback are off (a rolled-back edit would score as no edit) and no text is
generated inside the edit. The request given to the edit carries only the rewrite: paraphrases and
neighbours are for scoring, never seen by the edit.
"""

from __future__ import annotations

import dataclasses

import torch
from omegaconf import OmegaConf

from pipeline.editors import rome
from pipeline.editors.rank_one import KeySolver

from .base import Method, register
from pipeline.core.timing import model_device


@register("rome")
class Rome(Method):
    def setup(self, ctx):
        self.templates = ctx.templates()
        layer = self.layer(ctx)
        c, self.stats_id = ctx.second_moment(layer) if self.conf.mom2_adjustment else (None, None)
        own = {"layer": layer, **({"variant": self.conf.variant} if self.conf.get("variant") else {})}
        self.hp = OmegaConf.merge(ctx.cfg.edit, {"mom2_adjustment": bool(self.conf.mom2_adjustment), "generate_tokens": 0,
                                                 "verify": {"enabled": False, "rollback": False}, **own})
        self._c = c
        self._context: rome.EditContext | None = None

    def config(self):
        return {**super().config(), "edit": OmegaConf.to_container(self.hp, resolve=True), "stats": self.stats_id}

    def context(self, ctx) -> rome.EditContext:
        """Built on first use, on the device the model is on by then (a DDP rank's), with C factorised once."""
        if self._context is None:
            loaded = ctx.loaded
            solver = KeySolver(self._c, float(self.hp.ridge), model_device(loaded.model))
            self._context = rome.EditContext(loaded.model, loaded.tokenizer, loaded.spec, int(self.hp.layer), self.templates,
                                             solver, self.hp, self.stats_id)
        return self._context

    def apply(self, ctx, case, seed):
        torch.manual_seed(seed)
        request = dataclasses.replace(case.request, paraphrases=(), neighbours=())
        result = rome.edit_in_context(self.context(ctx), request)
        return {"timings": dict(result.timings), "steps": len(result.losses),
                "loss": [result.losses[0], result.losses[-1]] if result.losses else [],
                "relative_update": result.norms.get("relative_update"), "denominator": result.norms.get("denominator")}
