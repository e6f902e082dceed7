"""Recipe: ``python train.py stage=eval eval.mode=sequential eval.methods=[rome,memit,alphaedit] eval.batch_size=100``

Many edits into one model (AlphaEdit's protocol), and what the model still knows afterwards:
1. read the cases (CounterFact or zsRE); load the model; C for every layer a method edits (statistics cache);
2. the unedited model: every case's scores, perplexity on held-out Wikipedia articles (never read for C),
   and the known_1000 facts it answers (the reference for "still knows");
3. per method, from the clean model: apply the cases' edits cumulatively in batches of ``eval.batch_size``
   (``eval.mode=batch``: all of them in one batch; ROME one request at a time), and every ``eval.eval_every``
   batches take a checkpoint (the collapse monitor): per edited layer ||W - W0|| / ||W0||, the held-out
   perplexity, the known-fact accuracy, and the teacher-forced (ES/PS/NS; zsRE: efficacy, paraphrase and
   specificity accuracy) and generative (greedy) efficacy of
   at most ``eval.curve_cases`` of the cases edited so far (the curve); after the last batch score every case
   (GE and the generative scores too), the same checkpoint, and the collapse point (the first checkpoint where
   the perplexity passes 2x the unedited or the known facts fall below half); restore the clean weights
   (checked bitwise);
4. write ``methods/<name>.json`` and the assembled summary.json, table.md, curve.png to ``eval.out`` after
   every method: a rerun with the same settings skips the methods already there, and several processes can
   run different methods into the same ``eval.out`` at once (each assembles what is finished).
A SIGTERM / SIGINT stops at the next batch boundary: finished methods are in ``methods/``; the method in
progress saves its edited matrices and its editor's state in ``progress/`` (also at every checkpoint, so a
kill loses at most ``eval.eval_every`` batches), and the same command resumes it at that batch, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rome.modules.statistics import layer_statistics
from rome.pipeline.core.atomic import atomic_path, write_json
from rome.pipeline.core.digest import file_sha256
from rome.pipeline.core.environment import environment
from rome.pipeline.core.loading import LoadedModel, load_configured
from rome.pipeline.core.outputs import claim_output_dir
from rome.pipeline.core.requests import EditRequest
from rome.pipeline.core.signals import check_stop, stop_requested
from rome.pipeline.core.timing import Clock
from rome.pipeline.editors.base import Editor
from rome.pipeline.editors.factory import build_editor, method_class
from rome.pipeline.editors.progress import StepProgress
from rome.pipeline.editors.settings import changed_edit_note, edit_layer
from rome.pipeline.errors import Interrupted, UserError
from rome.pipeline.evaluation.cases import EvalCase, dataset_title, load_cases
from rome.pipeline.evaluation.generative import SETS, GenerativeEval, generative_settings, score_generative
from rome.pipeline.evaluation.metrics import fluency, harmonic_mean
from rome.pipeline.evaluation.progress_state import drop_progress, load_progress, save_progress
from rome.pipeline.evaluation.report import (
    GENERATIVE_PROTOCOL,
    LABELS,
    PROTOCOL,
    earlier_eval_output,
    summarize,
)
from rome.pipeline.evaluation.retention import (
    HeldoutPerplexity,
    fact_accuracy,
    heldout_texts,
    known_facts,
    texts_read,
    unrelated_facts,
    weight_change,
)
from rome.pipeline.evaluation.scale_report import (
    KNOWN_FACTOR,
    PPL_FACTOR,
    collapse_point,
    curve_plot,
    curve_sample,
    scale_table,
)
from rome.pipeline.evaluation.scoring import Generation, generate, teacher_forced_scores
from rome.pipeline.report import report_after_run
from rome.pipeline.tracing.facts import Fact, load_facts

SEQUENTIAL = ("none", "rome", "memit", "alphaedit", "ultraedit")  # the classes of the sequential protocol
CASES_PER_CALL = 64  # cases scored per teacher-forced call: the progress bar's step, not a tuning knob


def build_editors(cfg: DictConfig, loaded: LoadedModel, names: list[str], batch_size: int) -> list[Editor]:
    """One editor per method, measuring edits as made, batching as the run does (``batch_size``); C for all
    their layers is computed in one streaming pass when the cache lacks it."""
    classes = {name: method_class(cfg, name)[0] for name in names}
    for name, kind in classes.items():
        if kind not in SEQUENTIAL:
            raise UserError(
                f"eval.mode={cfg.eval.mode} runs {', '.join(SEQUENTIAL)} (and their configs); "
                f"'{name}' is a {kind} method"
            )
    method_runcfg = OmegaConf.merge(cfg, {"edit": {"batch_size": batch_size}})
    statistics = layer_statistics(method_runcfg, loaded)
    layers = set()
    if {"memit", "alphaedit"} & set(classes.values()):
        layers |= set(cfg.edit.layers or [])
    for name, kind in classes.items():
        if kind == "rome" and cfg.method[name].get("mom2_adjustment", True):
            own = cfg.method[name].get("layer")
            layers.add(edit_layer(cfg, loaded) if own is None else int(own))
    if layers:
        statistics(sorted(layers))  # one pass for every layer (the provider keeps them)
    return [build_editor(method_runcfg, loaded, name, statistics, measure_only=True) for name in names]


def _scores(
    loaded: LoadedModel,
    cases: list[EvalCase],
    gen: Generation,
    cfg: DictConfig,
    desc: str,
    generative: GenerativeEval,
    sets: list[str] | None = None,
) -> list[dict]:
    """Every case's teacher-forced metrics (CounterFact's or zsRE's), the prompts batched across cases
    (``eval.score_batch_size`` pairs per forward pass); with ``gen.tokens``, GE from texts generated in batches
    across cases (``eval.generation.batch_size`` prompts per ``generate`` call, seeded per call); with
    ``generative``, the greedy-generation scores of the prompt sets ``sets`` (default all), batched likewise."""
    out = []

    def between() -> None:  # Ctrl-C / SIGTERM acts within one forward pass or generate call, not a whole scoring
        check_stop(f"{desc}: the scoring in progress was abandoned (it is redone); to resume, run the same command")

    for i in tqdm(range(0, len(cases), CASES_PER_CALL), desc=desc, leave=False, dynamic_ncols=True):
        between()
        chunk = cases[i : i + CASES_PER_CALL]
        out += teacher_forced_scores(loaded.model, loaded.tokenizer, chunk, int(cfg.eval.score_batch_size))
    if generative.enabled:
        scored = score_generative(
            loaded.model, loaded.tokenizer, cases, generative, sets, between, f"{desc}: greedy answers"
        )
        for metrics, g in zip(out, scored):
            metrics.update(g["metrics"])
    if gen.tokens:
        owner = [i for i, c in enumerate(cases) for _ in c.generation_prompts]
        prompts = [p for c in cases for p in c.generation_prompts]
        size = int(cfg.eval.generation.batch_size)
        texts: list[list[str]] = [[] for _ in cases]
        for j in tqdm(range(0, len(prompts), size), desc=f"{desc}: generating", leave=False, dynamic_ncols=True):
            between()
            for i, text in zip(
                owner[j : j + size],
                generate(loaded.model, loaded.tokenizer, prompts[j : j + size], gen, int(cfg.seed) + j),
            ):
                texts[i].append(text)
        for metrics, t in zip(out, texts):
            if t:
                metrics["ge"] = fluency(t)
    return out


def _curve_point(kind: str, edits: int, scores: list[dict], extra: dict[str, Any]) -> dict[str, Any]:
    """The teacher-forced efficacy, generalisation and specificity (CounterFact: ES/PS/NS and S; zsRE: efficacy,
    paraphrase, specificity) and the generative efficacy (``es_gen_em``, ``efficacy_gen_em``, ...) of ``scores``
    (x100, each over the cases that have it), with the checkpoint's other measurements (``extra``)."""
    point = {}
    for k in SETS[kind]:
        have = [s[k] for s in scores if k in s]
        if have:
            point[k] = 100 * sum(have) / len(have)
    if kind == "counterfact":
        point["s"] = harmonic_mean([point[k] for k in ("es", "ps", "ns")])
    efficacy = SETS[kind][0]
    for k in sorted({k for s in scores for k in s if k.startswith(f"{efficacy}_")}):
        point[k] = 100 * sum(s[k] for s in scores if k in s) / sum(1 for s in scores if k in s)
    return {"edits": edits, "cases": len(scores), **point, **extra}


