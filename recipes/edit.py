"""Recipe: ``python train.py stage=edit request=...`` -- ROME rank-one edits, one request after another.

1. parse and check every request before touching the model;
2. load the model, open the ledger in ``edit.out`` (earlier edits there are re-applied first);
3. C for the edit layer from the statistics cache (computed now when missing), unless C = I, factorised once;
4. context templates (sampled once per model, cached);
5. one Trainer, one ``fit``: per request, k* and v₀ averaged over the templates and v* by the
   ``ValueOptimizer`` loop; the callbacks apply, verify (or roll back) and record each edit;
6. print the before/after table of every edit; save the edited model when ``edit.save_to`` is set.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from modules.batch import BatchLedger, BatchProgress, TargetOptimizer, WriteBatch
from modules.callbacks import ApplyEdit, EditProgress, LedgerCheckpoint, VerifyEdit
from modules.rome import ValueOptimizer
from modules.statistics import collect, second_moment
from modules.trainer import single_device_trainer
from pipeline import memit, rome
from pipeline.config import cache_root, edit_layer
from pipeline.errors import UserError
from pipeline.ledger import Ledger
from pipeline.loading import load_configured
from pipeline.rank_one import KeySolver
from pipeline.requests import parse_requests
from pipeline.saving import save_model
from pipeline.statistics import stats_identity
from pipeline.templates import context_templates


def _save_and_report(cfg: DictConfig, loaded, ledger: Ledger) -> None:
    if cfg.edit.save_to:
        save_model(loaded, cfg.edit.save_to)
        ledger.data["saved_to"] = str(Path(cfg.edit.save_to).resolve())
        ledger.save()
        print(f"edited model saved to {cfg.edit.save_to}")
    print(f"ledger: {ledger.dir / 'ledger.json'} ({len(ledger.active())} active edit(s))")


def _fmt(p: list[float]) -> str:
    return ", ".join(f"{x:.4f}" for x in p) if p else "-"


def print_table(result: rome.EditResult) -> None:
    r = result.request
    pre, post = result.probs.get("pre", {}), result.probs.get("post", {})
    was = f" (was {r.target_true}{', the model’s own answer' if result.true_from_model else ''})" if r.target_true else ""
    print(f"\n[{result.entry_id or '-'}] {r.text} -> {r.target_new}{was}")
    after = "after" if result.status != "rolled_back" else "rolled back"
    print(f"  {'prompts':<12} {'P(true) before':>15} {'P(true) ' + after:>15} {'P(new) before':>15} {'P(new) ' + after:>15}")
    for name in ("prompt", "paraphrases", "neighbours"):
        if name in pre:
            b, a = pre[name], post.get(name, {"new": [], "true": []})
            print(f"  {name:<12} {_fmt(b['true']):>15} {_fmt(a['true']):>15} {_fmt(b['new']):>15} {_fmt(a['new']):>15}")
    if result.status == "rolled_back" and result.probs.get("rejected", {}).get("prompt"):
        rej = result.probs["rejected"]["prompt"]
        print(f"  the rejected edit gave P(true) {_fmt(rej['true'])}, P(new) {_fmt(rej['new'])} on the prompt; "
              "the model above is the restored one")
    if result.generations:
        print(f"  before: {r.text}{result.generations.get('pre', '')!r}")
        print(f"  {after + ':':<7} {r.text}{result.generations.get('post', '')!r}")
    t = result.timings
    print("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()) + f" | ‖ΔW‖/‖W‖ {result.norms.get('relative_update', 0):.3g}"
          f" | status: {result.status}" + (f" ({result.reason})" if result.reason else ""))


def edit_requests(ctx: rome.EditContext, requests: list, ledger: Ledger | None, model_identity: dict[str, str],
                  cfg: DictConfig, progress: bool = True) -> list[rome.EditResult]:
    """Every request, in order, through one Trainer and one ``fit`` (the stage's loop; benchmarks call it too)."""
    callbacks = [ApplyEdit(), VerifyEdit()]
    if ledger is not None:
        callbacks.append(LedgerCheckpoint(ledger, model_identity))
    callbacks.append(EditProgress(enabled=progress))
    trainer = single_device_trainer(cfg, ctx.model, callbacks)
    module = ValueOptimizer(ctx, requests)
    trainer.fit(module)
    return module.results


def edit_batches(ctx: memit.BatchContext, batches: list[list], ledger: Ledger | None, model_identity: dict[str, str],
                 cfg: DictConfig, stats_id: dict | None, progress: bool = True) -> list[memit.BatchResult]:
    """Every batch, in order, through one Trainer and one ``fit`` (z optimised for a whole batch per step)."""
    callbacks = [WriteBatch()] + ([BatchLedger(ledger, model_identity, stats_id)] if ledger is not None else [])
    callbacks.append(BatchProgress(enabled=progress))
    trainer = single_device_trainer(cfg, ctx.model, callbacks)
    module = TargetOptimizer(ctx, batches)
    trainer.fit(module)
    return module.results


def run_batches(cfg: DictConfig, requests: list, loaded, ledger: Ledger) -> list[memit.BatchResult]:
    """``edit.method=memit|alphaedit``: the requests in batches of ``edit.batch_size``, one solve per layer each."""
    if not cfg.edit.layers:
        raise UserError(f"edit.method={cfg.edit.method} needs a layer set: pass edit.layers=[...] "
                        "(or set edit_layers in the model's file)")
    if int(cfg.edit.batch_size) <= 0:
        raise UserError(f"edit.batch_size={cfg.edit.batch_size} must be a positive number of requests")
    layers = [loaded.spec.check_layer(loaded.model, l, "edit.layers") for l in cfg.edit.layers]
    stats = collect(cfg, loaded, layers)
    torch.manual_seed(cfg.seed)
    templates = context_templates(loaded.model, loaded.tokenizer, loaded.identity, cfg.edit.memit.templates,
                                  cache_root(cfg), seed=int(cfg.seed))
    ctx = memit.BatchContext(loaded.model, loaded.tokenizer, loaded.spec, str(cfg.edit.method), layers, templates, cfg.edit)
    for l, rank in memit.prepare(ctx, stats).items():
        print(f"layer {l}: null space of C has {rank} of {stats[l].second_moment.shape[0]} dimensions")
    if ctx.method == "alphaedit":
        device = next(loaded.model.parameters()).device
        ctx.preserved = {l: k.to(device) for l, k in ledger.preserved_keys().items() if l in layers}
        if ctx.preserved:
            print(f"preserving the keys of the ledger's earlier AlphaEdit batches (layers {sorted(ctx.preserved)})")
    size = int(cfg.edit.batch_size)
    batches = [requests[i : i + size] for i in range(0, len(requests), size)]
    stats_id = {str(l): stats_identity(s) for l, s in stats.items()}
    results = edit_batches(ctx, batches, ledger, loaded.identity, cfg, stats_id)
    known = [r for r in requests if r.target_true]
    if known:
        won = sum(p["prompt"]["new"][0] > p["prompt"]["true"][0] for p in
                  (rome.measure(loaded.model, loaded.tokenizer, r, int(cfg.edit.verify.batch_size)) for r in known))
        print(f"after the edits: P(new) > P(true) on {won} of {len(known)} requests' prompts")
    return results


def run(cfg: DictConfig) -> list:
    requests = parse_requests(cfg.request)  # every request checked before the model is touched
    loaded = load_configured(cfg.model)
    ledger = Ledger.open(cfg.edit.out, loaded.identity, cfg.model.dtype)
    if ledger.active():
        print(f"re-applying {ledger.rebuild(loaded.model, loaded.spec)} earlier edit(s) from {ledger.dir}")
    if cfg.edit.method != "rome":
        if cfg.edit.method not in memit.METHODS:
            raise UserError(f"edit.method={cfg.edit.method} is not one of rome, {', '.join(memit.METHODS)}")
        results = run_batches(cfg, requests, loaded, ledger)
        _save_and_report(cfg, loaded, ledger)
        return results
    layer = edit_layer(cfg, loaded)
    c, stats_id = second_moment(cfg, loaded, layer)
    solver = KeySolver(c, float(cfg.edit.ridge), next(loaded.model.parameters()).device)
    del c
    t = time.perf_counter()
    torch.manual_seed(cfg.seed)
    templates = context_templates(loaded.model, loaded.tokenizer, loaded.identity, cfg.edit.templates, cache_root(cfg),
                                  seed=int(cfg.seed))
    print(f"context templates: {len(templates)} ({time.perf_counter() - t:.2f} s)")
    ctx = rome.EditContext(loaded.model, loaded.tokenizer, loaded.spec, layer, templates, solver, cfg.edit, stats_id)
    results = edit_requests(ctx, requests, ledger, loaded.identity, cfg)
    for result in results:
        print_table(result)
    _save_and_report(cfg, loaded, ledger)
    failed = [r for r in results if r.status != "applied"]
    if failed:
        raise UserError(f"{len(failed)} of {len(results)} edit(s) failed verification: {failed[0].reason}")
    return results
