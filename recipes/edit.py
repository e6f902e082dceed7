"""Recipe: ``python train.py stage=edit request=...`` -- ROME rank-one edits, one request after another.

1. parse and check every request, ``edit.save_to`` and ``edit.out`` before touching the model;
2. load the model, open the ledger in ``edit.out`` (default: a fresh ``edit.runs_dir/<date>_<time>``; an
   earlier ledger's edits are re-applied first, and requests of this same list already recorded there are
   skipped: the same command resumes an interrupted run);
3. C for the edit layer from the statistics cache (computed now when missing), unless C = I, factorised once;
4. context templates (sampled once per model, cached);
5. one Trainer, one ``fit``: per request, k* and v₀ averaged over the templates and v* by the
   ``ValueOptimizer`` loop; the callbacks apply, verify (or roll back) and record each edit;
6. print the before/after table of every edit; save the edited model when ``edit.save_to`` is set (if that
   fails, this run's edits are taken out of the ledger again: it never records what was not saved).
A SIGTERM / SIGINT stops after the edit in progress is applied, verified and recorded; the model is saved
with the edits made so far and the command to resume is printed.
"""

from __future__ import annotations

import datetime
import os
import shutil
import time
from pathlib import Path

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from modules.batch import BatchLedger, BatchProgress, TargetOptimizer, WriteBatch
from modules.callbacks import ApplyEdit, EditProgress, LedgerCheckpoint, VerifyEdit
from modules.rome import ValueOptimizer
from modules.statistics import collect, second_moment
from modules.trainer import single_device_trainer
from pipeline.editors import memit
from pipeline.editors import rome
from pipeline.core.loading import cache_root
from pipeline.editors.factory import edit_layer
from pipeline.core.digest import json_digest
from pipeline.errors import UserError
from pipeline.editors.ledger import Ledger
from pipeline.core.loading import load_configured
from pipeline.editors.rank_one import KeySolver
from pipeline.core.requests import parse_requests
from pipeline.core.saving import check_destination, check_writable, save_model
from pipeline.core.signals import check_stop, stop_requested
from pipeline.stats.store import stats_identity
from pipeline.editors.templates import context_templates
from pipeline.core.timing import model_device


class Run:
    """Where this run writes: the ledger directory (given, or fresh for this run) and ``edit.save_to``, both
    checked before any work; the request list's digest and which of its requests are still to do."""

    def __init__(self, cfg: DictConfig, requests: list) -> None:
        self.fresh = not cfg.edit.out
        self.out = Path(cfg.edit.out) if cfg.edit.out else fresh_dir(Path(cfg.edit.runs_dir))
        check_writable(self.out, "edit.out")
        Ledger.open(self.out)  # an existing directory must be a ledger of ours (checked before the model loads)
        model_dir = cfg.model.name if os.path.isdir(str(cfg.model.name)) else None
        self.save_to = check_destination(cfg.edit.save_to, "edit.save_to", protect=(model_dir, self.out)) \
            if cfg.edit.save_to else None
        batching = {"batch_size": int(cfg.edit.batch_size)} if cfg.edit.method != "rome" else {}
        self.digest = json_digest({"requests": [r.as_dict() for r in requests], "method": str(cfg.edit.method), **batching})
        self.total, self.done, self.unit, self.recorded_before = 0, 0, "edit(s)", 0

    def resume_hint(self) -> str:
        where = f"; the model saved to {self.save_to} holds them" if self.save_to and self.done else ""
        how = f"run the same command with edit.out={self.out}" if self.fresh else "run the same command"
        return f"{self.done} of {self.total} {self.unit} edited and recorded in {self.out}{where}; to resume, {how}"

    def save_and_report(self, loaded, ledger: Ledger) -> None:
        if self.save_to is not None:
            try:
                save_model(loaded, self.save_to, "edit.save_to",
                           {"ledger": str(ledger.dir.resolve()), "edits": [e["id"] for e in ledger.active()]})
            except (OSError, UserError) as err:
                dropped = ledger.discard_since(self.recorded_before)
                if self.fresh and not ledger.entries:
                    shutil.rmtree(ledger.dir, ignore_errors=True)  # made by this run, for this run only
                reason = err if isinstance(err, UserError) else f"{err.strerror or err}"
                raise UserError(f"could not save the model to {self.save_to} ({reason}); the {len(dropped)} edit(s) of "
                                f"this run were taken out of the ledger again, which is as before the run") from None
            ledger.data["saved_to"] = str(self.save_to.resolve())
            ledger.save()
            print(f"edited model saved to {self.save_to}")
        if ledger.entries:
            print(f"ledger: {ledger.dir / 'ledger.json'} ({len(ledger.active())} active edit(s)); "
                  f"to add edits to it: edit.out={ledger.dir}")