@dataclasses.dataclass
class _Monitor:
    """The collapse monitor's checkpoint: what it measures with, for the whole run."""

    loaded: LoadedModel
    cases: list[EvalCase]
    cfg: DictConfig
    generative: GenerativeEval
    no_text: Generation
    curve_cases: int | None  # None: every case edited so far
    ppl: Callable[[], float]
    known: list[Fact]
    clean: dict[int, torch.Tensor]
    pre_ppl: float
    kind: str  # the cases' dataset kind: counterfact or zsre

    def checkpoint(
        self,
        name: str,
        edits: bool,
        own: dict[int, torch.Tensor],
        n_edits: int,
        scores: dict[int, dict] | None = None,
    ) -> dict[str, Any]:
        """The curve's point after ``n_edits``: the teacher-forced and generative efficacy of a sample of the
        cases edited so far (``scores``: case index -> scores already taken, the sample picked from them when they
        cover it), the held-out
        perplexity, the known facts and the relative change of the method's edited matrices ``own``."""
        sample = curve_sample(n_edits, self.curve_cases)
        if scores is None or not set(sample) <= set(scores):
            picked = [self.cases[i] for i in sample]
            efficacy = SETS[self.kind][0]
            scores = _scores(
                self.loaded, picked, self.no_text, self.cfg, f"{name}: checkpoint", self.generative, [efficacy]
            )
        else:
            scores = [scores[i] for i in sample]
        model, tok = self.loaded.model, self.loaded.tokenizer
        extra = {
            "perplexity": self.ppl() if edits else self.pre_ppl,
            "known_accuracy": fact_accuracy(model, tok, self.known) if edits else 1.0,
            "weight_change": weight_change(own, self.clean),
        }
        return _curve_point(self.kind, n_edits, scores, extra)


