"""ROME on one page: one rank-one edit of an MLP down-projection, as plain functions (no Lightning).

    from rome.pipeline.editors import rome
    result = rome.edit(model, tokenizer, {"prompt": "{} is located in the city of",
                                          "subject": "The Eiffel Tower", "target_new": "Rome"}, layer=6)
    result.update.u, result.update.lam     # ΔW = Λ uᵀ (float64), applied to the model in place
    result.probs["post"], result.timings, result.status

The down-projection W of layer l is a key-value memory: keys k (its input, d_ff) map to values W k.
1. ``begin``:   k* = the key at the subject's last token and v₀ = the current value there, both averaged
                over the context templates; the pre-edit probabilities (for verification); the v*
                optimisation, set up (rows, prefix KV cache, δ = 0).
2. ``ValueOptimisation.step`` until done: v* = v₀ + δ makes the model predict the new object.
3. ``apply_edit``: the closed-form update W' = W + Λ (C⁻¹k*)ᵀ with Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*),
                solved in float64 (``KeySolver``: one Cholesky factor of C per layer), written in place.
4. ``verify_edit``: the post-edit probabilities, the checks (the model now says the new object on the
                prompt: ``pipeline/editors/verification.py``; P(new) > P(true) on the prompt and its
                paraphrases, neighbours kept their answer, no disabling edit), rollback on failure.
``RomeEditor`` is these phases behind the editor interface (``pipeline/editors/base.py``); ``edit`` builds one
for a single request. The edit stage's Lightning loop and callbacks drive the same editor.
Nothing here moves or copies the model: its parameters stay where they are, in their dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from rome.pipeline.core.arch import ArchSpec, arch_for
from rome.pipeline.core.hooks import Trace, get_module
from rome.pipeline.core.padding import right_pad
from rome.pipeline.core.probability import greedy_continuation
from rome.pipeline.core.requests import EditRequest, request_from_record
from rome.pipeline.core.timing import Clock, model_device
from rome.pipeline.editors.base import Edit, Editor, LayerStatistics, register
from rome.pipeline.editors.hparams import RomeHparams, typed
from rome.pipeline.editors.ledger import Ledger
from rome.pipeline.editors.rank_one import (
    KeySolver,
    RankOne,
    apply_rank_one,
    frobenius_norm,
    rank_one_update,
    update_norm,
)
from rome.pipeline.editors.value import (
    NormReference,
    ValueBatch,
    ValueOptimisation,
    build_rows,
    check_value_settings,
    norm_anchor,
    require_mlp_output,
    subject_rows,
)
from rome.pipeline.editors.verification import (
    answer_length,
    chat_form,
    check_settings,
    knowledge,
    measure,
    on_prompt,
    replies,
    said,
    took_problem,
    with_own_answer,
)
from rome.pipeline.errors import UserError
from rome.pipeline.evaluation.generative import continuation

__all__ = [
    "RomeEditor",
    "EditResult",
    "edit",
    "begin",
    "apply_edit",
    "verify_edit",
    "key_and_value",
    "keys_and_values",
    "KEY_VARIANTS",
    "measure",
    "verification_problems",
    "ledger_entry",
]


@dataclasses.dataclass
class EditResult(Edit):
    """One ROME edit: its key and value, the update, and what verification measured."""

    request: EditRequest
    layer: int
    module: str
    k_star: torch.Tensor  # [d_ff] float32: the key v* is written at (averaged over the templates by default)
    v0: torch.Tensor  # [d_model] float32: the value the optimisation starts from (v* = v₀ + δ)
    k_direction: (
        torch.Tensor
    )  # [d_ff] float32: the template-averaged key; the update's direction is u = C⁻¹ k_direction
    delta: torch.Tensor | None = None  # [d_model]: v* = v₀ + δ (set when the optimisation ends)
    losses: list[float] = dataclasses.field(default_factory=list)  # the loss at every v* step
    p_target: float = 0.0  # the model's mean P(target) over the rewriting prompts at the last step
    update: RankOne | None = None
    backup: torch.Tensor | None = None  # the weight before the update (kept only when a rollback may need it)
    norms: dict[str, float] = dataclasses.field(default_factory=dict)
    probs: dict[str, Any] = dataclasses.field(default_factory=dict)  # {"pre": ..., "post": ...}
    generations: dict[str, str] = dataclasses.field(default_factory=dict)
    true_from_model: bool = False  # target_true is the model's own pre-edit answer (none was given)
    anchor: dict[str, float] = dataclasses.field(default_factory=dict)  # NAS: ‖v*‖ as solved, the reference

    @property
    def requests(self) -> list[EditRequest]:
        return [self.request]

    def finish_value(self) -> None:
        """Take δ, the losses and P(target) from the finished optimisation."""
        opt = self.optimisation
        self.delta, self.losses, self.p_target = opt.result()[0], opt.losses[0], opt.p_target[0]

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        """The edit stage's report of this edit: P(true) and P(new) before and after on the prompt, paraphrases
        and neighbours, the greedy continuation before and after, warnings, the time of each phase, the status."""
        r = self.request
        pre, post = self.probs.get("pre", {}), self.probs.get("post", {})
        own = ", the model’s own answer" if self.true_from_model else ""
        was = f" (was {r.target_true}{own})" if r.target_true else ""
        after = "after" if self.status != "rolled_back" else "rolled back"
        lines = [f"[{self.entry_id or '-'}] {r.text} -> {r.target_new}{was}"]
        lines += [f"  {w}" for w in self.warnings]
        lines.append(
            f"  {'prompts':<12} {'P(true) before':>15} {'P(true) ' + after:>15} "
            f"{'P(new) before':>15} {'P(new) ' + after:>15}"
        )
        for name in ("prompt", "paraphrases", "neighbours"):
            if name in pre:
                b, a = pre[name], post.get(name, {"new": [], "true": []})
                cells = (_fmt(b["true"]), _fmt(a["true"]), _fmt(b["new"]), _fmt(a["new"]))
                lines.append(f"  {name:<12} " + " ".join(f"{c:>15}" for c in cells))
        if self.status == "rolled_back" and self.probs.get("rejected", {}).get("prompt"):
            rej = self.probs["rejected"]["prompt"]
            lines.append(
                f"  the rejected edit gave P(true) {_fmt(rej['true'])}, P(new) {_fmt(rej['new'])} on the prompt; "
                "the model above is the restored one"
            )
        if self.generations:
            lines.append(f"  before: {r.text}{self.generations.get('pre', '')!r}")
            lines.append(f"  {after + ':':<7} {r.text}{self.generations.get('post', '')!r}")
        elif self.checks and self.checks[0].get("said_after") is not None:
            lines.append(f"  says after the edit: {r.text}{' ' + self.checks[0]['said_after']!r}")
        if self.checks and self.checks[0].get("said_in_chat") is not None:
            whose = "the rejected edit, asked through the" if self.status == "rolled_back" else "asked through its"
            lines.append(f"  {whose} chat template: {self.checks[0]['said_in_chat']!r}")
        t = self.timings
        lines.append(
            "  time: "
            + ", ".join(f"{k} {v:.2f}s" for k, v in t.items())
            + f" | ‖ΔW‖/‖W‖ {self.norms.get('relative_update', 0):.3g}"
            f" | status: {self.status}" + (f" ({self.reason})" if self.reason else "")
        )
        return "\n".join(lines)


def _fmt(p: list[float]) -> str:
    return ", ".join(f"{x:.4f}" for x in p) if p else "-"


# ---------------------------------------------------------------------------------------------- keys


KEY_VARIANTS = {
    # name: (key v* is written at, value the optimisation starts from); u = C⁻¹ (template-averaged key) in all
    "averaged": ("averaged", "averaged"),  # both over the same templates: W'k̄ = v̄ + δ, no key/value mismatch
    "rrome": ("averaged", "bare"),  # r-ROME (Gupta et al. 2024): the averaged key, the bare prompt's value
    "original": ("bare", "bare"),  # ROME's release: the bare prompt's key and value for Λ
}


@torch.no_grad()
def keys_and_values(
    model: nn.Module, tokenizer: Any, spec: ArchSpec, layer: int, templates: list[str], prompt: str, subject: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The down-projection's input and output at the subject's last token under every template ([templates,
    d_ff] and [templates, d_model], float32): one batched pass in the model's dtype that stops after the layer."""
    device = model_device(model)
    rows = subject_rows(tokenizer, [t.replace("{}", prompt) for t in templates], subject)
    ids, mask = right_pad([r for r, _ in rows], tokenizer.pad_token_id or 0, device)
    with Trace(get_module(model, spec.down_proj_name(layer)), retain_input=True, retain_output=True, stop=True) as t:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    idx = torch.tensor([s for _, s in rows], device=device)
    at = torch.arange(len(rows), device=device)
    return t.input[at, idx].float(), t.output[at, idx].float()


