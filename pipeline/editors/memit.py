"""Batch editing on one page: MEMIT (Meng et al. 2023) and AlphaEdit (Fang et al. 2025), no Lightning.

    from rome.pipeline.editors import memit
    result = memit.batch_edit(ctx, requests)      # every request of the batch, one solve per layer

For a batch of n requests and consecutive MLP layers l_1 < ... < l_L (the "layer set"):
1. ``subject_states``: h̄ = the residual stream (block output) of the last layer l_L at the subject's last
   token, averaged over the context templates, for every request.
2. z = h̄ + δ, δ optimised with ROME's loss, one δ per request, all requests in one batch or in
   micro-batches of ``edit.memit.micro_batch`` requests with the same result (auto: as many as a GPU's free
   memory allows, ``value.optimise_values``; ``ValueOptimisation`` with δ added to the block output of l_L).
3. For each layer l_i in ascending order, on the model as edited so far:
   K = the down-projection's input at the subject's last token (averaged over the same templates) [d_ff, n],
   R = (z − h̄_now) / (L − i + 1)  — h̄_now re-read from the partly edited model, averaged like K (the
   original takes it from the bare prompt while K is averaged: the mismatch r-ROME fixed in ROME),
   and ΔW = R · rightᵀ, written in place so later layers see it:
   - MEMIT:     ΔW = R Kᵀ (λC + K Kᵀ)⁻¹, right = C⁻¹K (λI + Kᵀ C⁻¹K)⁻¹ by Woodbury on the cached Cholesky
                factor of C (an n x n solve instead of a d_ff x d_ff one), float64; ENCORE (Gupta et al. 2025)
                adds λ_n I (``norm_constraint``: a penalty λ_n ‖ΔW‖²) and, with ``preserve_edits``, the earlier
                batches' Σ K Kᵀ to λC (then C is factorised again per batch);
   - AlphaEdit: ΔW = R Kᵀ P (K_all K_allᵀ P + α I)⁻¹ with P the projector onto C's null space (eigenvalues
                below a threshold relative to the mean eigenvalue) and K_all K_allᵀ = K Kᵀ + the keys of every
                earlier batch (``preserved``); right = (P B + α I)⁻¹ P K, which lies in P's range, so
                ΔW k = 0 for every key k in C's preserved subspace.
Nothing here keys a cache on the request alone: z is recomputed on the model as it is (the original's z cache
goes stale in sequential runs). Rows are right-padded and indexed by position (no padding side assumed).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rome.pipeline.core.arch import ArchSpec
from rome.pipeline.core.hooks import Trace, get_module
from rome.pipeline.core.padding import right_pad
from rome.pipeline.core.requests import EditRequest
from rome.pipeline.core.timing import Clock, model_device
from rome.pipeline.editors.base import BatchEditor, Edit, Editor, LayerStatistics, register
from rome.pipeline.editors.hparams import BatchHparams, typed
from rome.pipeline.editors.ledger import Ledger
from rome.pipeline.editors.rank_one import KeySolver, LowRank, apply_low_rank, frobenius_norm
from rome.pipeline.editors.value import (
    MicroBatches,
    NormReference,
    ValueOptimisation,
    build_rows,
    check_value_settings,
    norm_anchor,
    optimise_values,
    require_mlp_output,
    subject_rows,
)
from rome.pipeline.editors.verification import verification_record
from rome.pipeline.errors import UserError
from rome.pipeline.stats.second_moment import LayerStats
from rome.pipeline.stats.spectrum import cached_eigendecomposition, null_space_projector, null_space_share

__all__ = [
    "MemitEditor",
    "AlphaEditEditor",
    "BatchResult",
    "batch_edit",
    "begin_batch",
    "finish_batch",
    "BatchEdit",
    "write_targets",
    "subject_states",
    "PromptRows",
    "target_optimisation",
    "micro_batch_setting",
    "subject_values",
    "refuse_mlp_out_norm",
    "anchor_targets",
    "memit_right",
    "alphaedit_right",
    "prepare",
    "METHODS",
]

METHODS = ("memit", "alphaedit")


def prepare(ctx: MemitEditor, stats: dict[int, LayerStats]) -> dict[int, tuple[int, float]]:
    """Factorise each layer's C once for the run (``ctx.solvers``) and, for AlphaEdit, build the null-space
    projectors from C's cached eigendecomposition (``ctx.projectors``); returns each projector's rank and the
    share of C's key energy in its range (``null_space_share``)."""
    device = model_device(ctx.model)
    null_space = {}
    for layer in ctx.layers:
        if ctx.method == "memit" and ctx.hp.memit.preserve_edits:
            ctx.second_moments[layer] = stats[layer].second_moment  # refactorised with the earlier keys per batch
        ctx.solvers[layer] = KeySolver(stats[layer].second_moment, memit_ridge(ctx), device)
        if ctx.method == "alphaedit":
            values, vectors = cached_eigendecomposition(stats[layer], device)
            threshold = float(ctx.hp.alphaedit.nullspace_threshold)
            projector, rank = null_space_projector(values, vectors, threshold)
            ctx.projectors[layer] = projector.to(device)
            null_space[layer] = rank, null_space_share(values, threshold)
    return null_space


