"""FT+L, the paper's constrained fine-tuning baseline, as an editor (ROME's release, hparams/FT/*_constr.json).

Adam on the NLL of the new object's tokens after the rewrite prompt (teacher-forced, mean over tokens), only
the edited down-projection's parameters trainable (its weight, and its bias where it has one); after every
step each is clamped into the L∞ ball of radius ``norm_constraint`` around its original value. Stops early
when the loss falls below ``early_stop_loss``. The weights change while it optimises: ``apply`` has nothing
left to write.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rome.pipeline.core.arch import ArchSpec
from rome.pipeline.core.probability import keeps_logits, target_token_ids
from rome.pipeline.core.requests import EditRequest
from rome.pipeline.editors.base import Edit, Editor, LayerStatistics, register
from rome.pipeline.editors.hparams import FineTuneHparams, typed

__all__ = ["ConstrainedFineTuning", "FineTuneEdit", "FineTuneEditor"]


class ConstrainedFineTuning:
    """Adam on ``params`` for one prompt and target, clamped to the L∞ ball after every step."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        params: Sequence[nn.Parameter],
        prompt: str,
        target: str,
        lr: float,
        steps: int,
        eps: float,
        early_stop_loss: float,
    ) -> None:
        self.model, self.params, self.eps, self.early_stop = model, list(params), eps, early_stop_loss
        device = self.params[0].device
        p_ids, t_ids = tokenizer(prompt)["input_ids"], target_token_ids(tokenizer, target)
        self.ids = torch.tensor([p_ids + t_ids[:-1]], device=device)
        self.positions = torch.arange(len(p_ids) - 1, len(p_ids) - 1 + len(t_ids), device=device)
        self.targets = torch.tensor(t_ids, device=device)
        # the LM head only where the loss reads (forward and backward), when the forward can be told so
        self.head = {"logits_to_keep": self.positions} if keeps_logits(model) else {}
        self.originals = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.steps, self.done = int(steps), False
        self.losses: list[list[float]] = [[]]  # one request (the optimisation interface's per-request lists)
        self.p_target = [0.0]

    def step(self) -> bool:
        """One Adam step (or the early stop); True once fine-tuning has ended."""
        for p in self.params:
            p.requires_grad_(True)
        try:
            out = self.model(input_ids=self.ids, **self.head).logits[0]
            logits = (out if self.head else out[self.positions]).float()
            loss = torch.nn.functional.cross_entropy(logits, self.targets)
            self.losses[0].append(loss.item())
            self.p_target[0] = float(torch.exp(-loss.detach()))
            if self.losses[0][-1] < self.early_stop:
                self.done = True
                return True
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            with torch.no_grad():
                for p, o in zip(self.params, self.originals):
                    p.copy_(torch.clamp(p, o - self.eps, o + self.eps))
        finally:
            for p in self.params:
                p.requires_grad_(False)
                p.grad = None
        self.done = len(self.losses[0]) >= self.steps
        return self.done

    def linf(self) -> float:
        """The largest change of any parameter from its original value."""
        return max(float((p.detach() - o).abs().max()) for p, o in zip(self.params, self.originals))


@dataclasses.dataclass
class FineTuneEdit(Edit):
    request: EditRequest

    @property
    def requests(self) -> list[EditRequest]:
        return [self.request]


@register("ft_l")
class FineTuneEditor(Editor):
    """FT+L on one layer's down-projection (``layer`` of its method file; null: the run's edit layer)."""

    def __init__(self, name: str, model: nn.Module, tokenizer: Any, spec: ArchSpec, hp: Any, layer: int) -> None:
        super().__init__(name, model, tokenizer, spec, typed(FineTuneHparams, hp, f"method.{name}"), [layer])

    @classmethod
    def from_config(
        cls, name: str, cfg: Any, loaded: Any, conf: Any, statistics: LayerStatistics | None, measure_only: bool
    ) -> Editor:
        from rome.pipeline.editors.settings import edit_layer

        layer = (
            edit_layer(cfg, loaded)
            if conf.get("layer") is None
            else loaded.spec.check_layer(loaded.model, conf.layer, f"method.{name}.layer")
        )
        return cls(name, loaded.model, loaded.tokenizer, loaded.spec, conf, layer)

    @property
    def steps(self) -> int:
        return int(self.hp.steps)

    def begin(self, requests: Sequence[EditRequest]) -> FineTuneEdit:
        (request,) = requests
        params = [self.model.get_parameter(name) for name in self.touched()]
        hp = self.hp
        opt = ConstrainedFineTuning(
            self.model,
            self.tokenizer,
            params,
            request.text,
            request.target_new,
            float(hp.lr),
            int(hp.steps),
            float(hp.norm_constraint),
            float(hp.early_stop_loss),
        )
        return FineTuneEdit(request, optimisation=opt)

    def conclude(self, edit: Edit) -> None:
        super().conclude(edit)
        edit.timings["finetune"] = edit.timings.pop("v_star", 0.0)

    def apply(self, edit: FineTuneEdit) -> None:
        edit.status = "applied"  # the steps wrote it

    def info(self, edit: FineTuneEdit) -> dict[str, Any]:
        losses = edit.optimisation.losses[0]
        return {
            "timings": dict(edit.timings),
            "steps": len(losses),
            "loss": [losses[0], losses[-1]],
            "linf": edit.optimisation.linf(),
        }