def key_and_value(
    model: nn.Module,
    tokenizer: Any,
    spec: ArchSpec,
    layer: int,
    templates: list[str],
    prompt: str,
    subject: str,
    variant: str = "averaged",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k*, v₀ and the direction key for ``variant`` (``KEY_VARIANTS``); "bare" is template 0, ``"{}"``."""
    keys, values = keys_and_values(model, tokenizer, spec, layer, templates, prompt, subject)
    if variant not in KEY_VARIANTS:
        raise UserError(f"edit.variant={variant} is not one of {', '.join(KEY_VARIANTS)}")
    key_from, value_from = KEY_VARIANTS[variant]
    if "bare" in (key_from, value_from) and templates[0] != "{}":
        raise UserError(f"edit.variant={variant} needs the bare prompt as the first context template ('{{}}')")
    pick = {"averaged": lambda x: x.mean(0), "bare": lambda x: x[0]}
    return pick[key_from](keys), pick[value_from](values), keys.mean(0)


# ----------------------------------------------------------------------------------------- measuring


def verification_problems(result: EditResult, post: Mapping[str, Mapping[str, list[float]]], verify: Any) -> list[str]:
    """Why an applied edit fails its checks (empty: it passes)."""
    out = []
    if not verify.enabled:
        return out
    if result.norms["relative_update"] > float(verify.max_relative_update):
        out.append(
            f"‖ΔW‖/‖W‖ = {result.norms['relative_update']:.3g} exceeds edit.verify.max_relative_update="
            f"{verify.max_relative_update} (a disabling edit)"
        )
    if result.norms["denominator"] < float(verify.min_denominator):
        out.append(
            f"(C⁻¹k*)ᵀk* = {result.norms['denominator']:.3g} is below edit.verify.min_denominator="
            f"{verify.min_denominator}"
        )
    for name, want_new in (("prompt", True), ("paraphrases", True), ("neighbours", False)):
        p = post.get(name)
        if not p or not p["true"]:
            continue
        bad = [i for i, (n, t) in enumerate(zip(p["new"], p["true"])) if (n > t) != want_new]
        if bad:
            which = "P(new) > P(true)" if want_new else "P(true) > P(new)"
            out.append(f"{which} fails on {len(bad)} of {len(p['new'])} {name}")
    return out


# ------------------------------------------------------------------------------------------- phases


def begin(ctx: RomeEditor, request: EditRequest) -> EditResult:
    """Measure the unedited model (when verifying), compute k* and v₀, and set up the v* optimisation.

    Verification compares P(new) with P(true): without a ``target_true`` the model's own pre-edit answer
    stands in for it (recorded as ``true_from_model``), so an edit that leaves the old answer in place fails.
    A given ``target_true`` the model does not predict is a warning (``verification.knowledge``)."""
    model, tok, hp = ctx.model, ctx.tokenizer, ctx.hp
    timings: dict[str, float] = {}
    clock = Clock(model, timings)
    probs, generations, true_from_model, checks = {}, {}, False, []
    if hp.verify.enabled:
        own = with_own_answer(model, tok, request, hp.verify)
        if own is not None:
            request, true_from_model = own, True
        probs["pre"] = measure(model, tok, request, int(hp.verify.batch_size))
        check = {"p_before": on_prompt(probs["pre"])}
        if true_from_model:  # the model's own answer: known by construction
            check.update(known=True, said_before=request.target_true, warning=None)
        else:
            check.update(knowledge(model, tok, request, check["p_before"]["true"]))
        checks.append(check)
    if int(hp.generate_tokens):
        generations["pre"] = greedy_continuation(model, tok, request.text, int(hp.generate_tokens))
    clock.lap("pre")
    k_star, v0, k_direction = key_and_value(
        model, tok, ctx.spec, ctx.layer, ctx.templates, request.prompt, request.subject, str(hp.variant)
    )
    rows = build_rows(tok, ctx.templates, request.prompt, request.subject, request.target_new, list(hp.kl_prompts))
    batch = ValueBatch.build(model, ctx.spec, [rows], tok.pad_token_id or 0)
    opt = ValueOptimisation(model, ctx.spec, ctx.spec.mlp_name(ctx.layer), batch, v0[None], hp.v)
    clock.lap("keys")
    return EditResult(
        request,
        ctx.layer,
        ctx.module,
        k_star,
        v0,
        k_direction,
        optimisation=opt,
        probs=probs,
        generations=generations,
        timings=timings,
        true_from_model=true_from_model,
        checks=checks,
    )


def anchor_value(ctx: RomeEditor, result: EditResult) -> None:
    """NAS (``edit.v.norm_anchor``): v* = v₀ + δ rescaled to the reference norm (``value.norm_anchor``), the
    reference being the trimmed mean ‖v*‖ as solved over the first ``edit.nas.reference_values`` edits (1: the
    first edit's alone; docs/edit.md#norm-anchoring-nas: how it differs from NAS's)."""
    solved = (result.v0 + result.delta).norm()
    reference, skip = ctx.norm_reference.update(solved[None]), float(ctx.hp.nas.skip_factor)
    result.delta = norm_anchor(result.v0[None], result.delta[None], reference, skip)[0]
    result.anchor = {"v_star_solved": float(solved), "anchor_reference": reference}


def apply_edit(ctx: RomeEditor, result: EditResult) -> None:
    """Solve Λ (C⁻¹k*)ᵀ in float64 and add it to the down-projection in place, in its own orientation."""
    clock = Clock(ctx.model, result.timings)
    weight = ctx.spec.down_proj_weight(ctx.model, ctx.layer)
    bias = getattr(get_module(ctx.model, ctx.module), "bias", None)
    v_star = result.v0.double() + result.delta.double()  # what the layer should output at k*
    if bias is not None:
        v_star = v_star - bias.detach().double()
    w = ctx.spec.down_proj_matrix(ctx.model, ctx.layer).detach()
    result.update = rank_one_update(w, result.k_star, v_star, ctx.solver, result.k_direction)
    clock.lap("solve")
    norm_w = frobenius_norm(weight)
    if ctx.hp.verify.enabled and ctx.hp.verify.rollback:  # only a rollback needs the old matrix
        result.backup = weight.detach().clone()
    apply_rank_one(weight, result.update, ctx.spec.down_proj_conv1d)
    result.norms = {
        "delta_w": update_norm(result.update),
        "w": norm_w,
        "relative_update": update_norm(result.update) / norm_w,
        "denominator": result.update.denominator,
        "delta": float(result.delta.norm()),
        "v0": float(result.v0.norm()),
        **result.anchor,
    }
    result.status = "applied"
    clock.lap("apply")


def verify_edit(ctx: RomeEditor, result: EditResult) -> None:
    """Measure the edited model; roll the edit back (``edit.verify.rollback``) when a check fails: the model
    does not say the new object on the prompt (``verification.took_problem``), or one of
    ``verification_problems``."""
    model, tok, hp = ctx.model, ctx.tokenizer, ctx.hp
    clock = Clock(model, result.timings)
    request = result.request
    if hp.verify.enabled:
        result.probs["post"] = measure(model, tok, request, int(hp.verify.batch_size))
    if int(hp.generate_tokens):
        result.generations["post"] = greedy_continuation(model, tok, request.text, int(hp.generate_tokens))
    problems = verification_problems(result, result.probs.get("post", {}), hp.verify)
    if hp.verify.enabled:
        text = None
        if hp.verify.generative:
            length = answer_length(tok, request.target_new, hp.verify)
            text = (  # greedy: a longer continuation starts with the shorter one, so the shown one serves
                continuation(result.generations["post"])
                if int(hp.generate_tokens) >= length
                else said(model, tok, [request.text], length, 1)[0]
            )
        after = on_prompt(result.probs["post"])
        reply = replies(model, tok, [request], hp.verify, chat_form(hp.verify, tok))[0]
        problem = took_problem(request.target_new, text, after["new"], hp.verify, reply, request.text)
        if not result.checks:  # begun elsewhere (the latency benchmark's reference loop): no pre-edit check
            result.checks.append({})
        result.checks[0].update(p_after=after, said_after=text, took=problem is None)
        if reply is not None:
            result.checks[0]["said_in_chat"] = reply
        problems = ([problem] if problem else []) + problems
    if problems:
        result.reason = "; ".join(problems)
        if hp.verify.rollback:
            with torch.no_grad():
                ctx.spec.down_proj_weight(model, ctx.layer).copy_(result.backup)
            result.status = "rolled_back"
            # the model is bitwise the unedited one again: its numbers are the pre-edit ones
            result.probs["rejected"] = result.probs.get("post", {})
            if "pre" in result.probs:
                result.probs["post"] = result.probs["pre"]
            if "pre" in result.generations:
                result.generations["rejected"] = result.generations.get("post", "")
                result.generations["post"] = result.generations["pre"]
        else:
            result.status = "failed_verification"
    clock.lap("verify")


# ----------------------------------------------------------------------------------------- the editor


def ledger_entry(ctx: RomeEditor, result: EditResult, model_identity: dict[str, str]) -> dict[str, Any]:
    """The ledger's record of one edit (the factors go into its file: ``Ledger.append``)."""
    return {
        # a failed check without rollback leaves the edit in the weights: it stays "applied"
        "status": "rolled_back" if result.status == "rolled_back" else "applied",
        "verified": result.status == "applied",
        "reason": result.reason,
        "request": result.request.as_dict(),
        "true_from_model": result.true_from_model,
        "checks": result.checks,  # known before, what the model says after, whether the edit took
        "warnings": result.warnings,
        "layer": result.layer,
        "module": result.module,
        "conv1d": ctx.spec.down_proj_conv1d,
        "denominator": result.update.denominator,
        "norms": result.norms,
        "probs": result.probs,
        "generations": result.generations,
        "losses": result.losses,
        "timings": result.timings,
        "model": model_identity,
        "stats": ctx.stats_id,
    }


@register("rome")
class RomeEditor(Editor):
    """ROME: one rank-one update of one layer's down-projection per request (the phases above)."""

    recordable = True

    def __init__(
        self,
        name: str,
        model: nn.Module,
        tokenizer: Any,
        spec: ArchSpec,
        hp: Any,
        layer: int,
        templates: list[str],
        solver: KeySolver,
        stats_id: dict[str, Any] | None = None,
    ) -> None:
        hp = typed(RomeHparams, OmegaConf.merge(hp, {"layer": layer}))
        if hp.verify.enabled:
            check_settings(hp.verify, tokenizer)
        super().__init__(name, model, tokenizer, spec, hp, [layer])
        self.layer, self.templates, self.solver, self.stats_id = layer, templates, solver, stats_id
        self.norm_reference = NormReference(hp.nas.reference_values, hp.nas.trim)  # NAS (edit.v.norm_anchor)

    @classmethod
    def from_config(
        cls, name: str, cfg: Any, loaded: Any, conf: Any, statistics: LayerStatistics | None, measure_only: bool
    ) -> Editor:
        from rome.pipeline.editors.settings import edit_layer, method_hparams, templates_for
        from rome.pipeline.stats.store import stats_identity

        hp = method_hparams(cfg, conf, measure_only)
        check_value_settings(hp.v, "edit.v")
        layer = (
            edit_layer(cfg, loaded)
            if conf.get("layer") is None
            else loaded.spec.check_layer(loaded.model, conf.layer, f"method.{name}.layer")
        )
        require_mlp_output(name, loaded.model, loaded.spec, [layer])
        c, stats_id = None, None
        if hp.mom2_adjustment:
            if statistics is None:
                raise UserError(
                    f"{name} needs C for layer {layer} (mom2_adjustment is on) but no statistics were given"
                )
            stats = statistics([layer])[layer]
            c, stats_id = stats.second_moment, stats_identity(stats)
        solver = KeySolver(c, float(hp.ridge), model_device(loaded.model))
        templates = templates_for(cfg, loaded, hp.templates)
        return cls(name, loaded.model, loaded.tokenizer, loaded.spec, hp, layer, templates, solver, stats_id)

    @property
    def module(self) -> str:
        return self.spec.down_proj_name(self.layer)

    @property
    def steps(self) -> int:
        return int(self.hp.v.steps)

    def begin(self, requests: Sequence[EditRequest]) -> EditResult:
        (request,) = requests
        return begin(self, request)

    def conclude(self, edit: EditResult) -> None:
        edit.finish_value()
        if self.hp.v.norm_anchor:
            anchor_value(self, edit)
        super().conclude(edit)

    def apply(self, edit: EditResult) -> None:
        apply_edit(self, edit)

    def verify(self, edit: EditResult) -> None:
        verify_edit(self, edit)

    def record(
        self, edit: EditResult, ledger: Ledger, model_identity: dict[str, str], run: dict[str, Any] | None = None
    ) -> int | None:
        if edit.update is None:
            return None
        entry = ledger_entry(self, edit, model_identity)
        if run is not None:
            entry["run"] = run
        return ledger.append(entry, edit.update)

    def info(self, edit: EditResult) -> dict[str, Any]:
        return {
            "timings": dict(edit.timings),
            "steps": len(edit.losses),
            "loss": [edit.losses[0], edit.losses[-1]] if edit.losses else [],
            "relative_update": edit.norms.get("relative_update"),
            "denominator": edit.norms.get("denominator"),
        }

    def config(self) -> dict[str, Any]:
        return {**super().config(), "stats": self.stats_id}


def edit(
    model: nn.Module,
    tokenizer: Any,
    request: EditRequest | Mapping[str, Any],
    *,
    layer: int | None = None,
    second_moment: torch.Tensor | KeySolver | None = None,
    hparams: Any = None,
    templates: list[str] | None = None,
    spec: ArchSpec | None = None,
    seed: int = 0,
    on_step: Callable[[EditResult], None] | None = None,
) -> EditResult:
    """One ROME edit of ``model`` in place (rolled back if verification fails and rollback is on).

    ``request``: an ``EditRequest`` or a mapping (``prompt`` with ``{}`` or the subject, ``subject``,
    ``target_new``, optional ``target_true``, ``paraphrases``, ``neighbours``; CounterFact records too).
    ``layer``: the edited layer (default: the model family's, from ``configs/model/``).
    ``second_moment``: C = E[k kᵀ] of the layer's keys ([d_ff, d_ff], e.g. ``layer_<l>.safetensors`` from
    ``python train.py stage=stats``), or a ``KeySolver`` to reuse one factorisation over many edits;
    None is C = I (no covariance adjustment).
    ``hparams``: the ``edit`` config group (default: ``configs/``, see ``pipeline.editors.settings.edit_defaults``).
    ``templates``: context templates (default: sampled from the model with ``seed``).
    Returns the ``EditResult``: the update's factors (u, Λ), k*, v₀, δ, probabilities, timings, status.
    """
    from rome.pipeline.editors.settings import edit_defaults
    from rome.pipeline.editors.templates import context_templates

    if not isinstance(request, EditRequest):
        request = request_from_record(dict(request))
    hp = hparams if hparams is not None else edit_defaults(model)
    spec = spec or arch_for(model)
    layer = int(hp.layer if layer is None else layer)
    spec.check_layer(model, layer, "layer")
    timings: dict[str, float] = {}
    if templates is None:
        clock = Clock(model, timings)
        torch.manual_seed(seed)
        templates = context_templates(model, tokenizer, None, hp.templates, None, seed=seed)
        clock.lap("templates")
    solver = (
        second_moment
        if isinstance(second_moment, KeySolver)
        else KeySolver(second_moment, float(hp.ridge), model_device(model))
    )
    (result,) = RomeEditor("rome", model, tokenizer, spec, hp, layer, templates, solver).edit([request], on_step)
    result.timings = {**timings, **result.timings}
    return result
