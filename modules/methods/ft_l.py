"""FT+L, the paper's constrained fine-tuning baseline: Adam on the edit layer's down-projection only,
the weights clamped to an L∞ ball of radius ``norm_constraint`` around the original after every step."""

from __future__ import annotations

from pipeline.finetune import constrained_finetune

from .base import Method, register


@register("ft_l")
class FineTuneL(Method):
    def apply(self, ctx, case, seed):
        c, loaded = self.conf, ctx.loaded
        weight = loaded.spec.down_proj_weight(loaded.model, ctx.layer)
        out = constrained_finetune(loaded.model, loaded.tokenizer, weight, case.request.text, case.request.target_new,
                                   lr=float(c.lr), steps=int(c.steps), eps=float(c.norm_constraint),
                                   early_stop_loss=float(c.early_stop_loss))
        return {"timings": {"finetune": out.pop("seconds")}, "steps": out["steps"],
                "loss": [out["losses"][0], out["losses"][-1]], "linf": out["linf"]}