def fresh_dir(parent: Path) -> Path:
    """``parent/<date>_<time>`` (with a suffix when taken): one new ledger directory per run, made on the
    first recorded edit."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path, n = parent / stamp, 1
    while path.exists():
        path, n = parent / f"{stamp}-{n}", n + 1
    return path


def _fit(trainer, module) -> None:
    """``trainer.fit``; Lightning ends a fit on SIGTERM with its own SystemExit after the batch in progress
    (whose edit the callbacks have finished by then): that is our stop request, handled by the caller."""
    try:
        trainer.fit(module)
    except SIGTERMException:
        if not stop_requested():
            raise


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
                  cfg: DictConfig, progress: bool = True, run: tuple[str, list[int]] | None = None) -> list[rome.EditResult]:
    """Every request, in order, through one Trainer and one ``fit`` (the stage's loop; benchmarks call it too).
    After a stop request: the edits finished so far (each applied, verified and recorded whole)."""
    if not requests:
        return []
    callbacks = [ApplyEdit(), VerifyEdit()]
    if ledger is not None:
        callbacks.append(LedgerCheckpoint(ledger, model_identity, run))
    callbacks.append(EditProgress(enabled=progress))
    trainer = single_device_trainer(cfg, ctx.model, callbacks)
    module = ValueOptimizer(ctx, requests)
    _fit(trainer, module)
    return [r for r in module.results if r.status != "pending"]


def edit_batches(ctx: memit.BatchContext, batches: list[list], ledger: Ledger | None, model_identity: dict[str, str],
                 cfg: DictConfig, stats_id: dict | None, progress: bool = True,
                 run: tuple[str, list[int]] | None = None) -> list[memit.BatchResult]:
    """Every batch, in order, through one Trainer and one ``fit`` (z optimised for a whole batch per step)."""
    if not batches:
        return []
    callbacks = [WriteBatch()] + ([BatchLedger(ledger, model_identity, stats_id, run)] if ledger is not None else [])
    callbacks.append(BatchProgress(enabled=progress))
    trainer = single_device_trainer(cfg, ctx.model, callbacks)
    module = TargetOptimizer(ctx, batches)
    _fit(trainer, module)
    return module.results


def run_batches(cfg: DictConfig, requests: list, loaded, ledger: Ledger, run: Run) -> list[memit.BatchResult]:
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
        device = model_device(loaded.model)
        ctx.preserved = {l: k.to(device) for l, k in ledger.preserved_keys().items() if l in layers}
        if ctx.preserved:
            print(f"preserving the keys of the ledger's earlier AlphaEdit batches (layers {sorted(ctx.preserved)})")
    size = int(cfg.edit.batch_size)
    batches = [requests[i : i + size] for i in range(0, len(requests), size)]
    todo = _todo(ledger, run, len(batches), "batch(es)")
    stats_id = {str(l): stats_identity(s) for l, s in stats.items()}
    check_stop(run.resume_hint())
    results = edit_batches(ctx, [batches[i] for i in todo], ledger, loaded.identity, cfg, stats_id,
                           run=(run.digest, todo))
    run.done += len(results)
    known = [r for i in todo[: len(results)] for r in batches[i] if r.target_true]
    if known:
        won = sum(p["prompt"]["new"][0] > p["prompt"]["true"][0] for p in
                  (rome.measure(loaded.model, loaded.tokenizer, r, int(cfg.edit.verify.batch_size)) for r in known))
        print(f"after the edits: P(new) > P(true) on {won} of {len(known)} requests' prompts")
    return results


def _todo(ledger: Ledger, run: Run, total: int, unit: str) -> list[int]:
    """Positions of this request list not yet in the ledger (all of them unless resuming)."""
    done = ledger.done_in_run(run.digest)
    run.total, run.done, run.unit = total, len(done), unit
    if done:
        print(f"resuming: {len(done)} of {total} {unit} of this request list are already in {ledger.dir}; "
              f"{total - len(done)} to do")
    return [i for i in range(total) if i not in done]


def run(cfg: DictConfig) -> list:
    requests = parse_requests(cfg.request)  # every request checked before the model is touched
    if cfg.edit.method not in ("rome", *memit.METHODS):
        raise UserError(f"edit.method={cfg.edit.method} is not one of rome, {', '.join(memit.METHODS)}")
    run_ = Run(cfg, requests)  # edit.out and edit.save_to checked before any work
    loaded = load_configured(cfg.model)
    ledger = Ledger.open(run_.out, loaded.identity, cfg.model.dtype)
    run_.recorded_before = len(ledger.entries)
    if ledger.entries:
        print(f"continuing the ledger in {ledger.dir}: re-applying {ledger.rebuild(loaded.model, loaded.spec)} "
              "earlier edit(s)")
    elif not run_.fresh:
        print(f"ledger: {ledger.dir} (new)")
    if cfg.edit.method != "rome":
        results = run_batches(cfg, requests, loaded, ledger, run_)
        run_.save_and_report(loaded, ledger)
        check_stop(run_.resume_hint())
        return results
    todo = _todo(ledger, run_, len(requests), "request(s)")
    layer = edit_layer(cfg, loaded)
    c, stats_id = second_moment(cfg, loaded, layer)
    solver = KeySolver(c, float(cfg.edit.ridge), model_device(loaded.model))
    del c
    t = time.perf_counter()
    torch.manual_seed(cfg.seed)
    templates = context_templates(loaded.model, loaded.tokenizer, loaded.identity, cfg.edit.templates, cache_root(cfg),
                                  seed=int(cfg.seed))
    print(f"context templates: {len(templates)} ({time.perf_counter() - t:.2f} s)")
    ctx = rome.EditContext(loaded.model, loaded.tokenizer, loaded.spec, layer, templates, solver, cfg.edit, stats_id)
    check_stop(run_.resume_hint())
    results = edit_requests(ctx, [requests[i] for i in todo], ledger, loaded.identity, cfg, run=(run_.digest, todo))
    run_.done += len(results)
    for result in results:
        print_table(result)
    run_.save_and_report(loaded, ledger)
    check_stop(run_.resume_hint())
    failed = [r for r in results if r.status != "applied"]
    if failed:
        raise UserError(f"{len(failed)} of {len(results)} edit(s) failed verification: {failed[0].reason}")
    return results