def count_without_timing(bar: tqdm, n: int) -> None:
    """Add ``n`` units that cost no time of this run (a resumed method's saved batches, the batches of method
    ``none``) to ``bar`` without entering its rate: ``update(n)`` would time them as done in an instant, so the
    run's ETA read 00:00 and the bar's grown ``miniters`` kept it from redrawing for the batches that followed.
    The next timed interval starts now."""
    bar.n += n
    bar.last_print_n += n  # the next update's increment is the new units only
    bar.initial += n  # the rate before the first timed update: (n - initial) / elapsed
    bar.last_print_t = bar._time()
    bar.refresh()


class _MethodRun:
    """One method's batches in a many-edit run: edits, checkpoints, and its progress saved at batch boundaries
    (``pipeline/evaluation/progress_state.py``) so that a stopped run resumes where it stopped."""

    def __init__(
        self,
        name: str,
        editor: Editor,
        monitor: _Monitor,
        batches: list[list[int]],
        every: int,
        folder: Path,
        bar: tqdm,
    ) -> None:
        self.name, self.editor, self.monitor, self.batches, self.every, self.bar = (
            name,
            editor,
            monitor,
            batches,
            every,
            bar,
        )
        self.edits = editor.edits_weights
        weights = {layer: monitor.loaded.spec.down_proj_weight(monitor.loaded.model, layer) for layer in monitor.clean}
        self.own = {layer: weights[layer] for layer in editor.layers if layer in weights}
        self.stem = folder / name
        self.done = 0  # batches applied
        self.curve: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self.seconds = self.checkpoint_seconds = 0.0
        self.settings: dict[str, Any] = {}

    def edit_batch(self, requests: list) -> None:
        clock = Clock(self.monitor.loaded.model)
        # the optimisation inside the batch (z or v* steps, loss, P(target)) on a terminal: a batch of a method that
        # optimises takes minutes on a CPU, and the run's bar moves only between batches
        label = f"{self.name}: batch {self.done + 1}/{len(self.batches)}"
        steps = StepProgress(len(self.editor.units(requests)), label)
        try:
            edits = self.editor.edit(requests, steps)
        finally:
            steps.close()
        for edit in edits:
            for k, v in edit.timings.items():
                self.timings[k] = self.timings.get(k, 0.0) + v
        self.seconds += clock.lap("batch")
        self.done += 1
        if self.edits:
            self.bar.update(1)
        else:  # method none: an instant batch must not set the pace of the run's ETA
            count_without_timing(self.bar, 1)

    def checkpoint_due(self) -> bool:
        """A curve point after the first batch (what the method reaches with one batch, the reference for later
        points) and every ``eval_every`` batches; not after the last: the final scoring takes that one."""
        if not self.edits or not self.every or self.done >= len(self.batches):
            return False
        return self.done == 1 or self.done % self.every == 0

    def take_checkpoint(self) -> None:
        clock = Clock(self.monitor.loaded.model)
        n_edits = self.batches[self.done - 1][-1] + 1
        self.curve.append(self.monitor.checkpoint(self.name, self.edits, self.own, n_edits))
        self.checkpoint_seconds += clock.lap("checkpoint")
        p = self.curve[-1]
        efficacy = SETS[self.monitor.kind][0]
        label = LABELS[efficacy]
        gen = f" {label}(gen) {p[f'{efficacy}_gen_em']:.0f}" if f"{efficacy}_gen_em" in p else ""
        self.bar.set_postfix_str(
            f"{p['edits']} edits: {label} {p[efficacy]:.0f}{gen} ppl {p['perplexity']:.1f} "
            f"known {100 * p['known_accuracy']:.0f}%"
        )

    def save(self, checkpoint_pending: bool = False) -> None:
        if not self.edits or not self.done:
            return
        info = {
            "settings": self.settings,
            "batches": self.done,
            "edits": self.batches[self.done - 1][-1] + 1,
            "checkpoint_pending": checkpoint_pending,
            "curve": self.curve,
            "timings": self.timings,
            "edit_seconds": self.seconds,
            "checkpoint_seconds": self.checkpoint_seconds,
        }
        save_progress(self.stem, self.own, self.editor.state(), info)

    def resume(self, method_config: dict[str, Any]) -> None:
        """Take up the saved progress made with the same settings: the edited matrices, the editor's state,
        the curve and timings so far (a pending checkpoint is taken now)."""
        self.settings = {"method": method_config, "editor": self.editor.config()}
        saved = load_progress(self.stem, self.settings) if self.edits else None
        if isinstance(saved, str):
            self.bar.write(f"{self.name}: {saved}; it starts again from the clean model")
            return
        if saved is None:
            return
        info, weights, state = saved
        if set(weights) != set(self.own):
            self.bar.write(f"{self.name}: its progress in {self.stem}.json covers other layers; it starts again")
            return
        with torch.no_grad():
            for layer, w in weights.items():
                self.own[layer].copy_(w)
        self.editor.load_state(state)
        self.done, self.curve, self.timings = int(info["batches"]), info["curve"], info["timings"]
        self.seconds, self.checkpoint_seconds = info["edit_seconds"], info["checkpoint_seconds"]
        count_without_timing(self.bar, self.done)
        self.bar.write(
            f"{self.name}: resuming after batch {self.done} of {len(self.batches)} ({info['edits']} edits), "
            f"from {self.stem}.json"
        )
        if info["checkpoint_pending"]:
            self.take_checkpoint()


