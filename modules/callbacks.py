"""Callbacks that turn a finished v* optimisation into an applied, verified and recorded edit.

Order matters and is the list order given to the Trainer: ApplyEdit, VerifyEdit, LedgerCheckpoint.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from pipeline.hooks import get_module
from pipeline.ledger import Ledger
from pipeline.probability import greedy_continuation, target_probs
from pipeline.rank_one import apply_rank_one, rank_one_delta, rank_one_update

from .rome import EditJob, ValueOptimizer


class ApplyEdit(L.Callback):
    """Solve Λ (C⁻¹k*)ᵀ in float64 and write it into the down-projection in its own orientation."""

    def on_train_end(self, trainer: L.Trainer, pl_module: ValueOptimizer) -> None:
        job, spec, model = pl_module.finish(), pl_module.spec, pl_module.model
        t = time.perf_counter()
        weight = spec.down_proj_weight(model, job.layer)
        w = spec.down_proj_matrix(model, job.layer).detach()
        bias = getattr(get_module(model, spec.down_proj_name(job.layer)), "bias", None)
        v_star = job.v0.double() + job.delta.double()  # what the layer should output at k*
        if bias is not None:
            v_star = v_star - bias.detach().double()
        job.edit = rank_one_update(w, job.k_star, v_star, job.second_moment, float(job.hp.ridge))
        job.timings["solve"] = time.perf_counter() - t
        t = time.perf_counter()
        job.backup = weight.detach().clone()
        apply_rank_one(weight, job.edit, spec.down_proj_conv1d)
        job.timings["apply"] = time.perf_counter() - t
        delta_w = rank_one_delta(job.edit)
        job.norms = {
            "delta_w": float(delta_w.norm()), "w": float(w.double().norm()),
            "relative_update": float(delta_w.norm() / job.backup.double().norm()),
            "denominator": job.edit.denominator, "delta": float(job.delta.norm()), "v0": float(job.v0.norm()),
        }
        job.status = "applied"


def prompt_sets(job: EditJob) -> dict[str, list[str]]:
    r = job.request
    return {"prompt": [r.text], "paraphrases": list(r.paraphrases), "neighbours": list(r.neighbours)}


def measure(model: torch.nn.Module, tokenizer: Any, job: EditJob) -> dict[str, dict[str, list[float]]]:
    """P(target_new) and P(target_true) on every prompt set of the request."""
    r, out = job.request, {}
    for name, prompts in prompt_sets(job).items():
        if not prompts:
            continue
        targets = [r.target_new] + ([r.target_true] if r.target_true else [])
        probs = target_probs(model, tokenizer, prompts * len(targets), [t for t in targets for _ in prompts])
        n = len(prompts)
        out[name] = {"new": probs[:n].tolist(), "true": probs[n:].tolist() if r.target_true else []}
    return out


class VerifyEdit(L.Callback):
    """Checks the edit took (P(new) > P(true) on the prompt and paraphrases, P(true) > P(new) on
    neighbours) and is not a disabling edit (‖ΔW‖/‖W‖ and (C⁻¹k*)ᵀk* within limits); rolls back on failure."""

    def __init__(self, tokenizer: Any, generate_tokens: int = 20) -> None:
        self.tokenizer, self.generate_tokens = tokenizer, generate_tokens

    def on_fit_start(self, trainer: L.Trainer, pl_module: ValueOptimizer) -> None:
        job = pl_module.job
        job.probs["pre"] = measure(pl_module.model, self.tokenizer, job)
        if self.generate_tokens:
            job.generations["pre"] = greedy_continuation(pl_module.model, self.tokenizer, job.request.text,
                                                         self.generate_tokens)

    def on_train_end(self, trainer: L.Trainer, pl_module: ValueOptimizer) -> None:
        job, model = pl_module.finish(), pl_module.model
        t = time.perf_counter()
        job.probs["post"] = post = measure(model, self.tokenizer, job)
        if self.generate_tokens:
            job.generations["post"] = greedy_continuation(model, self.tokenizer, job.request.text, self.generate_tokens)
        problems = self.problems(job, post)
        job.timings["verify"] = time.perf_counter() - t
        if problems:
            job.reason = "; ".join(problems)
            if job.hp.verify.rollback:
                with torch.no_grad():
                    pl_module.spec.down_proj_weight(model, job.layer).copy_(job.backup)
                job.status = "rolled_back"
            else:
                job.status = "failed_verification"

    @staticmethod
    def problems(job: EditJob, post: dict[str, dict[str, list[float]]]) -> list[str]:
        v = job.hp.verify
        out = []
        if not v.enabled:
            return out
        if job.norms["relative_update"] > float(v.max_relative_update):
            out.append(f"‖ΔW‖/‖W‖ = {job.norms['relative_update']:.3g} exceeds edit.verify.max_relative_update="
                       f"{v.max_relative_update} (a disabling edit)")
        if job.norms["denominator"] < float(v.min_denominator):
            out.append(f"(C⁻¹k*)ᵀk* = {job.norms['denominator']:.3g} is below edit.verify.min_denominator="
                       f"{v.min_denominator}")
        for name, want_new in (("prompt", True), ("paraphrases", True), ("neighbours", False)):
            p = post.get(name)
            if not p or not p["true"]:
                continue
            bad = [i for i, (n, t) in enumerate(zip(p["new"], p["true"])) if (n > t) != want_new]
            if bad:
                which = "P(new) > P(true)" if want_new else "P(true) > P(new)"
                out.append(f"{which} fails on {len(bad)} of {len(p['new'])} {name}")
        return out


class LedgerCheckpoint(L.Callback):
    """Appends the edit (vectors, norms, probabilities, timings, identities) to the ledger, atomically."""

    def __init__(self, ledger: Ledger, model_identity: dict[str, str]) -> None:
        self.ledger, self.model_identity = ledger, model_identity

    def on_train_end(self, trainer: L.Trainer, pl_module: ValueOptimizer) -> None:
        job = pl_module.finish()
        if job.edit is None:
            return
        job.entry_id = self.ledger.next_id()
        entry = {
            # a failed check without rollback leaves the edit in the weights: it stays "applied"
            "id": job.entry_id, "status": "rolled_back" if job.status == "rolled_back" else "applied",
            "verified": job.status == "applied", "reason": job.reason, "request": job.request.as_dict(), "layer": job.layer,
            "module": pl_module.spec.down_proj_name(job.layer), "conv1d": pl_module.spec.down_proj_conv1d,
            "denominator": job.edit.denominator, "norms": job.norms, "probs": job.probs,
            "generations": job.generations, "losses": job.losses, "timings": job.timings,
            "model": self.model_identity, "stats": job.stats_id,
        }
        self.ledger.append(entry, job.edit)
