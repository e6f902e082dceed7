"""ROME's v* optimisation as a short Lightning training loop.

The only trainable parameter is δ (zero-initialised), added to the edited layer's MLP output at the
subject's last token. Adam on ROME's loss; early stop when the loss falls below ``early_stop_loss``;
after every step δ is clamped to ``clamp_norm_factor`` x ‖v₀‖. The frozen model stays in eval mode.
The callbacks in ``modules/callbacks.py`` then apply, verify and record the rank-one edit.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from pipeline.arch import ArchSpec
from pipeline.rank_one import RankOne
from pipeline.requests import EditRequest
from pipeline.value import ValueBatch, value_loss


@dataclasses.dataclass
class EditJob:
    """One request's inputs and, as the callbacks fill them in, its results."""

    request: EditRequest
    layer: int
    k_star: torch.Tensor  # [d_ff], averaged over templates
    v0: torch.Tensor  # [d_model], the current value, averaged over the same templates
    second_moment: torch.Tensor | None  # C, or None for C = I
    hp: Any  # the edit config group
    stats_id: dict[str, Any] | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    losses: list[float] = dataclasses.field(default_factory=list)
    delta: torch.Tensor | None = None
    edit: RankOne | None = None
    norms: dict[str, float] = dataclasses.field(default_factory=dict)
    probs: dict[str, Any] = dataclasses.field(default_factory=dict)
    generations: dict[str, str] = dataclasses.field(default_factory=dict)
    status: str = "pending"  # applied | rolled_back | failed_verification
    reason: str = ""
    backup: torch.Tensor | None = None
    entry_id: int | None = None


class ValueOptimizer(L.LightningModule):
    def __init__(self, model: torch.nn.Module, spec: ArchSpec, job: EditJob, batch: ValueBatch, tokenizer: Any) -> None:
        super().__init__()
        self.model, self.spec, self.job, self.batch, self.tokenizer = model, spec, job, batch, tokenizer
        self.delta = torch.nn.Parameter(torch.zeros_like(job.v0))
        self.v0_norm = float(job.v0.norm())
        self.kl_init: torch.Tensor | None = None
        self.automatic_optimization = True

    def train(self, mode: bool = True) -> "ValueOptimizer":
        super().train(mode)
        self.model.eval()  # the edited model never runs dropout
        return self

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(int(self.job.hp.v.steps)), batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.delta], lr=float(self.job.hp.v.lr))

    def on_train_start(self) -> None:
        self._t0 = time.perf_counter()

    def training_step(self, step: int, batch_idx: int) -> torch.Tensor | None:
        hp = self.job.hp.v
        parts, kl_logp = value_loss(self.model, self.spec, self.job.layer, self.batch, self.delta, self.v0_norm,
                                    self.kl_init, hp)
        if self.kl_init is None:
            self.kl_init = kl_logp.detach()
        self.job.losses.append(parts.total.item())
        self.log_dict({"loss": parts.total.detach(), "nll": parts.nll.detach(), "p_target": parts.p_target},
                      prog_bar=True, on_step=True, batch_size=1)
        # as the original: stop before stepping when the loss is low enough, or at the last iteration
        if self.job.losses[-1] < float(hp.early_stop_loss) or batch_idx == int(hp.steps) - 1:
            self.trainer.should_stop = True
            return None
        return parts.total

    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        max_norm = float(self.job.hp.v.clamp_norm_factor) * self.v0_norm
        norm = self.delta.norm()
        if norm > max_norm:
            self.delta.mul_(max_norm / norm)

    def finish(self) -> EditJob:
        """Freeze δ into the job (idempotent; callbacks call it, whatever order hooks run in)."""
        if self.job.delta is None:
            self.job.delta = self.delta.detach().clone()
            self.job.timings["v_star"] = time.perf_counter() - self._t0
        return self.job
