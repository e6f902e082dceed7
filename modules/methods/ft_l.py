"""FT+L, the paper's constrained fine-tuning baseline as released: Adam on every parameter of one layer's
down-projection (the weight, and the bias where there is one; layer 0 by default), clamped to an L∞ ball of
radius ``norm_constraint`` around the original after every step."""

from __future__ import annotations

from pipeline.editors.finetune import constrained_finetune

from .base import Method, register


@register("ft_l")
class FineTuneL(Method):
    def apply(self, ctx, case, seed):
        c, loaded = self.conf, ctx.loaded
        params = [loaded.model.get_parameter(name) for name in self.touched(ctx)]
        out = constrained_finetune(loaded.model, loaded.tokenizer, params, case.request.text, case.request.target_new,
                                   lr=float(c.lr), steps=int(c.steps), eps=float(c.norm_constraint),
                                   early_stop_loss=float(c.early_stop_loss))
        return {"timings": {"finetune": out.pop("seconds")}, "steps": out["steps"],
                "loss": [out["losses"][0], out["losses"][-1]], "linf": out["linf"]}