@dataclasses.dataclass
class BatchResult:
    requests: list[EditRequest]
    layers: list[int]
    updates: dict[int, LowRank]  # per layer, in W's [d_model, d_ff] orientation
    keys: dict[int, torch.Tensor]  # per layer, [d_ff, n] float64 on the final model (AlphaEdit accumulates them)
    z: torch.Tensor  # [n, d_model] the target residual stream at the last layer
    losses: list[list[float]]  # per request, the loss at every v* step
    p_target: list[float]  # per request, the model's mean P(target) at the last v* step
    residual: list[float]  # mean ‖z − h̄‖ over requests before each layer's update, and after the last
    norms: dict[int, dict[str, float]]  # per layer: ‖ΔW‖, ‖W‖, ‖ΔW‖/‖W‖
    timings: dict[str, float]


@dataclasses.dataclass
class PromptRows:
    """Every request's prompt under every template, tokenised once per batch, with its subject's last token."""

    rows: list[tuple[list[int], int]]
    owner: list[int]  # the request each row belongs to
    n_requests: int

    @classmethod
    def build(cls, ctx: MemitEditor, requests: Sequence[EditRequest]) -> PromptRows:
        rows, owner = [], []
        for i, r in enumerate(requests):
            found = subject_rows(ctx.tokenizer, [t.replace("{}", r.prompt) for t in ctx.templates], r.subject)
            rows += found
            owner += [i] * len(found)
        return cls(rows, owner, len(requests))


@torch.no_grad()
def subject_states(
    ctx: MemitEditor, prompts: PromptRows, key_layers: Sequence[int], out_layer: int | None
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Per request, averaged over the templates, at the subject's last token: the down-projection inputs of
    ``key_layers`` ({layer: [n, d_ff]}) and the block output of ``out_layer`` ([n, d_model]); float32.
    Passes of at most ``hp.memit.rows_per_pass`` rows, each stopped after the deepest module it needs."""
    model, tok, spec = ctx.model, ctx.tokenizer, ctx.spec
    device = model_device(model)
    rows, owner, n = prompts.rows, prompts.owner, prompts.n_requests
    keys = {layer: torch.zeros(n, spec.key_size(model, layer), device=device) for layer in key_layers}
    out = None
    per_pass = int(ctx.hp.memit.rows_per_pass)
    last = max([*key_layers, *([out_layer] if out_layer is not None else [])])
    for start in range(0, len(rows), per_pass):
        chunk = rows[start : start + per_pass]
        ids, mask = right_pad([r for r, _ in chunk], tok.pad_token_id or 0, device)
        with contextlib.ExitStack() as stack:  # the deepest module stops the pass (its Trace ends it quietly)
            traces = [
                stack.enter_context(
                    Trace(
                        get_module(model, spec.down_proj_name(layer)),
                        retain_input=True,
                        stop=out_layer is None and layer == last,
                    )
                )
                for layer in key_layers
            ]
            if out_layer is not None:
                traces.append(
                    stack.enter_context(
                        Trace(get_module(model, spec.block_name(out_layer)), retain_output=True, stop=True)
                    )
                )
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        at = torch.arange(len(chunk), device=device)
        pos = torch.tensor([s for _, s in chunk], device=device)
        who = torch.tensor(owner[start : start + per_pass], device=device)
        for layer, t in zip(key_layers, traces):
            keys[layer].index_add_(0, who, t.input[at, pos].float())
        if out_layer is not None:
            h = traces[-1].output[at, pos].float()
            out = torch.zeros(n, h.shape[-1], device=device) if out is None else out
            out.index_add_(0, who, h)
    n_templates = len(ctx.templates)
    return {layer: k / n_templates for layer, k in keys.items()}, (out / n_templates if out is not None else None)


def target_optimisation(
    ctx: MemitEditor, requests: Sequence[EditRequest], h0: torch.Tensor
) -> ValueOptimisation | MicroBatches:
    """δ for every request at once: added to the last layer's block output at the subject's last token,
    ROME's loss per request, Adam per element (so each request gets what it would get alone), in micro-batches
    of ``ctx.micro_batch`` requests (``edit.memit.micro_batch``; None: by free memory on a GPU) with the
    same result."""
    tok, hp, last = ctx.tokenizer, ctx.hp, ctx.layers[-1]
    rows = [build_rows(tok, ctx.templates, r.prompt, r.subject, r.target_new, list(hp.kl_prompts)) for r in requests]
    module = ctx.spec.block_name(last)
    return optimise_values(
        ctx.model, ctx.spec, module, last, rows, h0, hp.memit.v, tok.pad_token_id or 0, ctx.micro_batch
    )


def micro_batch_setting(value: Any) -> int | None:
    """``edit.memit.micro_batch``: requests per z micro-batch, None for auto (null or ``auto``)."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(
            f"edit.memit.micro_batch={value} must be auto (null: by free GPU memory) or a number of requests >= 1"
        )
    return value


