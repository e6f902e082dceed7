"""Recipe: ``python train.py stage=trace`` -- causal tracing of one fact or of a file of known facts.

    python train.py stage=trace prompt="{} is located in the city of" subject="The Eiffel Tower"
    python train.py stage=trace trace.dataset=../shared/data/known_1000.json trace.n=200

1. load the model; the noise level nu (trace.noise, else 3 sigma of the subjects' embeddings, cached);
2. the facts: prompt/subject(/answer), or trace.n records of trace.dataset from trace.start of which only
   those the model predicts correctly are kept;
3. trace each fact (batched), write its scores.npz and three heatmaps (PNG + PDF, titled with the prompt, the
   answer, P(clean) and P(corrupted); a fact below ``trace.low_p_clean`` is flagged) into its directory;
4. over a dataset: the average indirect effects (summary.json, Figure-2 heatmaps, line plots with 95%
   confidence intervals) and the recommended edit layer (recommendation.json, and the per-model record
   that ``edit.layer=auto`` reads).
A SIGTERM / SIGINT stops after the fact in progress (over a dataset) or abandons the one fact being traced;
traced facts are kept, and the same command resumes from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from rome.pipeline.core.atomic import atomic_dir, write_json
from rome.pipeline.core.digest import slug, text_digest
from rome.pipeline.core.loading import LoadedModel, cache_root, load_configured
from rome.pipeline.core.outputs import claim_output_dir
from rome.pipeline.core.probability import answer_tokens, greedy_tokens, predicts
from rome.pipeline.core.signals import check_stop
from rome.pipeline.core.subject import fill_prompt
from rome.pipeline.core.timing import Clock
from rome.pipeline.errors import UserError
from rome.pipeline.report import report_after_run
from rome.pipeline.tracing.aie import AIE_MODES, BUCKETS, average_effects, recommend_layer
from rome.pipeline.tracing.engine import KINDS, TraceResult, trace_fact
from rome.pipeline.tracing.facts import Fact, load_facts
from rome.pipeline.tracing.noise import subject_noise
from rome.pipeline.tracing.plots import plot_average, plot_fact, plot_lines
from rome.pipeline.tracing.prompt import make_prompt
from rome.pipeline.tracing.recommendation import save_recommendation


def _check(cfg: DictConfig) -> None:
    t = cfg.trace
    kinds = list(t.kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise UserError(f"trace.kinds={kinds} must be a non-empty list of {', '.join(KINDS)}")
    for key in ("samples", "window", "batch_size"):
        if not isinstance(t[key], int) or t[key] <= 0:
            raise UserError(f"trace.{key}={t[key]} must be a positive integer")
    if t.aie not in AIE_MODES:
        raise UserError(f"trace.aie={t.aie} is not one of {', '.join(AIE_MODES)}")
    if t.noise is not None and (not isinstance(t.noise, (int, float)) or t.noise < 0):
        raise UserError(f"trace.noise={t.noise} must be a non-negative number (or null for 3 sigma)")
    single = cfg.prompt is not None or cfg.subject is not None
    if single and t.dataset is not None:
        raise UserError("give either prompt=... subject=... (one fact) or trace.dataset=... (many), not both")
    if not single and t.dataset is None:
        raise UserError(
            'nothing to trace: pass prompt="{} is located in the city of" subject="The Eiffel Tower" '
            "or trace.dataset=../shared/data/known_1000.json"
        )
    if single and (not cfg.prompt or not cfg.subject):
        raise UserError("one fact needs both prompt=... and subject=...")
    if t.dataset is not None and "mlp" not in kinds:  # judged here, not after hours of tracing
        raise UserError(
            f"trace.dataset needs the mlp kind (the layer recommendation reads the MLP effects): trace.kinds={kinds}; "
            "add mlp, e.g. trace.kinds=[mlp] or [hidden,mlp,attn]"
        )


def _noise(cfg: DictConfig, loaded: LoadedModel) -> float:
    if cfg.trace.noise is not None:
        return float(cfg.trace.noise)
    level, path = subject_noise(
        loaded.model,
        loaded.spec,
        loaded.tokenizer,
        loaded.identity,
        cfg.trace.noise_subjects,
        cache_root(cfg),
        factor=float(cfg.trace.noise_factor),
    )
    print(f"noise: nu = {level:.4f} ({cfg.trace.noise_factor} x the subject-embedding std, {path})")
    return level


def _settings(cfg: DictConfig, loaded: LoadedModel, noise: float, seed: int, fact: dict) -> dict:
    """Everything a fact's scores depend on: an existing directory with the same settings is reused."""
    t = cfg.trace
    return {
        "model": loaded.identity,
        "dtype": cfg.model.dtype,
        "noise": noise,
        "samples": t.samples,
        "window": t.window,
        "seed": seed,
        "kinds": list(t.kinds),
        **fact,
    }


