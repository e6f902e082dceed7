"""UltraEdit (Gu et al. 2025, arXiv 2505.14679): a batch's parameter shift in one step from the edited
layers' hidden states and their gradients, with lifelong normalisation of those features across batches.

For a batch of n requests ("turn" t) and every edited down-projection W_l ([d_model, d_ff], out x in):
1. One teacher-forced pass over ``prompt + target[:-1]`` per request on the model as it is (earlier batches
   applied). At every position whose next token is a target token (the last prompt token and the target's
   tokens but the last: the release's ``token: ans``) we read, per layer, the key h_i = W_l's input [d_ff]
   and the gradient g_i = ∂L/∂(W_l's output) [d_model] of L = the summed cross-entropy of the target tokens.
   Every such position is one row i of the batch (m rows in all, m ≥ n).
2. Lifelong normalisation: z_i = [h_i ‖ g_i] updates running statistics (count N, mean μ, sum of squared
   deviations M2; float64, merged exactly, ``LifelongStats``) kept across batches and runs (the ledger holds
   them); then ẑ_i = (z_i − μ) / (σ + ε), σ = sqrt(M2 / (N − 1)), with the statistics after this batch.
   ẑ_i splits into ĥ_i [d_ff] and ĝ_i [d_model].
3. Pseudo-target shift of the layer's output: v_i = −η ‖ĥ_i‖² ĝ_i (a gradient step on the output, scaled by
   the normalised key's energy).
4. The closed form: ΔW = argmin ‖ΔW Hᵀ − Vᵀ‖² + λ‖ΔW‖² over the raw keys H [m, d_ff] and V [m, d_model]:
       ΔW (HᵀH + λI) = Vᵀ H,   ΔW = Vᵀ H (HᵀH + λI)⁻¹ = Vᵀ (H Hᵀ + λI)⁻¹ H,
   stored as ``LowRank(left=Vᵀ, right=Hᵀ(HHᵀ + λI)⁻¹)`` (an m x m solve; d_ff x d_ff when that is smaller),
   float64, written in place through ``apply_low_rank`` so that a ledger rebuild is bitwise.
Every layer's features are read before any layer changes and each layer's shift depends only on them (the
release caches all modules' features, then writes all shifts), so the layers are independent.

``edit.ultraedit.preserve=nullspace`` (not in the paper): the solve runs on the keys projected onto the null
space of the layer's C (P = AlphaEdit's projector, ``stats.spectrum.null_space_projector``): with H̃ = H P,
ΔW = Vᵀ (H̃H̃ᵀ + λI)⁻¹ H̃ is the ridge solution restricted to ΔW = ΔW P, so ΔW k = ΔW P k ≈ 0 for the keys C
sees often (P k ≈ 0), where a batch's shift otherwise reaches every fact's answer (benchmarks/key_overlap.py).
Measured on SmolLM2 (docs/many-edits.md): it keeps the held-out perplexity and delays the loss of known facts,
but does not stop it; off by default.

``edit.ultraedit.preserve=covariance`` (not in the paper): MEMIT's trade-off in UltraEdit's solve, ΔW = Vᵀ H (HᵀH +
μC + λI)⁻¹, the minimiser of ‖ΔW Hᵀ − Vᵀ‖² + μ tr(ΔW C ΔWᵀ) + λ‖ΔW‖²: a soft version of the null-space projection
(the shift kept small on C's frequent keys in proportion to their energy, not removed from them), μ =
``edit.ultraedit.covariance_weight``; off by default.

``edit.ultraedit.position=subject`` (not in the paper): one row per request, the key and gradient at the subject's
last token (MEMIT's site, where other facts' keys overlap a batch's less), the rest as above. Measured on SmolLM2
(layers 1-5, one batch of 100, docs/many-edits.md): one step there barely writes the edits (ES 52-57 against 93 at
the answer positions) while the damage grows with η; off by default.

Where this differs from the release (github XiaojieGu/UltraEdit): it edits the down-projections by default (the
module every editor here edits; the release does so for GPT-J, Mistral-7B and Phi-4 but edits gate/up projections
for Llama-3 and Qwen2.5: ``model.arch.down_proj=mlp.up_proj`` points it at another linear module in every layer,
``model.arch.down_proj_by_layer`` names one per layer, the release's Llama-3 set, and on SmolLM2 neither was
better: docs/many-edits.md); L is the sum over target tokens, not the mean over each forward pass of 10 requests
(a per-pass constant the normalisation divides out, except that it varied with the pass's token count; the sum
makes a request's gradient independent of its batch-mates); the statistics merge exactly (the release adds
n·Var_unbiased = n/(n−1)·M2_batch per batch, a slight over-count) and in float64.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rome.pipeline.config import plain
from rome.pipeline.core.arch import ArchSpec
from rome.pipeline.core.hooks import Trace, get_module
from rome.pipeline.core.padding import right_pad
from rome.pipeline.core.probability import target_token_ids
from rome.pipeline.core.requests import EditRequest
from rome.pipeline.core.subject import fill_prompt, subject_token_range
from rome.pipeline.core.timing import Clock, model_device
from rome.pipeline.editors.base import BatchEditor, Edit, Editor, LayerStatistics, register
from rome.pipeline.editors.hparams import UltraEditHparams, typed
from rome.pipeline.editors.ledger import Ledger
from rome.pipeline.editors.rank_one import KeySolver, LowRank, apply_low_rank, frobenius_norm
from rome.pipeline.editors.verification import verification_record
from rome.pipeline.errors import UserError
from rome.pipeline.stats.spectrum import cached_eigendecomposition, null_space_projector, null_space_share
from rome.pipeline.stats.store import stats_identity

__all__ = [
    "UltraEditEditor",
    "UltraEditBatch",
    "LifelongStats",
    "Features",
    "read_features",
    "pseudo_targets",
    "ridge_shift",
    "STATISTICS",
]

STATISTICS = ("shared", "per_layer")  # edit.ultraedit.statistics
PRESERVE = ("none", "nullspace", "covariance")  # edit.ultraedit.preserve
POSITIONS = ("answer", "subject")  # edit.ultraedit.position


class LifelongStats:
    """Running count, mean and M2 (the sum of squared deviations from the mean) of feature rows, float64.
    ``update`` merges a batch exactly (Chan, Golub & LeVeque's parallel formula), so the statistics after N
    batches are those of the N batches' rows taken at once, whatever the batches' sizes."""

    def __init__(self, size: int, device: torch.device | str | None = None) -> None:
        self.count = 0
        self.mean = torch.zeros(size, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(size, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        """Add the rows of ``features`` [rows, size]."""
        x = features.to(device=self.mean.device, dtype=torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(0)
        batch_m2 = (x - batch_mean).square().sum(0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta.square() * (self.count * n / total)
        self.count = total

    def std(self) -> torch.Tensor:
        """The sample standard deviation sqrt(M2 / (N − 1)) (zeros before two rows)."""
        return (self.m2 / (self.count - 1)).sqrt() if self.count > 1 else torch.zeros_like(self.m2)

    def normalise(self, features: torch.Tensor, eps: float) -> torch.Tensor:
        """(z − μ) / (σ + ε), float64."""
        x = features.to(device=self.mean.device, dtype=torch.float64)
        return (x - self.mean) / (self.std() + eps)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The statistics as tensors named ``prefix.count|mean|m2`` (a copy: what the ledger stores)."""
        return {
            f"{prefix}.count": torch.tensor([self.count], dtype=torch.int64),
            f"{prefix}.mean": self.mean.detach().cpu().clone(),
            f"{prefix}.m2": self.m2.detach().cpu().clone(),
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str, device: Any = None) -> LifelongStats:
        out = cls(0, device)
        out.count = int(tensors[f"{prefix}.count"][0])
        out.mean = tensors[f"{prefix}.mean"].to(device=device, dtype=torch.float64)
        out.m2 = tensors[f"{prefix}.m2"].to(device=device, dtype=torch.float64)
        return out


@dataclasses.dataclass
class Features:
    """Per layer, the rows of one batch: keys h_i [m, d_ff] and output gradients g_i [m, d_model], float32."""

    keys: dict[int, torch.Tensor]
    grads: dict[int, torch.Tensor]
    owner: list[int]  # the request each row belongs to
    loss: float  # L: the summed cross-entropy of the target tokens


def _rows(
    tokenizer: Any, requests: Sequence[EditRequest], position: str
) -> list[tuple[list[int], list[int], int, int | None]]:
    """Per request: the ids of ``prompt + target[:-1]``, the target's ids, the position predicting its first token
    and, for ``position="subject"`` only, the position of the subject's last token."""
    out = []
    for r in requests:
        text, start, end = fill_prompt(r.prompt, r.subject)
        prompt = tokenizer(text)["input_ids"]
        target = target_token_ids(tokenizer, r.target_new)
        subject_last = subject_token_range(tokenizer, text, start, end)[1] - 1 if position == "subject" else None
        out.append((prompt + target[:-1], target, len(prompt) - 1, subject_last))
    return out


def _probe(zeros: dict[int, torch.Tensor], layer: int):
    """An output edit that adds a zero tensor requiring grad (kept in ``zeros``): its gradient is the output's."""

    def add(out: torch.Tensor) -> torch.Tensor:
        zeros[layer] = torch.zeros_like(out, requires_grad=True)
        return out + zeros[layer]

    return add


def read_features(
    model: nn.Module,
    tokenizer: Any,
    spec: ArchSpec,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    rows_per_pass: int,
    position: str = "answer",
) -> Features:
    """Keys and output gradients of ``layers``' down-projections at every target-predicting position
    (``position="answer"``, the paper's rows) or at the subject's last token, one row per request
    (``"subject"``, MEMIT's site; not in the paper). The loss is the same either way.

    The gradient with respect to a module's output is read as that of a zero tensor added to the output (the
    graph and the forward values stay as they are, whatever the parameters' ``requires_grad``); the pass stops
    at the final norm and the LM head runs at the target positions only."""
    device = model_device(model)
    rows = _rows(tokenizer, requests, position)
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    grads: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    owner: list[int] = []
    total = 0.0
    for start in range(0, len(rows), rows_per_pass):
        chunk = rows[start : start + rows_per_pass]
        ids, mask = right_pad([r for r, _, _, _ in chunk], tokenizer.pad_token_id or 0, device)
        at_row = torch.tensor([i for i, (_, t, _, _) in enumerate(chunk) for _ in t], device=device)
        at_pos = torch.tensor([p + j for _, t, p, _ in chunk for j in range(len(t))], device=device)
        labels = torch.tensor([tok for _, t, _, _ in chunk for tok in t], device=device)
        if position == "subject":
            read_row = torch.arange(len(chunk), device=device)
            read_pos = torch.tensor([s for _, _, _, s in chunk], device=device)
            owner += [start + i for i in range(len(chunk))]
        else:
            read_row, read_pos = at_row, at_pos
            owner += [start + i for i, (_, t, _, _) in enumerate(chunk) for _ in t]
        zeros: dict[int, torch.Tensor] = {}
        with torch.enable_grad():
            with contextlib.ExitStack() as stack:  # the final norm's Trace ends the pass (and is left first)
                traces = {
                    layer: stack.enter_context(
                        Trace(
                            get_module(model, spec.down_proj_name(layer)),
                            retain_input=True,
                            edit_output=_probe(zeros, layer),
                        )
                    )
                    for layer in layers
                }
                final = stack.enter_context(
                    Trace(get_module(model, spec.final_norm), retain_output=True, stop=True, detach=False)
                )
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            logits = spec.logits(model, final.output[at_row, at_pos])
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            found = torch.autograd.grad(loss, [zeros[layer] for layer in layers])
        total += float(loss.detach())
        for layer, g in zip(layers, found):
            keys[layer].append(traces[layer].input[read_row, read_pos].float())
            grads[layer].append(g[read_row, read_pos].float())
    return Features(
        {layer: torch.cat(k) for layer, k in keys.items()},
        {layer: torch.cat(g) for layer, g in grads.items()},
        owner,
        total,
    )


def pseudo_targets(
    keys: torch.Tensor, grads: torch.Tensor, stats: LifelongStats, lr: float, eps: float
) -> torch.Tensor:
    """v_i = −η ‖ĥ_i‖² ĝ_i [m, d_model] float64, ẑ = [ĥ ‖ ĝ] the features normalised by ``stats``."""
    z = stats.normalise(torch.cat([keys, grads], dim=1).to(stats.mean.device), eps)
    h, g = z.split([keys.shape[1], grads.shape[1]], dim=1)
    return -lr * h.square().sum(1, keepdim=True) * g


def ridge_shift(keys: torch.Tensor, values: torch.Tensor, ridge: float, preserve: KeySolver | None = None) -> LowRank:
    """ΔW = Vᵀ H (HᵀH + λI)⁻¹ [d_model, d_ff] as ``LowRank(Vᵀ, Hᵀ(HHᵀ + λI)⁻¹)`` (float64, contiguous): the
    ridge regression of the shifts ``values`` V [m, d_model] on the keys H [m, d_ff]. The m x m system when m
    ≤ d_ff, else the d_ff x d_ff one ((HᵀH + λI)⁻¹Hᵀ: the same matrix).

    ``preserve``: a solver of A = μC + λI (``preserve=covariance``), and ΔW = Vᵀ H (HᵀH + A)⁻¹, the minimiser of
    ‖ΔW Hᵀ − Vᵀ‖² + μ tr(ΔW C ΔWᵀ) + λ‖ΔW‖²: MEMIT's trade-off, the shift kept small on the keys C sees often.
    By Woodbury, (HᵀH + A)⁻¹Hᵀ = A⁻¹Hᵀ (I + H A⁻¹ Hᵀ)⁻¹: one m x m system beside the cached factor of A."""
    h = keys.to(torch.float64)
    m, d = h.shape
    if preserve is not None:
        a_inv_ht = preserve.solve(h.T.contiguous())  # [d_ff, m]
        system = h @ a_inv_ht
        system.diagonal().add_(1.0)
        right = torch.linalg.solve(system, a_inv_ht.T).T  # system is symmetric
    elif m <= d:
        system = h @ h.T
        system.diagonal().add_(ridge)
        right = torch.linalg.solve(system, h).T  # system is symmetric: Hᵀ system⁻¹ = (system⁻¹ H)ᵀ
    else:
        system = h.T @ h
        system.diagonal().add_(ridge)
        right = torch.linalg.solve(system, h.T)
    left = values.to(device=h.device, dtype=torch.float64).T
    return LowRank(left.contiguous(), right.contiguous())


@dataclasses.dataclass
class UltraEditBatch(Edit):
    """A batch from ``begin`` on: its features and, once applied, the shift per layer and the statistics."""

    requests: list[EditRequest]
    features: Features
    updates: dict[int, LowRank] = dataclasses.field(default_factory=dict)
    norms: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    statistics: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # after this batch


@register("ultraedit")
class UltraEditEditor(BatchEditor):
    """UltraEdit: batches of ``edit.batch_size`` requests, no optimisation, one ridge solve per layer each;
    ``stats`` holds the lifelong normalisation (one set for all layers, or one per layer)."""

    recordable = True

    def __init__(
        self,
        name: str,
        model: nn.Module,
        tokenizer: Any,
        spec: ArchSpec,
        hp: Any,
        layers: Sequence[int],
        batch_size: int,
        verify: Any = None,
    ) -> None:
        """``verify``: the ``edit.verify`` group (None: no checks)."""
        hp = typed(UltraEditHparams, hp, "edit.ultraedit")
        if hp.statistics not in STATISTICS:
            raise UserError(f"edit.ultraedit.statistics={hp.statistics} must be one of {', '.join(STATISTICS)}")
        if not hp.ridge > 0:
            raise UserError(f"edit.ultraedit.ridge={hp.ridge} must be positive (the release uses 1)")
        if hp.rows_per_pass <= 0:
            raise UserError(f"edit.ultraedit.rows_per_pass={hp.rows_per_pass} must be a positive number of prompts")
        if hp.preserve not in PRESERVE:
            raise UserError(f"edit.ultraedit.preserve={hp.preserve} must be one of {', '.join(PRESERVE)}")
        if hp.position not in POSITIONS:
            raise UserError(f"edit.ultraedit.position={hp.position} must be one of {', '.join(POSITIONS)}")
        super().__init__(name, model, tokenizer, spec, hp, layers, batch_size, "edit.ultraedit.layers", verify)
        device = model_device(model)
        self.shapes = {layer: tuple(spec.down_proj_matrix(model, layer).shape) for layer in self.layers}
        size = {layer: sum(self.shapes[layer]) for layer in self.layers}
        self.stats = {self.group(layer): LifelongStats(size[layer], device) for layer in self.layers}
        self.projectors: dict[int, torch.Tensor] = {}  # preserve=nullspace: P per layer (``preserve_null_space``)
        self.preservers: dict[int, KeySolver] = {}  # preserve=covariance: μC + λI per layer (``preserve_covariance``)
        self.stats_id: dict[str, Any] | None = None

    @classmethod
    def from_config(
        cls, name: str, cfg: Any, loaded: Any, conf: Any, statistics: LayerStatistics | None, measure_only: bool
    ) -> Editor:
        from rome.pipeline.editors.settings import method_hparams

        edit_hp = method_hparams(cfg, conf, measure_only)
        hp = edit_hp.ultraedit
        # the paper edits late MLPs at the answer positions (the release: GPT-J down-projections 18-26 of 28,
        # Mistral-7B 29-30 of 32, Phi-4 30-38 of 40); a model file sets them in edit.ultraedit.layers, and
        # without one the run's MEMIT layer set (edit.layers) stands in
        layers = hp.layers if hp.layers is not None else cfg.edit.layers
        if not layers:
            raise UserError(f"{name} needs its layers: pass edit.ultraedit.layers=[...] (or edit.layers=[...])")
        model, batch_size = loaded.model, int(cfg.edit.batch_size)
        editor = cls(name, model, loaded.tokenizer, loaded.spec, hp, list(layers), batch_size, edit_hp.verify)
        if hp.preserve != "none":
            if statistics is None:
                raise UserError(
                    f"{name} with edit.ultraedit.preserve={hp.preserve} needs C of its layers (stage=stats)"
                )
            if hp.preserve == "nullspace":
                editor.preserve_null_space(statistics(editor.layers))
            else:
                editor.preserve_covariance(statistics(editor.layers))
        return editor

    def preserve_null_space(self, stats: dict[int, Any]) -> None:
        """P per layer from its C's (cached) eigendecomposition (``projectors``; ``null_space``: its rank and the
        share of C's key energy in its range)."""
        device, threshold = model_device(self.model), float(self.hp.nullspace_threshold)
        for layer in self.layers:
            values, vectors = cached_eigendecomposition(stats[layer], device)
            projector, rank = null_space_projector(values, vectors, threshold)
            self.projectors[layer] = projector.to(device=device, dtype=torch.float64)
            self.null_space[layer] = rank, null_space_share(values, threshold)
        self.stats_id = {str(layer): stats_identity(s) for layer, s in stats.items()}

    def preserve_covariance(self, stats: dict[int, Any]) -> None:
        """The factor of A = μC + λI per layer (``preservers``; μ = edit.ultraedit.covariance_weight)."""
        device, weight = model_device(self.model), float(self.hp.covariance_weight)
        if not weight > 0:
            raise UserError(f"edit.ultraedit.covariance_weight={weight} must be positive (MEMIT's is 15000 at 8B)")
        for layer in self.layers:
            self.preservers[layer] = KeySolver(weight * stats[layer].second_moment, float(self.hp.ridge), device)
        self.stats_id = {str(layer): stats_identity(s) for layer, s in stats.items()}

    def group(self, layer: int) -> str:
        """The statistics a layer's features go into: ``shared`` (the release keys one normaliser per weight
        shape, which every down-projection shares; ``shared<out>x<in>`` when the edited modules differ in shape,
        as a down- and an up-projection do) or ``layer<l>``."""
        if self.hp.statistics != "shared":
            return f"layer{layer}"
        if len(set(self.shapes.values())) == 1:
            return "shared"
        out, inp = self.shapes[layer]
        return f"shared{out}x{inp}"

    def begin(self, requests: Sequence[EditRequest]) -> UltraEditBatch:
        clock = Clock(self.model)
        features = read_features(
            self.model, self.tokenizer, self.spec, requests, self.layers, int(self.hp.rows_per_pass), self.hp.position
        )
        clock.lap("features")
        edit = UltraEditBatch(list(requests), features, optimisation=None, timings=clock.timings)
        self.check_before(edit)
        return edit

    def apply(self, edit: UltraEditBatch) -> None:
        clock = Clock(self.model, edit.timings)
        f, hp = edit.features, self.hp
        for layer in self.layers:  # every layer's rows first: all shifts are normalised by the batch's statistics
            self.stats[self.group(layer)].update(torch.cat([f.keys[layer], f.grads[layer]], dim=1))
        for layer in self.layers:
            values = pseudo_targets(f.keys[layer], f.grads[layer], self.stats[self.group(layer)], hp.lr, hp.eps)
            keys = f.keys[layer].to(device=values.device, dtype=torch.float64)
            if layer in self.projectors:  # H̃ = H P (P symmetric)
                keys = keys @ self.projectors[layer]
            update = ridge_shift(keys, values, float(hp.ridge), self.preservers.get(layer))
            weight = self.spec.down_proj_weight(self.model, layer)
            norm_w = frobenius_norm(weight)
            apply_low_rank(weight, update, self.spec.down_proj_conv1d)
            edit.updates[layer] = update
            edit.norms[layer] = {"delta_w": update.norm(), "w": norm_w, "relative_update": update.norm() / norm_w}
        edit.statistics = {k: v for group, s in self.stats.items() for k, v in s.state(f"stats.{group}").items()}
        edit.status = "applied"
        clock.lap("solve")

    def config(self) -> dict[str, Any]:
        out = super().config()
        return {**out, "stats": self.stats_id} if self.stats_id else out

    def state(self) -> dict[str, torch.Tensor]:
        out = super().state()
        for group, s in self.stats.items():
            out.update(s.state(f"stats.{group}"))
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state(tensors)
        device = model_device(self.model)
        self.stats = {group: LifelongStats.from_state(tensors, f"stats.{group}", device) for group in self.stats}

    def continue_from(self, ledger: Ledger) -> str | None:
        entry = next(
            (e for e in reversed(ledger.active()) if e.get("kind") == "batch" and e.get("method") == self.method),
            None,
        )
        if entry is None:
            return None
        kept = entry.get("statistics", {})
        if kept.get("mode") != self.hp.statistics or not set(self.stats) <= set(kept.get("groups", [])):
            raise UserError(
                f"the ledger's UltraEdit statistics (edit {entry['id']}: {kept.get('mode')} over "
                f"{kept.get('groups')}) do not cover this run's ({self.hp.statistics} over {sorted(self.stats)}); "
                f"continue with edit.ultraedit.statistics={kept.get('mode')} and its layers {entry['layers']}, "
                "or start a new edit.out"
            )
        kept_position = entry.get("hparams", {}).get("ultraedit", {}).get("position", "answer")  # older: answer
        if kept_position != self.hp.position:  # the statistics of one site's rows would normalise the other's
            raise UserError(
                f"the ledger's UltraEdit statistics (edit {entry['id']}) were gathered at the {kept_position} rows, "
                f"this run reads the {self.hp.position} rows; continue with edit.ultraedit.position={kept_position}, "
                "or start a new edit.out"
            )
        tensors = ledger.tensors(entry)
        device = model_device(self.model)
        for group, old in self.stats.items():
            restored = LifelongStats.from_state(tensors, f"stats.{group}", device)
            if restored.mean.shape != old.mean.shape:
                raise UserError(
                    f"the ledger's UltraEdit statistics '{group}' (edit {entry['id']}) have "
                    f"{restored.mean.numel()} features, this model's layers {old.mean.numel()}; start a new edit.out"
                )
            self.stats[group] = restored
        counts = ", ".join(f"{g}: {s.count} rows" for g, s in sorted(self.stats.items()))
        return f"continuing the lifelong normalisation of ledger edit {entry['id']} ({counts})"

    def record(
        self, edit: UltraEditBatch, ledger: Ledger, model_identity: dict[str, str], run: dict[str, Any] | None = None
    ) -> int | None:
        entry = {
            "method": self.method,
            "status": "applied",
            "modules": [self.spec.down_proj_name(layer) for layer in self.layers],
            "conv1d": self.spec.down_proj_conv1d,
            "requests": [r.as_dict() for r in edit.requests],
            "rows": len(edit.features.owner),
            "loss": edit.features.loss,
            "norms": {str(layer): v for layer, v in edit.norms.items()},
            "statistics": {"mode": self.hp.statistics, "groups": sorted(self.stats)},
            "timings": dict(edit.timings),
            "model": model_identity,
            "hparams": {"ultraedit": plain(self.hp)},
            **({"run": run} if run else {}),
            **verification_record(edit.checks, edit.status, edit.reason),
        }
        return ledger.append_low_rank(entry, edit.updates, edit.statistics)

    def info(self, edit: UltraEditBatch) -> dict[str, Any]:
        return {
            "timings": dict(edit.timings),
            "rows": len(edit.features.owner),
            "loss": edit.features.loss,
            "relative_update": {str(layer): n["relative_update"] for layer, n in edit.norms.items()},
        }