def refuse_mlp_out_norm(name: str, model: nn.Module, spec: ArchSpec, allowed: bool) -> None:
    """MEMIT and AlphaEdit write z − h, a residual-stream shift, as if each edited down-projection's output joined
    the residual stream as it is. Where a norm follows the MLP (Gemma 2/3, OLMo 2: ``ArchSpec.mlp_out_norm``),
    N(d) = g ⊙ d / rms(d) fixes the output's scale and its gains g range widely (Gemma 3 270M, layers 2-6:
    from 0 to 789), so the shift written lands elsewhere, the next layer is asked for more, and the updates grow layer
    by layer. Measured on Gemma 3 270M (docs/many-edits.md): one batch of 100 CounterFact edits moved layer 6 by
    756x its norm and took the held-out perplexity from 16.8 to 1,098. Mapping each layer's share through the
    norm's inverse keeps the weights but does not make the edits take: z's shift lies off what the normed output
    can reach. So the run is refused, unless asked for."""
    if spec.mlp_out_norm is None or allowed:
        return
    model_type = getattr(model.config, "model_type", type(model).__name__)
    raise UserError(
        f"{name} does not edit {model_type} models: their MLP output passes a norm ({spec.mlp_out_norm}) before the "
        "residual stream, and MEMIT's spread of z over the layers assumes it does not (one batch wrecks Gemma 3 "
        "270M: docs/many-edits.md); edit this model with rome or ultraedit, or pass "
        "edit.memit.allow_mlp_out_norm=true to run it anyway"
    )


def memit_ridge(ctx: MemitEditor) -> float:
    """The ridge of C in MEMIT's solve: λC + λ_n I = λ(C + (λ_n/λ) I) with λ_n ENCORE's norm constraint
    (``edit.memit.norm_constraint``, MEMIT only), plus ``edit.ridge``."""
    ridge = float(ctx.hp.ridge)
    if ctx.method == "memit":
        ridge += float(ctx.hp.memit.norm_constraint) / float(ctx.hp.memit.mom2_update_weight)
    return ridge


def memit_solver(ctx: MemitEditor, layer: int) -> KeySolver:
    """C's solver for this batch: the run's, or with ``edit.memit.preserve_edits`` one of
    C + (Σ K Kᵀ of the earlier batches) / λ, so the solve is (λC + λ_n I + Σ K_prev K_prevᵀ + K Kᵀ)⁻¹K."""
    if layer not in ctx.preserved:
        return ctx.solvers[layer]
    preserved = ctx.preserved[layer]
    moment = ctx.second_moments[layer].to(device=preserved.device, dtype=torch.float64)
    return KeySolver(moment + preserved / float(ctx.hp.memit.mom2_update_weight), memit_ridge(ctx), preserved.device)


def memit_right(keys: torch.Tensor, solver: KeySolver, mom2_update_weight: float) -> torch.Tensor:
    """(λC + K Kᵀ)⁻¹ K [d_ff, n] by Woodbury: C⁻¹K (λI + Kᵀ C⁻¹ K)⁻¹ (float64)."""
    c_inv_k = solver.solve(keys)  # [d_ff, n]
    small = mom2_update_weight * torch.eye(keys.shape[1], dtype=torch.float64, device=c_inv_k.device)
    small = small + keys.to(c_inv_k.device).T @ c_inv_k
    return torch.linalg.solve(small, c_inv_k.T).T  # small is symmetric: (C⁻¹K small⁻¹) = (small⁻¹ (C⁻¹K)ᵀ)ᵀ


