"""Recipe: ``python train.py stage=eval eval.dataset=... eval.n=200 eval.methods=[none,rome,rome_identity_cov,ft_l]``

1. read the cases (schema detected per record; unusable records are skipped with their reason);
2. load the model; one editor per method (``build_editor``: C from the statistics cache, templates), measuring
   each edit as made (no verification, no rollback);
3. check ``eval.out`` belongs to this run; skip the (case, method) pairs already in its case files;
4. ``trainer.predict`` over the pending case indices, sharded over ranks: each case scored before, then
   edited, scored and restored per method; results appended per rank, metrics gathered across ranks;
5. rank 0 writes cases.jsonl, summary.json, table.md, chart.png and timing.json (all atomically); the summary
   and the table hold the paper's teacher-forced metrics and, apart, the generative ones (``eval.generative``:
   greedy continuations scored by exact match and "contains"), each named with its protocol.
Progress: ``eval [case 3/5] rome: v* step 7/20`` and a count of the cases recorded (``modules/progress.py``).
A SIGTERM / SIGINT abandons the case in flight within a forward pass (nothing of it is recorded; the cases
before it are in cases.rank<r>.jsonl); no summary is written, and the same command resumes with the cases not
yet recorded.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rome.datamodules import CaseDataModule
from rome.modules.evaluator import OK, CaseEvaluator, EvalContext
from rome.modules.statistics import layer_statistics
from rome.modules.trainer import make_trainer
from rome.pipeline.core.atomic import atomic_path, write_json
from rome.pipeline.core.digest import file_sha256
from rome.pipeline.core.environment import environment
from rome.pipeline.core.loading import load_configured
from rome.pipeline.core.locks import DirectoryLock, first_process
from rome.pipeline.core.outputs import claim_output_dir
from rome.pipeline.core.signals import check_stop, stop_requested
from rome.pipeline.editors.base import REGISTRY, Editor
from rome.pipeline.editors.factory import build_editor, method_class
from rome.pipeline.editors.settings import changed_edit_note, edit_layer
from rome.pipeline.errors import UserError
from rome.pipeline.evaluation.case_log import CaseLog
from rome.pipeline.evaluation.cases import EvalCase, Skipped, dataset_title, load_cases, load_snippets
from rome.pipeline.evaluation.generative import generative_settings
from rome.pipeline.evaluation.report import (
    GENERATIVE_PROTOCOL,
    PROTOCOL,
    bar_chart,
    earlier_eval_output,
    markdown_table,
    summarize,
)
from rome.pipeline.evaluation.scoring import Generation, References
from rome.pipeline.report import report_after_run


def _identity(cfg: DictConfig, ctx: EvalContext, gen: Generation, kind: str) -> dict[str, Any]:
    """Everything that changes a case's numbers, except the methods (recorded one by one)."""
    zsre = {"zsre_target": str(cfg.eval.zsre_target)} if kind == "zsre" else {}
    return {
        **zsre,
        "model": ctx.loaded.identity,
        "dtype": cfg.model.dtype,
        "layer": ctx.layer,
        "seed": int(cfg.seed),
        "dataset": {"file": Path(cfg.eval.dataset).name, "sha256": file_sha256(cfg.eval.dataset)},
        "generation": dict(tokens=gen.tokens, top_k=gen.top_k, do_sample=gen.do_sample),
        "generative": generative_settings(cfg.eval.generative, ctx.loaded.tokenizer).as_dict(),
        "snippets": file_sha256(cfg.eval.snippets) if cfg.eval.snippets else None,
    }


