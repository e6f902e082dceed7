"""ROME as the edit stage makes it (``recipes.edit.edit_one``): k*, v* by a Lightning loop, rank-one update.

``mom2_adjustment: true`` uses C from the statistics cache (the paper); ``false`` uses C = I (what EasyEdit
ships). Hyperparameters are the ``edit`` group's. For evaluation the edit is measured as made: the
edit stage's verification and rollback are off (a rolled-back edit would score as no edit) and no text is
generated inside the edit. The request given to ``edit_one`` carries only the rewrite: paraphrases and
neighbours are for scoring, never seen by the edit.
"""

from __future__ import annotations

import dataclasses

import torch
from omegaconf import OmegaConf

from .base import Method, register


@register("rome")
class Rome(Method):
    def setup(self, ctx):
        self.templates = ctx.templates()
        self.c, self.stats_id = ctx.second_moment() if self.conf.mom2_adjustment else (None, None)
        self.hp = OmegaConf.merge(ctx.cfg.edit, {"mom2_adjustment": bool(self.conf.mom2_adjustment), "generate_tokens": 0,
                                                 "verify": {"enabled": False, "rollback": False}})

    def config(self):
        return {**super().config(), "edit": OmegaConf.to_container(self.hp, resolve=True), "stats": self.stats_id}

    def apply(self, ctx, case, seed):
        from recipes.edit import edit_one

        torch.manual_seed(seed)
        request = dataclasses.replace(case.request, paraphrases=(), neighbours=())
        with torch.enable_grad():
            job = edit_one(ctx.loaded, request, ctx.layer, self.templates, self.c, self.hp, None, self.stats_id,
                           accelerator=ctx.accelerator, verbose=False)
        return {"timings": {k: v for k, v in job.timings.items() if k != "templates"}, "steps": len(job.losses),
                "loss": [job.losses[0], job.losses[-1]] if job.losses else [],
                "relative_update": job.norms.get("relative_update"), "denominator": job.norms.get("denominator")}