def alphaedit_right(
    keys: torch.Tensor, projector: torch.Tensor, preserved: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """(P (K Kᵀ + preserved) + α I)⁻¹ P K [d_ff, n] (float64); it lies in P's range."""
    p = projector.to(device=keys.device, dtype=torch.float64)
    b = keys @ keys.T
    if preserved is not None:
        b = b + preserved.to(device=keys.device, dtype=torch.float64)
    system = p @ b
    system.diagonal().add_(alpha)
    return torch.linalg.solve(system, p @ keys)


@dataclasses.dataclass
class BatchEdit(Edit):
    """A batch from ``begin_batch`` on: h̄, the running z optimisation, and once written, its result."""

    requests: list[EditRequest]
    h0: torch.Tensor  # [n, d_model] the last layer's residual stream, averaged over the templates
    result: BatchResult | None = None
    anchor: dict[str, Any] = dataclasses.field(default_factory=dict)  # NAS: the reference, ‖v*‖ as solved


def begin_batch(ctx: MemitEditor, requests: Sequence[EditRequest]) -> BatchEdit:
    """Read h̄ at the last layer for every request and set up their δ optimisation (one batch of rows)."""
    clock = Clock(ctx.model)
    _, h0 = subject_states(ctx, PromptRows.build(ctx, requests), [], ctx.layers[-1])
    opt = target_optimisation(ctx, requests, h0)
    clock.lap("keys")
    return BatchEdit(list(requests), h0, optimisation=opt, timings=clock.timings)


def finish_batch(ctx: MemitEditor, state: BatchEdit) -> BatchResult:
    """z = h̄ + δ once the optimisation is done (δ norm-anchored when the method's ``norm_anchor`` is on),
    written into the layers."""
    delta = state.optimisation.result()
    if ctx.norm_anchor:
        delta = anchor_targets(ctx, state, delta)
    result = write_targets(ctx, state.requests, state.h0 + delta)
    result.losses, result.p_target = state.optimisation.losses, state.optimisation.p_target
    for k, v in result.timings.items():
        state.timings[k] = state.timings.get(k, 0.0) + v
    result.timings = state.timings
    state.result, state.status = result, "applied"
    return result


@torch.no_grad()
def subject_values(ctx: MemitEditor, prompts: PromptRows, layer: int) -> torch.Tensor:
    """v₀ per request: ``layer``'s MLP output (its down-projection's) at the subject's last token, averaged over
    the templates like h̄ ([n, d_model] float32); passes of ``hp.memit.rows_per_pass`` rows, stopped there."""
    model, spec = ctx.model, ctx.spec
    device = model_device(model)
    per_pass = int(ctx.hp.memit.rows_per_pass)
    out = None
    for start in range(0, len(prompts.rows), per_pass):
        chunk = prompts.rows[start : start + per_pass]
        ids, mask = right_pad([r for r, _ in chunk], ctx.tokenizer.pad_token_id or 0, device)
        with Trace(get_module(model, spec.down_proj_name(layer)), retain_output=True, stop=True) as t:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        at = torch.arange(len(chunk), device=device)
        v = t.output[at, torch.tensor([s for _, s in chunk], device=device)].float()
        out = torch.zeros(prompts.n_requests, v.shape[-1], device=device) if out is None else out
        out.index_add_(0, torch.tensor(prompts.owner[start : start + per_pass], device=device), v)
    return out / len(ctx.templates)


def anchor_targets(ctx: MemitEditor, state: BatchEdit, delta: torch.Tensor) -> torch.Tensor:
    """NAS on z (``value.norm_anchor``): z = h̄ + δ = (h̄ − v₀) + v* with v₀ the last layer's MLP output, so
    v* = v₀ + δ is the value NAS rescales; the reference is the first batch's trimmed mean ‖v*‖ as solved (or
    the first batches' until ``edit.nas.reference_values`` are in; docs/edit.md#norm-anchoring-nas). Returns the
    anchored δ'; ``state.anchor`` records the norms."""
    v0 = subject_values(ctx, PromptRows.build(ctx, state.requests), ctx.layers[-1])
    solved = (v0 + delta).norm(dim=-1)
    reference, skip = ctx.norm_reference.update(solved), float(ctx.hp.nas.skip_factor)
    state.anchor = {
        "reference": reference,
        "v_star_solved": solved.tolist(),
        "dropped": int((solved > skip * reference).sum()),
    }
    return norm_anchor(v0, delta, reference, skip)


def batch_edit(ctx: MemitEditor, requests: Sequence[EditRequest]) -> BatchResult:
    """One batch through every phase, in place: z for every request, then one low-rank update per layer."""
    edit = ctx.begin(requests)
    ctx.advance(edit, "verified")
    return edit.result


def write_targets(ctx: MemitEditor, requests: Sequence[EditRequest], z: torch.Tensor) -> BatchResult:
    """Spread z − h̄ over the layer set, ascending, one low-rank update per layer written in place."""
    model, spec, hp, layers = ctx.model, ctx.spec, ctx.hp, ctx.layers
    timings = {"keys": 0.0, "solve": 0.0}
    clock = Clock(model, timings)
    z = z.double()
    prompts = PromptRows.build(ctx, requests)
    updates, norms, residual = {}, {}, []
    for i, layer in enumerate(layers):
        keys, h_now = subject_states(ctx, prompts, [layer], layers[-1])
        k = keys[layer].double().T  # [d_ff, n]
        r = (z - h_now.double()).T  # [d_model, n]
        residual.append(float(r.norm(dim=0).mean()))
        share = r / (len(layers) - i)  # this layer's share of what is still missing
        clock.lap("keys")
        if ctx.method == "memit":
            right = memit_right(k, memit_solver(ctx, layer), float(hp.memit.mom2_update_weight))
        else:
            right = alphaedit_right(k, ctx.projectors[layer], ctx.preserved.get(layer), float(hp.alphaedit.l2))
        update = LowRank(share, right.to(share.device))
        weight = spec.down_proj_weight(model, layer)
        norm_w = frobenius_norm(weight)
        apply_low_rank(weight, update, spec.down_proj_conv1d)
        updates[layer] = update
        norms[layer] = {"delta_w": update.norm(), "w": norm_w, "relative_update": update.norm() / norm_w}
        clock.lap("solve")
    keys, h_end = subject_states(ctx, prompts, layers, layers[-1])  # the final model's keys: AlphaEdit keeps them
    residual.append(float((z - h_end.double()).norm(dim=-1).mean()))
    final_keys = {layer: k.double().T for layer, k in keys.items()}
    if ctx.keeps_keys:
        for layer, k in final_keys.items():
            add = k @ k.T
            ctx.preserved[layer] = add if layer not in ctx.preserved else ctx.preserved[layer] + add
    clock.lap("keys")
    return BatchResult(list(requests), list(layers), updates, final_keys, z.float(), [], [], residual, norms, timings)


@register("memit")
class MemitEditor(BatchEditor):
    """MEMIT: batches of ``edit.batch_size`` requests, one z optimisation and one solve per layer each.
    ``solvers[l]`` factorises C of layer l (+ ENCORE's λ_n/λ); AlphaEdit adds ``projectors[l]`` (P); AlphaEdit
    and MEMIT with ``preserve_edits`` keep ``preserved[l]`` (the Σ K Kᵀ of every earlier batch, updated as
    batches are written). ENCORE (configs/method/encore.yaml) is this editor with MPES, λ_n and
    preserve_edits on."""

    recordable = True

    def __init__(
        self,
        name: str,
        model: nn.Module,
        tokenizer: Any,
        spec: ArchSpec,
        hp: Any,
        layers: Sequence[int],
        templates: list[str],
        batch_size: int,
        stats_id: dict[str, Any] | None = None,
    ) -> None:
        verify = hp.get("verify") if hasattr(hp, "get") else None  # edit.verify (BatchHparams does not hold it)
        super().__init__(name, model, tokenizer, spec, typed(BatchHparams, hp), layers, batch_size, verify=verify)
        self.templates, self.stats_id = templates, stats_id
        self.solvers: dict[int, KeySolver] = {}
        self.projectors: dict[int, torch.Tensor] = {}
        self.preserved: dict[int, torch.Tensor] = {}
        self.second_moments: dict[int, torch.Tensor] = {}  # C per layer, kept for preserve_edits
        self.norm_reference = NormReference(self.hp.nas.reference_values, self.hp.nas.trim)  # NAS (norm_anchor)
        self.micro_batch = micro_batch_setting(self.hp.memit.micro_batch)  # requests per z micro-batch (None: auto)

    @property
    def keeps_keys(self) -> bool:
        """Whether each batch's keys are kept for later batches to preserve (AlphaEdit always; MEMIT with
        ``edit.memit.preserve_edits``): in ``preserved``, in the editor's state and in the ledger."""
        return self.method == "alphaedit" or bool(self.hp.memit.preserve_edits)

    @property
    def norm_anchor(self) -> bool:
        """NAS on z: ``edit.memit.norm_anchor`` for MEMIT, ``edit.alphaedit.norm_anchor`` for AlphaEdit."""
        return bool((self.hp.alphaedit if self.method == "alphaedit" else self.hp.memit).norm_anchor)

    @classmethod
    def from_config(
        cls, name: str, cfg: Any, loaded: Any, conf: Any, statistics: LayerStatistics | None, measure_only: bool
    ) -> Editor:
        from rome.pipeline.editors.settings import method_hparams, templates_for
        from rome.pipeline.stats.store import stats_identity

        if not cfg.edit.layers:
            raise UserError(
                f"{name} needs a layer set: pass edit.layers=[...] (or set edit_layers in the model's file)"
            )
        if statistics is None:
            raise UserError(f"{name} needs C for its layers but no statistics were given")
        hp = method_hparams(cfg, conf, measure_only)
        check_value_settings(hp.memit.v, "edit.memit.v")
        if float(hp.memit.norm_constraint) < 0:
            raise UserError(
                f"edit.memit.norm_constraint={hp.memit.norm_constraint} must be >= 0: ENCORE's λ_n, 0: off "
                "(method encore takes edit.encore.norm_constraint)"
            )
        refuse_mlp_out_norm(name, loaded.model, loaded.spec, bool(hp.memit.allow_mlp_out_norm))
        layers = [loaded.spec.check_layer(loaded.model, layer, "edit.layers") for layer in cfg.edit.layers]
        require_mlp_output(name, loaded.model, loaded.spec, layers)
        micro_batch_setting(hp.memit.micro_batch)  # a bad value is refused before the statistics are computed
        templates = templates_for(cfg, loaded, hp.memit.templates)
        stats = statistics(layers)
        editor = cls(
            name,
            loaded.model,
            loaded.tokenizer,
            loaded.spec,
            hp,
            layers,
            templates,
            int(cfg.edit.batch_size),
            {str(layer): stats_identity(s) for layer, s in stats.items()},
        )
        editor.null_space = prepare(editor, stats)
        return editor

    @property
    def steps(self) -> int:
        return int(self.hp.memit.v.steps)

    def begin(self, requests: Sequence[EditRequest]) -> BatchEdit:
        edit = begin_batch(self, requests)
        self.check_before(edit)
        return edit

    def apply(self, edit: BatchEdit) -> None:
        finish_batch(self, edit)

    def record(
        self, edit: BatchEdit, ledger: Ledger, model_identity: dict[str, str], run: dict[str, Any] | None = None
    ) -> int | None:
        checked = verification_record(edit.checks, edit.status, edit.reason)
        return ledger.append_batch(self, edit.result, model_identity, self.stats_id, run, checked)

    def state(self) -> dict[str, torch.Tensor]:
        kept = {f"preserved.{layer}": k.detach().cpu().clone() for layer, k in self.preserved.items()}
        return {**super().state(), **kept}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state(tensors)
        device = model_device(self.model)
        self.preserved = {
            int(name.split(".")[1]): k.to(device) for name, k in tensors.items() if name.startswith("preserved.")
        }

    def continue_from(self, ledger: Ledger) -> str | None:
        if not self.keeps_keys:
            return None
        device = model_device(self.model)
        earlier = ledger.preserved_keys(self.method)
        self.preserved = {layer: k.to(device) for layer, k in earlier.items() if layer in self.layers}
        if self.preserved:
            name = "AlphaEdit" if self.method == "alphaedit" else "MEMIT"
            return f"preserving the keys of the ledger's earlier {name} batches (layers {sorted(self.preserved)})"
        return None

    def info(self, edit: BatchEdit) -> dict[str, Any]:
        out = {"timings": dict(edit.timings), "residual": edit.result.residual if edit.result else None}
        return {**out, "norm_anchor": edit.anchor} if edit.anchor else out

    def config(self) -> dict[str, Any]:
        out = {**super().config(), "stats": self.stats_id}
        out["hparams"]["memit"].pop("micro_batch", None)  # how the z optimisation is split changes no result
        return out


@register("alphaedit")
class AlphaEditEditor(MemitEditor):
    """AlphaEdit: MEMIT's batches with the update projected onto C's null space and the keys of earlier
    batches (of this run and of the ledger it continues) preserved."""