def _trace(
    cfg: DictConfig,
    loaded: LoadedModel,
    fact_dir: Path,
    prompt: str,
    subject: str,
    answer_id: int,
    noise: float,
    seed: int,
    settings: dict,
    progress: bool = False,
) -> TraceResult:
    """Trace one fact into ``fact_dir`` (scores.npz + heatmaps, written as a whole), or reuse it.
    ``progress``: a bar over the fact's cells (one fact alone takes minutes on a CPU); a stop request then
    abandons the fact, with nothing written."""
    scores = fact_dir / "scores.npz"
    t = cfg.trace
    if scores.exists():
        res, meta = TraceResult.load(scores)
        if meta.get("settings") == json.loads(json.dumps(settings)):
            _warn_low(res, float(t.low_p_clean))
            return res
    p = make_prompt(loaded.tokenizer, prompt, subject, answer_id)
    bar, on_chunk = None, None
    if progress:
        n_layers = loaded.spec.num_layers(loaded.model)
        cells = (p.input_ids.shape[1] - p.subject[0]) * n_layers * len(t.kinds)
        bar = tqdm(total=cells, desc="trace", unit="cell", dynamic_ncols=True)

        def on_chunk(n: int) -> None:
            bar.update(n)
            check_stop("the fact was not finished and nothing was written; to trace it, run the same command")

    clock = Clock(loaded.model)
    try:
        res = trace_fact(
            loaded.model,
            loaded.spec,
            p,
            noise=noise,
            samples=t.samples,
            seed=seed,
            kinds=list(t.kinds),
            window=t.window,
            batch_size=t.batch_size,
            progress=on_chunk,
        )
    finally:
        if bar is not None:
            bar.close()
    seconds = clock.lap("trace")
    with atomic_dir(fact_dir) as tmp:
        res.save(tmp / "scores.npz", settings=settings, prompt=p.text, seconds=seconds)
        if t.plots:
            for kind in res.effects:
                plot_fact(res, kind, tmp / kind, model_name=str(cfg.model.name), low_p_clean=float(t.low_p_clean))
    _warn_low(res, float(t.low_p_clean))
    return res


def _warn_low(res: TraceResult, threshold: float) -> None:
    if res.p_clean < threshold:
        tqdm.write(
            f"warning: P({res.answer.strip()}) is only {res.p_clean:.4f} on the clean prompt "
            f"'{''.join(res.tokens).strip()}' (below trace.low_p_clean={threshold:g}): the model does not "
            "predict this answer, and the effects are noise (the heatmaps say so)"
        )


def _peaks(res: TraceResult) -> str:
    parts = []
    for kind, eff in res.effects.items():
        tok, layer = np.unravel_index(int(np.argmax(eff)), eff.shape)
        parts.append(f"{kind} {eff[tok, layer]:+.3f} at token {tok} ({res.tokens[tok]!r}), layer {layer}")
    return "; ".join(parts)