def _check_run(out: Path, identity: dict[str, Any], methods: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run record of ``eval.out`` (``methods``: each method's configuration), extended with any new method;
    refuses results of another run."""
    run = {"identity": identity, "methods": dict(methods)}
    path = out / "run.json"
    if not path.exists():
        return run
    old = json.loads(path.read_text())
    if old["identity"] != identity:
        diff = [k for k in identity if old["identity"].get(k) != identity[k]]
        raise UserError(
            f"eval.out={out} holds results of another run (different {', '.join(diff)}); "
            "use another eval.out, or delete it to start over"
        )
    for name, conf in run["methods"].items():
        if name in old["methods"] and json.dumps(old["methods"][name], sort_keys=True) != json.dumps(
            conf, sort_keys=True
        ):
            raise UserError(
                f"eval.out={out} holds '{name}' results made with another configuration of it; "
                "use another eval.out, or delete it to start over"
            )
    return {"identity": identity, "methods": {**old["methods"], **run["methods"]}}


def _title(cfg: DictConfig, cases: list[EvalCase], n_skipped: int, ctx: EvalContext) -> str:
    kind = dataset_title(cases[0].kind, str(cfg.eval.zsre_target))
    return (
        f"{kind}: {len(cases)} cases ({n_skipped} skipped) from record {int(cfg.eval.start)} of "
        f"{Path(cfg.eval.dataset).name} ({cases[0].schema} schema), {ctx.loaded.identity['name']}, layer {ctx.layer}"
    )


def _notes(
    cfg: DictConfig,
    cases: list[EvalCase],
    skipped: list[dict],
    gen: Generation,
    ctx: EvalContext,
    methods: list[Editor],
) -> list[str]:
    notes = []
    variant = {m.name: cfg.method[m.name].get("variant") for m in methods}
    own = [
        f"{m.name}: layer {m.layers[0]}" + (f", {variant[m.name]} keys" if variant[m.name] else "")
        for m in methods
        if m.edits_weights and (m.layers[0] != ctx.layer or variant[m.name])
    ]
    if own:
        notes.append(f"Methods with their own settings (the others edit layer {ctx.layer}): {'; '.join(own)}")
    if changed := changed_edit_note(cfg):
        notes.append(changed)
    if cases[0].kind == "counterfact":
        if gen.tokens:
            how = f"sampled top-k {gen.top_k}" if gen.do_sample else "greedy"
            src = (
                "the rewrite prompt and its paraphrase (the flat schema has no generation prompts)"
                if cases[0].schema == "counterfact-flat"
                else "the case's generation prompts"
            )
            notes.append(
                f"GE: {gen.tokens} new tokens ({how}, seeded per case) from {src}; the paper generates 100 tokens"
            )
        if not cfg.eval.snippets:
            notes.append(
                "RS: not computed (no eval.snippets; it needs ROME's attribute_snippets.json and the nested "
                "schema's ids)"
            )
    g = generative_settings(cfg.eval.generative, ctx.loaded.tokenizer)
    if g.enabled:
        chat = (
            f"; chat: also asked through the tokenizer's chat template as {g.chat_prompt!r}"
            if g.chat
            else "; no chat form (eval.generative.chat off or no chat template)"
        )
        notes.append(
            f"gen: greedy, at most {g.max_tokens} new tokens per prompt, {g.batch_size} prompts per generate call{chat}"
        )
    if skipped:
        notes.append(
            f"{len(skipped)} case(s) skipped, with reasons, in summary.json (first: index {skipped[0]['index']}: "
            f"{skipped[0]['reason']})"
        )
    return notes


def _write_outputs(
    out: Path,
    cfg: DictConfig,
    module: CaseEvaluator,
    cases: list[EvalCase],
    load_skipped: list[Skipped],
    log: CaseLog,
    gen: Generation,
    run: dict[str, Any],
    env: dict[str, Any],
) -> dict[str, Any]:
    selected = {c.index for c in cases}
    order = {name: i for i, name in enumerate(module.method_names)}
    records = sorted(
        (r for (i, m), r in log.finished().items() if i in selected and m in order),
        key=lambda r: (r["index"], order[r["method"]]),
    )
    with atomic_path(out / "cases.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    skipped = sorted(
        [s.as_dict() for s in load_skipped]
        + [
            {"index": r["index"], "case_id": r["case_id"], "method": r["method"], "reason": r["reason"]}
            for r in records
            if r["status"] == "skipped"
        ],
        key=lambda s: (s["index"], s.get("method") or ""),
    )
    values = {m: {k: [v for _, v in pairs] for k, pairs in per.items() if k != OK} for m, per in module.values.items()}
    counts = {m: len(per.get(OK, [])) for m, per in module.values.items()}
    kind = cases[0].kind
    summary = {
        "title": _title(cfg, cases, len(load_skipped), module.ctx),
        "kind": kind,
        "schema": cases[0].schema,
        "protocol": PROTOCOL[kind],
        "generative_protocol": GENERATIVE_PROTOCOL,
        "dataset": str(cfg.eval.dataset),
        "start": int(cfg.eval.start),
        "n": cfg.eval.n,
        "cases": {"usable": len(cases), "skipped_at_load": len(load_skipped)},
        "methods": summarize(kind, {m: values[m] for m in module.method_names}, counts),
        "order": module.method_names,
        "skipped": skipped,
        "notes": _notes(cfg, cases, skipped, gen, module.ctx, module.methods),
        "run": run,
        "environment": env,  # of the process that wrote the summary (resumed cases may come from others)
    }
    write_json(out / "summary.json", summary)
    table = markdown_table(summary)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(table)
    bar_chart(summary, out / "chart.png")
    return {"summary": summary, "table": table, "records": records}


def _timing(records: list[dict[str, Any]], seconds: float, new: int) -> dict[str, Any]:
    per: dict[str, dict[str, float]] = {}
    for r in records:
        if r["status"] == "ok":
            t = per.setdefault(r["method"], {"cases": 0, "edit": 0.0, "score": 0.0, "generate": 0.0, "greedy": 0.0})
            t["cases"] += 1
            for k in ("edit", "score", "generate", "greedy"):
                t[k] += r["timings"].get(k, 0.0)
    return {
        "this_run": {"cases": new, "seconds": seconds, "cases_per_hour": 3600 * new / seconds if seconds else None},
        "by_method_all_runs": per,
    }


def _method_names(cfg: DictConfig) -> list[str]:
    """``eval.methods``, each a configs/method/ file of an editor that edits one case at a time."""
    names = list(cfg.eval.methods or [])
    if not names:
        raise UserError("eval.methods is empty; name at least one of: " + ", ".join(sorted(cfg.method)))
    if len(set(names)) != len(names):
        raise UserError(f"eval.methods={names} names a method twice")
    for name in names:
        cls, _ = method_class(cfg, name)
        if not REGISTRY[cls].per_case:
            raise UserError(
                f"{name} edits batches across layers: evaluate it with eval.mode=sequential (or "
                "eval.mode=batch), e.g. eval.methods=[rome,memit,alphaedit] eval.mode=sequential "
                "eval.batch_size=100"
            )
    return names


def run(cfg: DictConfig) -> dict[str, Any] | None:
    claim_output_dir(cfg.eval.out, "eval.out", ours=earlier_eval_output)  # before any work: never another's directory
    # one process writes a per-case eval.out at a time (its DDP ranks write their own case files under its lock)
    with DirectoryLock(cfg.eval.out, "eval.out") if first_process() else contextlib.nullcontext():
        result = _run(cfg)
        report_after_run(cfg.eval.out, bool(cfg.report.after_run))  # rank 0 only: the other ranks exited in _run
        return result


def _run(cfg: DictConfig) -> dict[str, Any] | None:
    torch.manual_seed(cfg.seed)
    cases, load_skipped = load_cases(cfg.eval.dataset, cfg.eval.n, int(cfg.eval.start), str(cfg.eval.zsre_target))
    if not cases:
        first = f" (first: {load_skipped[0].reason})" if load_skipped else ""
        raise UserError(f"no usable case in eval.dataset={cfg.eval.dataset}: {len(load_skipped)} skipped{first}")
    names = _method_names(cfg)
    g = cfg.eval.generation
    gen = Generation(tokens=int(g.tokens), top_k=int(g.top_k), do_sample=bool(g.do_sample))
    refs = References.build(load_snippets(cfg.eval.snippets)) if cfg.eval.snippets else None
    loaded = load_configured(cfg.model, device="cpu")  # the Trainer moves it to each rank's device
    ctx = EvalContext(cfg, loaded, edit_layer(cfg, loaded))
    # C is computed (when the cache lacks it) here, in this process only, before any rank starts
    one_process = OmegaConf.merge(cfg, {"trainer": {"devices": 1, "strategy": "auto", "num_nodes": 1}})
    statistics = layer_statistics(one_process, loaded)
    methods = [build_editor(cfg, loaded, name, statistics, measure_only=True) for name in names]
    out = Path(cfg.eval.out)
    run_record = _check_run(out, _identity(cfg, ctx, gen, cases[0].kind), {m.name: m.config() for m in methods})
    log = CaseLog(out)
    finished = log.finished()
    todo = {c.index: [m for m in methods if (c.index, m.name) not in finished] for c in cases}
    pending = [i for i, ms in todo.items() if ms]
    done = [r for (i, name), r in finished.items() if i in todo and name in {m.name for m in methods}]
    module = CaseEvaluator(
        ctx,
        {c.index: c for c in cases},
        todo,
        done,
        log,
        gen,
        refs,
        int(cfg.seed),
        cases[0].kind,
        methods,
        on_start=lambda: write_json(out / "run.json", run_record),
    )
    # Lightning's bar counts predict steps, not recorded cases: the evaluator shows its own (case, method, phase)
    tr = make_trainer(cfg, use_distributed_sampler=False, inference_mode=False, enable_progress_bar=False)
    if tr.is_global_zero:
        print(
            f"eval: {len(cases)} case(s) of {cfg.eval.dataset} ({cases[0].schema}), {len(load_skipped)} skipped; "
            f"{len(pending)} to run, {len(cases) - len(pending)} already done; "
            f"methods {', '.join(m.name for m in methods)}"
        )
    start = time.perf_counter()
    check_stop("no case was evaluated yet; to start, run the same command")
    tr.predict(module, datamodule=CaseDataModule(pending), return_predictions=False)
    seconds = time.perf_counter() - start
    if stop_requested():
        recorded = sum(1 for (i, m) in log.finished() if i in todo and m in {x.name for x in methods})
        total = sum(len(methods) for _ in cases)
        check_stop(
            f"{recorded} of {total} (case, method) results are recorded in {out}/cases.rank*.jsonl; "
            "to resume, run the same command"
        )
    result = None
    if tr.is_global_zero:
        env = {**environment(tr.strategy.root_device), "processes": tr.world_size}
        result = _write_outputs(out, cfg, module, cases, load_skipped, log, gen, run_record, env)
        write_json(out / "timing.json", _timing(result["records"], seconds, len(pending)))
        print("\n" + result["table"])
        print(f"results: {out}/ (summary.json, table.md, chart.png, cases.jsonl)")
    tr.strategy.barrier()
    if tr.world_size > 1 and not tr.is_global_zero:
        raise SystemExit(0)  # only rank 0 goes on to report
    return result