def _method_row(kind: str, scores: list[dict], extra: dict[str, Any]) -> dict[str, Any]:
    keys = {k for s in scores for k in s}
    row = summarize(kind, {"m": {k: [s[k] for s in scores if k in s] for k in keys}}, {"m": len(scores)})["m"]
    return {**row, **extra}


def run(cfg: DictConfig) -> dict[str, Any]:
    # before any work: never another's directory. Not locked: processes running different methods into one
    # eval.out is how a long comparison is split (each writes methods/<name>.json, atomically)
    claim_output_dir(cfg.eval.out, "eval.out", ours=earlier_eval_output)
    torch.manual_seed(cfg.seed)
    mode = str(cfg.eval.mode)
    if mode not in ("sequential", "batch"):
        raise UserError(f"eval.mode={mode} is not one of case, sequential, batch")
    cases, skipped = load_cases(cfg.eval.dataset, cfg.eval.n, int(cfg.eval.start), str(cfg.eval.zsre_target))
    if not cases:
        raise UserError(
            f"eval.mode={mode} needs cases; eval.dataset={cfg.eval.dataset} gave none usable from record "
            f"{cfg.eval.start} ({len(skipped)} skipped)"
        )
    kind = cases[0].kind
    names = list(cfg.eval.methods or [])
    unknown = [m for m in names if m not in cfg.method]
    if unknown:
        raise UserError(
            f"eval.methods: unknown method(s) {unknown} (configs/method/ has: {', '.join(sorted(cfg.method))})"
        )
    batch_size = len(cases) if mode == "batch" else int(cfg.eval.batch_size)
    if batch_size <= 0:
        raise UserError(f"eval.batch_size={cfg.eval.batch_size} must be a positive number of edits per batch")
    loaded = load_configured(cfg.model)
    editors = {m.name: m for m in build_editors(cfg, loaded, names, batch_size)}
    layers = sorted({layer for m in editors.values() for layer in m.layers})
    gen = Generation(
        tokens=int(cfg.eval.generation.tokens),
        top_k=int(cfg.eval.generation.top_k),
        do_sample=bool(cfg.eval.generation.do_sample),
    )
    no_text = Generation(tokens=0, top_k=gen.top_k, do_sample=gen.do_sample)
    generative = generative_settings(cfg.eval.generative, loaded.tokenizer)
    curve_cases = int(cfg.eval.curve_cases) or None  # 0: every case edited so far
    if curve_cases is not None and curve_cases < 0:
        raise UserError(f"eval.curve_cases={curve_cases} must be a number of cases (0: all)")
    final_cases = int(cfg.eval.final_cases) or None  # 0: every case
    if final_cases is not None and final_cases < 0:
        raise UserError(f"eval.final_cases={final_cases} must be a number of cases (0: all)")
    final = curve_sample(len(cases), final_cases)  # the cases scored before the edits and after the last batch
    scored = [cases[i] for i in final]
    out = Path(cfg.eval.out)

    heldout, records = (
        heldout_texts(cfg.data.files, int(cfg.eval.heldout.articles), cfg.data.text_field)
        if cfg.data.files
        else (None, None)
    )
    if heldout is None:
        raise UserError(
            "the held-out perplexity needs local text: "
            "pass data.files=../shared/data/wikipedia/wikipedia_en_sample.jsonl.gz"
        )
    read = texts_read(
        cfg.data.files, loaded.tokenizer, int(cfg.stats.tokens), int(cfg.data.max_length), cfg.data.text_field
    )
    if read > records.start:
        raise UserError(
            f"the statistics read {read} articles, into the {len(records)} held out at the end; "
            "lower stats.tokens or eval.heldout.articles"
        )
    ppl = HeldoutPerplexity(  # the blocks before the first edited one run once, not at every checkpoint
        loaded.model,
        loaded.tokenizer,
        loaded.spec,
        heldout,
        int(cfg.eval.heldout.max_length),
        int(cfg.eval.heldout.batch_size),
        frozen_below=min(layers, default=0),
    )
    facts = load_facts(cfg.eval.known.dataset, int(cfg.eval.known.n))
    known_settings = OmegaConf.to_container(cfg.eval.known, resolve=True)
    set_aside = []
    if known_settings.pop("exclude_edited", False):
        facts, set_aside = unrelated_facts(facts, [c.request.subject for c in cases])
        known_settings["exclude_edited"] = True  # absent: every fact kept (runs made before the key)
    identity = {
        **({"zsre_target": str(cfg.eval.zsre_target)} if kind == "zsre" else {}),  # what the edits write
        "model": loaded.identity,
        "dtype": cfg.model.dtype,
        "mode": mode,
        "batch_size": batch_size,
        "eval_every": int(cfg.eval.eval_every),
        "curve_cases": curve_cases,
        **({"final_cases": final_cases} if final_cases else {}),  # absent: every case (runs made before the key)
        "seed": int(cfg.seed),
        "start": int(cfg.eval.start),
        "n": len(cases),
        "dataset": file_sha256(cfg.eval.dataset),
        "stats_tokens": int(cfg.stats.tokens),
        "generation": OmegaConf.to_container(cfg.eval.generation, resolve=True),
        "generative": generative.as_dict(),
        "heldout": OmegaConf.to_container(cfg.eval.heldout, resolve=True),
        "known": known_settings,
    }
    method_runpath = out / "run.json"
    if method_runpath.exists() and (earlier := json.loads(method_runpath.read_text())) != identity:
        differ = sorted(k for k in identity.keys() | earlier.keys() if identity.get(k) != earlier.get(k))
        before_rule = "exclude_edited" in known_settings and "exclude_edited" not in earlier.get("known", {})
        raise UserError(
            f"eval.out={out} holds a many-edit run with other settings ({', '.join(differ)} differ); "
            + (
                "it was made before known facts about edited subjects were set aside: continue it with "
                "eval.known.exclude_edited=false, or use another eval.out"
                if before_rule and differ == ["known"]
                else "use another eval.out or delete it"
            )
        )
    write_json(method_runpath, identity)
    unedited_path = out / "unedited.json"
    if unedited_path.exists():
        unedited = json.loads(unedited_path.read_text())
    else:
        check_stop("nothing was evaluated yet; to start, run the same command")
        aside = f" ({len(set_aside)} about a subject this run edits set aside)" if set_aside else ""
        print(f"unedited model: scoring {len(scored)} cases, held-out perplexity, known facts{aside}")
        unedited = {
            "pre": _scores(loaded, scored, gen, cfg, "unedited", generative),
            "pre_perplexity": ppl(),
            "known_facts": [f.index for f in known_facts(loaded.model, loaded.tokenizer, facts)],
        }
        if "exclude_edited" in known_settings:
            unedited["known_set_aside"] = [f.index for f in set_aside]  # about a subject this run edits
        write_json(unedited_path, unedited)
    summary = _assemble(out, identity, unedited, names, kind)
    known = [f for f in facts if f.index in set(summary["known_facts"])]

    def stop(method: str | None = None, batch: int = 0, of: int = 0) -> None:
        finished = sorted(p.stem for p in (out / "methods").glob("*.json"))
        now = (
            f"; {method} stopped after {batch} of {of} batch(es), its edits and state saved in "
            f"{out / 'progress'} (it resumes there)"
            if method
            else ""
        )
        check_stop(
            f"finished method(s) in {out / 'methods'}: {', '.join(finished) or 'none'}{now}; "
            "to resume, run the same command"
        )

    weights = {layer: loaded.spec.down_proj_weight(loaded.model, layer) for layer in layers}
    clean = {layer: w.detach().clone() for layer, w in weights.items()}
    batches = [list(range(i, min(i + batch_size, len(cases)))) for i in range(0, len(cases), batch_size)]
    monitor = _Monitor(
        loaded, cases, cfg, generative, no_text, curve_cases, ppl, known, clean, summary["pre_perplexity"], kind
    )
    pending = [n for n in names if not (out / "methods" / f"{n}.json").exists()]
    # one bar over the whole run (every pending method's batches), so its ETA is the run's
    bar = tqdm(total=len(pending) * len(batches), desc="eval", unit="batch", dynamic_ncols=True)
    try:  # the bar ends its line before a stop message or an error is printed
        for name in names:
            if name not in pending:
                print(f"{name}: already in {out / 'methods'}, skipped")
                continue
            stop()
            conf = cfg.method[name]
            editor = editors[name]
            edits = editor.method != "none"
            requests = [dataclass_request(c) for c in cases]
            bar.set_description(f"{name} ({pending.index(name) + 1}/{len(pending)})")
            for line in editor.null_space_report():
                bar.write(f"{name}: {line}")
            method_run = _MethodRun(name, editor, monitor, batches, int(cfg.eval.eval_every), out / "progress", bar)
            method_run.resume(OmegaConf.to_container(conf, resolve=True))
            for b in range(method_run.done, len(batches)):
                method_run.edit_batch([requests[i] for i in batches[b]])
                if stop_requested():  # the batch boundary: what the next batch needs, saved; then stop
                    method_run.save(checkpoint_pending=method_run.checkpoint_due())
                    stop(name, method_run.done, len(batches))
                if method_run.checkpoint_due():
                    try:
                        method_run.take_checkpoint()
                    except Interrupted:  # stopped inside the checkpoint: keep the edits, redo the checkpoint
                        method_run.save(checkpoint_pending=True)
                        raise
                    method_run.save()  # a kill loses at most eval_every batches
            method_run.save()  # the final scoring, if stopped, resumes without editing again
            curve, timings, seconds, own = method_run.curve, method_run.timings, method_run.seconds, method_run.own
            checkpoint_seconds = method_run.checkpoint_seconds  # the curve's checkpoints between the batches
            clock = Clock(loaded.model)
            what = "all cases" if len(scored) == len(cases) else f"{len(scored)} cases"
            post = _scores(loaded, scored, gen, cfg, f"{name}: {what}", generative) if edits else summary["pre"]
            curve.append(monitor.checkpoint(name, edits, own, len(cases), dict(zip(final, post))))
            final_seconds = clock.lap("final")  # the final scoring: the evaluation itself, not a checkpoint
            collapse = (
                collapse_point(curve, summary["pre_perplexity"], 1.0 if known else None, len(cases))
                if edits
                else {"edits": None, "text": "-"}
            )
            row = _method_row(
                kind,
                post,
                {
                    "edits": len(cases) if edits else 0,
                    "class": editor.method,
                    "layers": editor.layers,
                    "null_space": {str(layer): {"rank": r, "energy": e} for layer, (r, e) in editor.null_space.items()},
                    "anchor_reference": editor.anchor_reference,  # NAS's reference norm (None: no anchor)
                    "perplexity": curve[-1]["perplexity"],
                    "known_accuracy": curve[-1]["known_accuracy"],
                    "weight_change": curve[-1]["weight_change"],
                    "collapse_point": collapse["text"],
                    "collapse_edits": collapse["edits"],
                    "edit_seconds": seconds,
                    "checkpoint_seconds": checkpoint_seconds,
                    "final_seconds": final_seconds,
                    "edits_per_second": len(cases) / seconds if edits and seconds else None,
                    "timings": timings,
                    "environment": environment(next(loaded.model.parameters()).device),
                    "curve": curve,
                    "config": OmegaConf.to_container(conf, resolve=True),
                    "hparams": OmegaConf.to_container(
                        OmegaConf.masked_copy(
                            cfg.edit,
                            [
                                "layer",
                                "layers",
                                "variant",
                                "v",
                                "memit",
                                "alphaedit",
                                "ultraedit",
                                "nas",
                                "mom2_adjustment",
                            ],
                        ),
                        resolve=True,
                    ),
                },
            )
            write_json(out / "methods" / f"{name}.json", row)
            drop_progress(method_run.stem)
            summary = _assemble(
                out, identity, unedited, names, kind
            )  # with whatever other processes finished meanwhile
            with torch.no_grad():
                for layer, w in weights.items():
                    w.copy_(clean[layer])
            if not all(torch.equal(weights[layer], clean[layer]) for layer in layers):
                raise RuntimeError("the clean weights could not be restored")
            _write(out, summary, cfg, loaded, cases, len(skipped), records, read, batch_size)
            efficacy, paraphrase, specificity = SETS[kind]
            gen_es = row.get("generative", {}).get(f"{efficacy}_gen_em")
            means = {k: f"{v['mean']:.1f}" for k, v in row["metrics"].items()}
            bar.write(
                f"{name}: {LABELS[efficacy]} (tf) {means.get(efficacy, '-')}"
                + (f" {LABELS[efficacy]} (gen EM) {gen_es['mean']:.1f}" if gen_es else "")
                + f" {LABELS[paraphrase]} {means.get(paraphrase, '-')} "
                f"{LABELS[specificity]} {means.get(specificity, '-')} "
                f"ppl {row['perplexity']:.2f} known {100 * row['known_accuracy']:.1f}; "
                f"collapse: {row['collapse_point']}; time: edits {seconds:.0f} s, "
                f"checkpoints {checkpoint_seconds:.0f} s, final scoring {final_seconds:.0f} s"
            )
    finally:
        bar.close()
    summary = _assemble(out, identity, unedited, names, kind)
    _write(out, summary, cfg, loaded, cases, len(skipped), records, read, batch_size)
    table = scale_table(summary)
    print("\n" + table)
    print(f"results: {out}/ (summary.json, table.md, curve.png)")
    report_after_run(out, bool(cfg.report.after_run))
    return summary


