"""Recipe: ``python train.py stage=edit request=...`` -- ROME rank-one edits, one request after another.

1. parse and check every request before touching the model;
2. load the model, open the ledger in ``edit.out`` (earlier edits there are re-applied first);
3. C for the edit layer from the statistics cache (computed now when missing), unless C = I;
4. context templates (sampled once per model, cached);
5. per request: k* and v₀ averaged over the templates, v* by a Lightning training loop, then the
   callbacks apply, verify (or roll back) and record the edit; print the before/after table;
6. save the edited model when ``edit.save_to`` is set.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from modules.callbacks import ApplyEdit, LedgerCheckpoint, VerifyEdit
from modules.rome import EditJob, ValueOptimizer
from pipeline.atomic import atomic_dir
from pipeline.errors import UserError
from pipeline.ledger import Ledger
from pipeline.loading import LoadedModel, default_cache_dir
from pipeline.requests import EditRequest, parse_requests
from pipeline.second_moment import StatsCache
from pipeline.templates import context_templates
from pipeline.value import ValueBatch, build_rows, key_and_value

from . import stats as stats_recipe
from .common import loaded_model


def resolve_layer(cfg: DictConfig, loaded: LoadedModel) -> int:
    layer = cfg.edit.layer
    if isinstance(layer, str) and layer == "auto":
        from pipeline.tracing import latest_recommendation

        layer, path = latest_recommendation(cfg.model.cache_dir or default_cache_dir(), loaded.identity)
        print(f"edit.layer=auto: layer {layer}, recommended by the trace stage in {path}")
    if layer is None:
        raise UserError("this model has no default edit layer; pass edit.layer=N (or edit.layer=auto after a trace)")
    return loaded.spec.check_layer(loaded.model, layer, "edit.layer")


def second_moment(cfg: DictConfig, loaded: LoadedModel, layer: int) -> tuple[torch.Tensor | None, dict | None]:
    """C for ``layer`` and the identity of the statistics it came from (None, None for C = I)."""
    if not cfg.edit.mom2_adjustment:
        return None, None
    module = loaded.spec.down_proj_name(layer)
    if cfg.edit.stats:
        return _explicit_stats(Path(cfg.edit.stats), loaded, layer, module)
    stats = stats_recipe.collect(cfg, loaded, [layer])[layer]
    return stats.second_moment, {"file": str(stats.path), "tokens": stats.count}


def _explicit_stats(directory: Path, loaded: LoadedModel, layer: int, module: str):
    import json

    manifest = directory / "manifest.json"
    if not manifest.exists():
        raise UserError(f"edit.stats={directory} has no manifest.json; point it at a directory the stats stage wrote")
    key = json.loads(manifest.read_text())["key"]
    if key["model"] != loaded.identity:
        raise UserError(f"statistics in {directory} are for model {key['model']['name']} ({key['model']['revision']}), "
                        f"not {loaded.identity['name']} ({loaded.identity['revision']}); run stage=stats for this model")
    from pipeline.second_moment import StatsKey

    stats = StatsCache(directory.parent).load(StatsKey(**key), layer, module)
    if stats is None:
        raise UserError(f"edit.stats={directory} has no statistics for layer {layer}")
    return stats.second_moment, {"file": str(stats.path), "tokens": stats.count}


def edit_one(loaded: LoadedModel, request: EditRequest, layer: int, templates: list[str],
             second_moment: torch.Tensor | None, hp: Any, ledger: Ledger | None, stats_id: dict | None = None,
             accelerator: str = "auto", verbose: bool = True, templates_seconds: float = 0.0) -> EditJob:
    """One ROME edit of ``loaded.model`` in place (or rolled back); the reusable core of the stage."""
    model, tok, spec = loaded.model, loaded.tokenizer, loaded.spec
    timings = {"templates": templates_seconds}  # sampled once per model; charged to the first edit
    t = time.perf_counter()
    k_star, v0 = key_and_value(model, tok, spec, layer, templates, request.prompt, request.subject)
    rows = build_rows(tok, templates, request.prompt, request.subject, request.target_new, list(hp.kl_prompts))
    batch = ValueBatch.build(model, rows, tok.pad_token_id or 0)
    timings["keys"] = time.perf_counter() - t
    job = EditJob(request, layer, k_star, v0, second_moment, hp, stats_id=stats_id, timings=timings)
    callbacks = [ApplyEdit(), VerifyEdit(tok, int(hp.generate_tokens))]
    if ledger is not None:
        callbacks.append(LedgerCheckpoint(ledger, loaded.identity))
    device = next(model.parameters()).device  # cuda:k under a multi-GPU eval: the inner Trainer must use k too
    trainer = L.Trainer(max_epochs=1, accelerator=accelerator, devices=[device.index] if device.type == "cuda" else 1,
                        logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=verbose, inference_mode=False,
                        num_sanity_val_steps=0, callbacks=callbacks)
    module = ValueOptimizer(model, spec, job, batch, tok)
    trainer.fit(module)
    model.to(device)  # Lightning's Strategy.teardown moves the LightningModule, and so the model, to the CPU
    model.requires_grad_(False).eval()
    return job


def _fmt(p: list[float]) -> str:
    return ", ".join(f"{x:.4f}" for x in p) if p else "-"


def print_table(job: EditJob) -> None:
    r = job.request
    pre, post = job.probs.get("pre", {}), job.probs.get("post", {})
    print(f"\n[{job.entry_id or '-'}] {r.text} -> {r.target_new}" + (f" (was {r.target_true})" if r.target_true else ""))
    print(f"  {'prompts':<12} {'P(true) before':>15} {'P(true) after':>15} {'P(new) before':>15} {'P(new) after':>15}")
    for name in ("prompt", "paraphrases", "neighbours"):
        if name in pre:
            b, a = pre[name], post.get(name, {"new": [], "true": []})
            print(f"  {name:<12} {_fmt(b['true']):>15} {_fmt(a['true']):>15} {_fmt(b['new']):>15} {_fmt(a['new']):>15}")
    if job.generations:
        print(f"  before: {r.text}{job.generations.get('pre', '')!r}")
        print(f"  after:  {r.text}{job.generations.get('post', '')!r}")
    t = job.timings
    print("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()) + f" | ‖ΔW‖/‖W‖ {job.norms.get('relative_update', 0):.3g}"
          f" | status: {job.status}" + (f" ({job.reason})" if job.reason else ""))


def save_model(loaded: LoadedModel, directory: str | Path) -> None:
    with atomic_dir(directory) as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)


def run(cfg: DictConfig) -> list[EditJob]:
    requests = parse_requests(cfg.request)  # every request checked before the model is touched
    loaded = loaded_model(cfg)
    layer = resolve_layer(cfg, loaded)
    ledger = Ledger.open(cfg.edit.out, loaded.identity, cfg.model.dtype)
    if ledger.active():
        print(f"re-applying {ledger.rebuild(loaded.model, loaded.spec)} earlier edit(s) from {ledger.dir}")
    c, stats_id = second_moment(cfg, loaded, layer)
    t = time.perf_counter()
    templates = context_templates(loaded.model, loaded.tokenizer, loaded.identity, cfg.edit.templates,
                                  Path(cfg.model.cache_dir or default_cache_dir()), seed=int(cfg.seed))
    t_templates = time.perf_counter() - t
    accelerator = "gpu" if next(loaded.model.parameters()).is_cuda else "cpu"
    jobs = []
    for request in requests:
        torch.manual_seed(cfg.seed)
        job = edit_one(loaded, request, layer, templates, c, cfg.edit, ledger, stats_id, accelerator,
                       templates_seconds=t_templates)
        t_templates = 0.0
        print_table(job)
        jobs.append(job)
    if cfg.edit.save_to:
        save_model(loaded, cfg.edit.save_to)
        ledger.data["saved_to"] = str(Path(cfg.edit.save_to).resolve())
        ledger.save()
        print(f"edited model saved to {cfg.edit.save_to}")
    print(f"ledger: {ledger.dir / 'ledger.json'} ({len(ledger.active())} active edit(s))")
    failed = [j for j in jobs if j.status != "applied"]
    if failed:
        raise UserError(f"{len(failed)} of {len(jobs)} edit(s) failed verification: {failed[0].reason}")
    return jobs