def trace_one(cfg: DictConfig, loaded: LoadedModel, noise: float) -> TraceResult:
    tok, model = loaded.tokenizer, loaded.model
    text = fill_prompt(cfg.prompt, cfg.subject)[0]
    ids = torch.tensor([tok(text)["input_ids"]])
    greedy = greedy_tokens(model, ids, 1)[0]
    if cfg.answer is None:
        word = tok.decode([greedy])
        if greedy in tok.all_special_ids or not any(ch.isalnum() for ch in word):
            raise UserError(
                f"the model does not know this fact: after '{text}' it predicts {word!r}, not an "
                "answer; pass answer=... to trace a given answer"
            )
        answer_id = greedy
    else:
        answer_id = answer_tokens(tok, text, str(cfg.answer))[0]
        if answer_id != greedy:
            print(
                f"note: the model predicts {tok.decode([greedy])!r}, not {tok.decode([answer_id])!r}; "
                f"tracing p({tok.decode([answer_id]).strip()}) as asked"
            )
    out = Path(cfg.trace.out)
    key = text_digest(f"{text}\0{cfg.subject}\0{answer_id}")
    fact_dir = out / f"{slug(cfg.subject)}-{key}"
    settings = _settings(
        cfg, loaded, noise, int(cfg.seed), {"prompt": text, "subject": cfg.subject, "answer_id": answer_id}
    )
    res = _trace(
        cfg, loaded, fact_dir, cfg.prompt, cfg.subject, answer_id, noise, int(cfg.seed), settings, progress=True
    )
    print(
        f"p({res.answer.strip()}): clean {res.p_clean:.4f}, corrupted {res.p_corrupted:.4f}, "
        f"total effect {res.total_effect:+.4f}"
    )
    print(f"largest effects: {_peaks(res)}")
    print(f"scores and heatmaps: {fact_dir}")
    return res


def _known(loaded: LoadedModel, fact: Fact) -> tuple[bool, str, int]:
    text = fill_prompt(fact.prompt, fact.subject)[0]
    known, got = predicts(loaded.model, loaded.tokenizer, text, fact.answer)
    return known, got, answer_tokens(loaded.tokenizer, text, fact.answer)[0]