def _assemble(out: Path, identity: dict, unedited: dict, names: list[str], kind: str) -> dict[str, Any]:
    """The run's summary from its parts: the unedited model's and one file per finished method (processes
    running other methods into the same eval.out each add theirs)."""
    methods = {p.stem: json.loads(p.read_text()) for p in sorted((out / "methods").glob("*.json"))}
    order = [m for m in names if m in methods] + sorted(m for m in methods if m not in names)
    return {
        "identity": identity,
        "kind": kind,
        "protocol": PROTOCOL[kind],
        "generative_protocol": GENERATIVE_PROTOCOL,
        **unedited,
        "methods": methods,
        "order": order,
    }


def _sample_words(cfg: DictConfig) -> str:
    n = int(cfg.eval.curve_cases)
    return f"at most {n}" if n else "all"


def dataclass_request(case: EvalCase) -> EditRequest:
    """The request an edit gets: the rewrite alone (paraphrases and neighbours are for scoring)."""
    return dataclasses.replace(case.request, paraphrases=(), neighbours=())


def _write(
    out: Path,
    summary: dict,
    cfg: DictConfig,
    loaded: LoadedModel,
    cases: list[EvalCase],
    n_skipped: int,
    records: range,
    read: int,
    batch_size: int,
) -> None:
    mode = str(cfg.eval.mode)
    how = f"sequential, batches of {batch_size}" if mode == "sequential" else f"all {len(cases)} edits in one batch"
    summary["title"] = (
        f"{dataset_title(summary['kind'], str(cfg.eval.zsre_target))}, {len(cases)} edits into one "
        f"{loaded.identity['name']} ({how}; "
        f"records {int(cfg.eval.start)}-{int(cfg.eval.start) + len(cases) + n_skipped - 1} of "  # skipped ones too
        f"{Path(cfg.eval.dataset).name}, {n_skipped} skipped"
        + (f"; {len(summary['pre'])} of them scored" if len(summary["pre"]) != len(cases) else "")
        + ")"
    )
    summary["notes"] = [
        (
            "every case is scored after the last batch (its edit has had every later edit applied on top)"
            if len(summary["pre"]) == len(cases)
            else f"after the last batch (and on the unedited model) {len(summary['pre'])} of the {len(cases)} cases "
            "are scored (eval.final_cases: evenly spaced in edit order, first and last included); each has had "
            "every later edit applied on top"
        ),
        f"ppl: perplexity on the last {len(records)} articles of {Path(cfg.data.files).name} (records "
        f"{records.start}-{records.stop - 1}, max {int(cfg.eval.heldout.max_length)} tokens each); "
        f"C read the first {read}",
        f"known facts: of the first {int(cfg.eval.known.n)} records of {Path(cfg.eval.known.dataset).name}"
        + (
            f", less the {len(summary['known_set_aside'])} about a subject this run edits,"
            if "known_set_aside" in summary
            else " (those about a subject this run edits included),"
        )
        + f" the {len(summary['known_facts'])} the unedited model answers; the share still answered",
        "ROME applies its edits one at a time",
        f"curve (after the first batch, every {int(cfg.eval.eval_every)} batch(es) and after the last): "
        + ("ES/PS/NS" if summary["kind"] == "counterfact" else "efficacy/paraphrase/specificity")
        + " (tf) and the generative "
        f"efficacy of {_sample_words(cfg)} of the cases edited so far (evenly spaced in edit order), without GE; "
        "held-out ppl, known facts and per edited layer ||W - W0|| / ||W0|| at the same checkpoints",
        f"collapse point: the first checkpoint where the held-out perplexity passes {PPL_FACTOR:g}x the unedited or "
        f"the known facts fall below {KNOWN_FACTOR:g}x the unedited",
    ]
    if changed := changed_edit_note(cfg):
        summary["notes"].insert(0, changed)
    pre = _method_row(
        summary["kind"],
        summary["pre"],
        {"edits": 0, "perplexity": summary["pre_perplexity"], "known_accuracy": 1.0, "edits_per_second": None},
    )
    summary["unedited"] = pre
    write_json(out / "summary.json", summary)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(scale_table(summary))
    curve_plot(summary, out / "curve.png")