def trace_dataset(cfg: DictConfig, loaded: LoadedModel, noise: float, facts: list[Fact]) -> dict:
    t = cfg.trace
    out = Path(t.out)
    results: list[TraceResult] = []
    skipped: list[dict] = []
    clock = Clock(loaded.model)
    bar = tqdm(facts, desc="trace", unit="fact", dynamic_ncols=True)
    for fact in bar:
        check_stop(f"{len(results)} fact(s) traced so far are kept in {out / 'facts'}; to resume, run the same command")
        try:
            known, got, answer_id = _known(loaded, fact)
        except UserError as err:  # e.g. the subject is not in the prompt: skip, say why
            skipped.append({"id": fact.id, "subject": fact.subject, "reason": str(err)})
            continue
        if not known:
            skipped.append(
                {"id": fact.id, "subject": fact.subject, "reason": f"the model predicts {got!r}, not {fact.answer!r}"}
            )
            continue
        seed = int(cfg.seed) + fact.index  # the fact's own noise, whatever else is traced
        settings = _settings(
            cfg, loaded, noise, seed, {"prompt": fact.prompt, "subject": fact.subject, "answer": fact.answer}
        )
        fact_dir = out / "facts" / f"{fact.id}-{slug(fact.subject)}"
        results.append(_trace(cfg, loaded, fact_dir, fact.prompt, fact.subject, answer_id, noise, seed, settings))
        bar.set_postfix(kept=len(results), skipped=len(skipped))
    bar.close()
    seconds = clock.lap("trace")
    some = ", ".join(s["subject"] for s in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    print(
        f"kept {len(results)} of {len(facts)} facts: the model predicts the answer of those "
        f"(skipped {len(skipped)}: {some})"
    )
    if not results:
        raise UserError(f"the model knows none of the {len(facts)} facts in {t.dataset}; nothing to average")
    return _summarise(cfg, loaded, noise, results, skipped, len(facts), seconds)


def _json_array(a: np.ndarray) -> list:
    """Nested lists with None for NaN (a bucket no fact has, a CI over one fact): strict JSON."""
    return [[None if np.isnan(x) else float(x) for x in row] for row in a]


def _summarise(
    cfg: DictConfig,
    loaded: LoadedModel,
    noise: float,
    results: list[TraceResult],
    skipped: list[dict],
    n_records: int,
    seconds: float,
) -> dict:
    t, out = cfg.trace, Path(cfg.trace.out)
    aie = average_effects(results, mode=str(t.aie))
    layer = recommend_layer(aie)
    last_subj = aie["mlp"]["mean"][BUCKETS.index("last subject token")]
    name = str(cfg.model.name)
    summary = {
        "model": loaded.identity,
        "dataset": str(t.dataset),
        "start": int(t.start),
        "records": n_records,
        "known": len(results),
        "skipped": skipped,
        "noise": noise,
        "samples": t.samples,
        "window": t.window,
        "seed": int(cfg.seed),
        "mean_p_clean": float(np.mean([r.p_clean for r in results])),
        "mean_p_corrupted": float(np.mean([r.p_corrupted for r in results])),
        "mean_total_effect": float(np.mean([r.total_effect for r in results])),
        "buckets": list(BUCKETS),
        "aie": str(t.aie),
        "average_indirect_effect": {
            k: {
                "mean": _json_array(v["mean"]),
                "ci95": _json_array(v["ci95"]),
                "facts_per_bucket": v["count"].tolist(),
                "rows_per_bucket": v["rows"].tolist(),
            }
            for k, v in aie.items()
        },
        "recommended_layer": layer,
        "recommendation_rule": "argmax over layers of the average MLP effect at the last subject token",
        "mlp_effect_at_last_subject_token": last_subj.tolist(),
        "seconds": seconds,
    }
    write_json(out / "summary.json", summary)
    # the paper's heatmaps clip the averages at 0 (its line plot does not)
    drawn = {k: {**v, "mean": np.clip(v["mean"], 0, None)} for k, v in aie.items()} if t.aie == "paper" else aie
    for kind in aie:
        plot_average(drawn, kind, out / f"aie_{kind}", len(results), name)
    plot_lines(aie, out / "aie_lines", len(results), name)
    write_json(
        out / "recommendation.json",
        {
            "layer": layer,
            "model": loaded.identity,
            "n_facts": len(results),
            "summary": str((out / "summary.json").resolve()),
        },
    )
    record = save_recommendation(cache_root(cfg), loaded.identity, layer, len(results), out / "summary.json")
    print(f"mean p(answer): clean {summary['mean_p_clean']:.4f}, corrupted {summary['mean_p_corrupted']:.4f}")
    print(
        f"recommended edit layer: {layer} (largest average MLP effect at the last subject token, "
        f"{last_subj[layer]:+.4f}); recorded in {record}"
    )
    print(f"summary and average-effect plots: {out}")
    return summary


def _earlier_trace(out: Path) -> bool:
    """An output directory an earlier version of the trace stage wrote (before the marker): fact directories
    with their scores, the dataset's facts/ and summary, the plots."""
    names = {"facts", "summary.json", "cases"}
    return all(
        p.name in names or p.suffix in (".png", ".pdf") or (p.is_dir() and (p / "scores.npz").exists())
        for p in out.iterdir()
        if not p.name.startswith(".")
    )


def run(cfg: DictConfig) -> TraceResult | dict:
    _check(cfg)
    t = cfg.trace
    facts = None if t.dataset is None else load_facts(t.dataset, t.n, t.start)  # a bad file: said before loading
    claim_output_dir(t.out, "trace.out", ours=_earlier_trace)  # before any work: never another's directory
    torch.manual_seed(cfg.seed)
    loaded = load_configured(cfg.model)
    noise = _noise(cfg, loaded)
    result = trace_one(cfg, loaded, noise) if facts is None else trace_dataset(cfg, loaded, noise, facts)
    report_after_run(cfg.trace.out, bool(cfg.report.after_run))
    return result
