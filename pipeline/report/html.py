"""The report of an output directory, as one HTML page: what kind of directory it is (read from its files) and
the sections of each kind.

kinds (``detect_kind``):
  ``edit``          an edit ledger (``ledger.json``): every edit, its request, its checks, P(new) / P(true) before
                    and after, the greedy continuations before and after, the update's size and time; a batch
                    (MEMIT / AlphaEdit / UltraEdit): its requests and the update's size per layer;
  ``eval``          an eval.out of the per-case protocol (summary.json with its run record): table.md, chart.png,
                    every case's before/after scores and greedy answers, skipped cases, timing;
  ``eval_scale``    an eval.out of eval.mode=sequential|batch (summary.json with the unedited model's row):
                    table.md, curve.png, each method's checkpoints and per-layer weight change;
  ``trace_dataset`` a trace.out of trace.dataset (summary.json with the average indirect effects): the averages,
                    the AIE plots, the recommended layer, the traced facts, the first facts' heatmaps;
  ``trace``         a trace.out of single facts (directories with scores.npz): each fact's numbers and heatmaps.
The tables are rendered from the JSON and Markdown the stages wrote; nothing is recomputed."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rome.pipeline.core.atomic import atomic_path
from rome.pipeline.errors import UserError
from rome.pipeline.evaluation.generative import SETS
from rome.pipeline.evaluation.report import LABELS, generative_label, markdown_table
from rome.pipeline.evaluation.scale_report import scale_table
from rome.pipeline.report.page import MARKER, Section, figures, image, key_values, markdown, number, page, table, text
from rome.pipeline.tracing.engine import KINDS as TRACE_KINDS
from rome.pipeline.tracing.engine import TraceResult

__all__ = ["REPORT_FILE", "KINDS", "detect_kind", "render_report", "write_report", "report_after_run"]

REPORT_FILE = "report.html"
KINDS = ("edit", "eval", "eval_scale", "trace_dataset", "trace")
HEATMAP_FACTS = 3  # a dataset's heatmaps shown on the page (the rest stay in facts/: a page of 3000 images is useless)
SINGLE_FACTS = 30  # single traced facts whose heatmaps are shown (each adds ~150 kB of images)
SKIPPED_ROWS = 50  # skipped facts / cases listed on the page (all of them are in summary.json)
CASE_ROWS = 200  # cases listed with their before/after scores (all of them are in cases.jsonl)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} cannot be read as JSON ({err}); the report reads it as the stage wrote it") from None


def _fact_dirs(directory: Path) -> list[Path]:
    return sorted(p.parent for p in directory.glob("*/scores.npz"))


def detect_kind(directory: Path) -> str:
    """The kind of output ``directory`` holds (one of KINDS), from its files; else a UserError naming what a
    report reads."""
    if not directory.is_dir():
        raise UserError(f"report.dir={directory} is not a directory; name an eval.out, trace.out or edit.out")
    if (directory / "ledger.json").is_file():
        return "edit"
    summary_path = directory / "summary.json"
    if summary_path.is_file():
        summary = _json(summary_path)
        if isinstance(summary, dict) and "average_indirect_effect" in summary:
            return "trace_dataset"
        if isinstance(summary, dict) and "methods" in summary:
            return "eval_scale" if "unedited" in summary else "eval"
    if _fact_dirs(directory):
        return "trace"
    raise UserError(
        f"report.dir={directory} holds no output a report reads: expected an eval.out (summary.json), a trace.out "
        "(summary.json or fact directories with scores.npz) or an edit.out (ledger.json)"
    )


# ------------------------------------------------------------------------------------------------- eval


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _results(directory: Path, summary: dict, fallback: Callable[[dict], str]) -> Section:
    """table.md as the stage wrote it (or, when it is gone, the same table made from summary.json); its bold
    title line is the page's heading already."""
    path = directory / "table.md"
    source = path.read_text() if path.is_file() else fallback(summary)
    title_line = f"**{summary.get('title')}**"
    if source.startswith(title_line):
        source = source[len(title_line) :]
    return Section("results", "Results", markdown(source))


def _eval_sections(directory: Path) -> tuple[str, list[Section]]:
    summary = _json(directory / "summary.json")
    sections = [
        _results(directory, summary, markdown_table),
        Section("chart", "Chart", image(directory / "chart.png", "each metric per method, 95% CI")),
    ]
    cases = _case_records(directory)
    if cases:
        sections.append(_cases_section(cases, summary["kind"]))
        answers = _answers_section(cases, summary.get("order") or [])
        if answers is not None:
            sections.append(answers)
    skipped = summary.get("skipped") or []
    if skipped:
        rows = [(s.get("index"), s.get("case_id"), s.get("method") or "-", s.get("reason")) for s in skipped]
        sections.append(
            Section(
                "skipped",
                f"Skipped ({len(skipped)})",
                _first(rows, SKIPPED_ROWS, "summary.json")
                + table(["index", "case", "method", "reason"], rows[:SKIPPED_ROWS]),
            )
        )
    timing_path = directory / "timing.json"
    if timing_path.is_file():
        sections.append(_timing_section(_json(timing_path)))
    run = summary.get("run") or {}
    if run.get("identity"):
        sections.append(Section("run", "Run", _identity(run["identity"])))
    return summary.get("title", "eval"), sections


def _case_records(directory: Path) -> list[dict]:
    path = directory / "cases.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _case_scores(rec: dict, kind: str) -> list[str]:
    keys = ("es", "ps", "ns") if kind == "counterfact" else ("efficacy", "paraphrase", "specificity")
    pre, post = rec.get("pre") or {}, rec.get("post") or {}
    return [f"{_score(pre.get(k))} → {_score(post.get(k))}" for k in keys]


def _score(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.0f}"


def _cases_section(records: list[dict], kind: str) -> Section:
    """Each (case, method): the rewrite, the new and true targets, the case's scores before -> after."""
    names = ["ES", "PS", "NS"] if kind == "counterfact" else ["Efficacy", "Paraphrase", "Specificity"]
    rows = []
    for rec in records:
        req = rec.get("request") or {}
        prompt = str(req.get("prompt", "")).replace("{}", str(req.get("subject", "")))
        status = rec["status"] if rec.get("status") != "ok" else ""
        rows.append(
            [rec.get("index"), rec.get("method"), prompt, req.get("target_new"), req.get("target_true") or "-"]
            + (_case_scores(rec, kind) if rec.get("status") == "ok" else ["-"] * 3)
            + [status or "ok"]
        )
    head = ["case", "method", "prompt", "new", "true"] + [f"{n} before → after" for n in names] + ["status"]
    note = (
        '<p class="note">per case: the share (x100) of its prompts where the new target wins (NS: the true '
        "one), on the unedited model → after the method's edit</p>"
    )
    return Section(
        "cases",
        f"Cases ({len(records)})",
        note + _first(rows, CASE_ROWS, "cases.jsonl") + table(head, rows[:CASE_ROWS]),
    )


# the greedy answers' prompt groups, in the request's fields: (key prefix, label, where its prompts are)
ANSWER_GROUPS = (("es", "rewrite", None), ("ps", "paraphrase", "paraphrases"), ("ns", "neighbour", "neighbours"))


def _answers_section(records: list[dict], order: list[str]) -> Section | None:
    """The greedy continuations (eval.generative) per case and prompt: the unedited model's, then each
    method's after its edit; None when the run made none."""
    by_case: dict[int, dict[str, dict]] = {}
    for rec in records:
        if rec.get("status") == "ok" and (rec.get("greedy") or {}).get("pre"):
            by_case.setdefault(rec["index"], {})[rec["method"]] = rec
    if not by_case:
        return None
    methods = [m for m in order if any(m in per for per in by_case.values())]
    rows = []
    for index, per in by_case.items():
        first = next(iter(per.values()))
        req, pre = first.get("request") or {}, first["greedy"]["pre"]
        prompts = {"es": [str(req.get("prompt", "")).replace("{}", str(req.get("subject", "")))]}
        for key, _, field in ANSWER_GROUPS[1:]:
            prompts[key] = list(req.get(field) or [])
        for key, label, _ in ANSWER_GROUPS:
            for form in ("gen", "chat"):
                for i, before in enumerate(pre.get(f"{key}_{form}") or []):
                    prompt = prompts[key][i] if i < len(prompts[key]) else ""
                    after = [
                        _at(((per.get(m) or {}).get("greedy") or {}).get("post") or {}, f"{key}_{form}", i)
                        for m in methods
                    ]
                    rows.append(
                        [index, f"{label} ({form})", prompt, before, *[a if a is not None else "-" for a in after]]
                    )
    head = ["case", "prompt kind", "prompt", "unedited"] + [f"after {m}" for m in methods]
    note = (
        '<p class="note">greedy continuations (eval.generative), as scored: gen = the prompt continued, chat = '
        "asked through the chat template; the new target should follow the rewrite and paraphrase prompts, the "
        "true one the neighbours</p>"
    )
    return Section(
        "answers",
        "Answers before and after",
        note + _first(rows, CASE_ROWS, "cases.jsonl") + table(head, rows[:CASE_ROWS]),
    )


def _first(rows: list, limit: int, where: str) -> str:
    if len(rows) <= limit:
        return ""
    return f'<p class="note">the first {limit} of {len(rows)}; all of them are in {text(where)}</p>'


def _timing_section(timing: dict) -> Section:
    this = timing.get("this_run") or {}
    parts = key_values(
        [
            ("cases this run", this.get("cases")),
            ("seconds this run", number(this.get("seconds"), 1)),
            ("cases per hour", number(this.get("cases_per_hour"), 1)),
        ]
    )
    per = timing.get("by_method_all_runs") or {}
    if per:
        steps = sorted({k for t in per.values() for k in t if k != "cases"})
        rows = [[name, t.get("cases")] + [t.get(k) for k in steps] for name, t in per.items()]
        parts += table(["method", "cases"] + [f"{k} s" for k in steps], rows, digits=2)
    return Section("timing", "Timing", parts)


def _identity(identity: dict) -> str:
    """A run's identity (what its numbers depend on) as a table; nested settings as compact JSON."""
    pairs = []
    for key, value in identity.items():
        if isinstance(value, dict) and set(value) <= {"name", "revision"}:
            value = " ".join(str(v) for v in value.values() if v)
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True)
        pairs.append((key, value))
    return key_values(pairs)


def curve_keys(kind: str) -> list[tuple[str, str]]:
    """A checkpoint's scores for a dataset kind, as (key of a curve point, column head): S (CounterFact), the
    three teacher-forced scores, and the generative efficacy."""
    efficacy = SETS[kind][0]
    tf = [("s", "S")] if kind == "counterfact" else []
    tf += [(k, LABELS[k]) for k in SETS[kind]]
    return [(k, f"{label} (tf)") for k, label in tf] + [(f"{efficacy}_gen_em", generative_label(f"{efficacy}_gen_em"))]


def _scale_sections(directory: Path) -> tuple[str, list[Section]]:
    summary = _json(directory / "summary.json")
    sections = [
        _results(directory, summary, scale_table),
        Section("curve", "Curve", image(directory / "curve.png", "the collapse monitor against the number of edits")),
    ]
    parts = []
    keys = curve_keys(summary.get("kind", "counterfact"))
    for name in summary.get("order", []):
        m = summary["methods"][name]
        curve = m.get("curve") or []
        rows = []
        for p in curve:
            change = p.get("weight_change") or {}
            rows.append(
                [p.get("edits"), p.get("cases")]
                + [p.get(k) for k, _ in keys]
                + [p.get("perplexity"), _pct(p.get("known_accuracy")), max(change.values()) if change else None]
            )
        head = ["edits", "cases scored"] + [label for _, label in keys]
        head += ["ppl", "known facts %", "max ||W - W0|| / ||W0||"]
        collapse = m.get("collapse_point", "-")
        parts.append(
            f"<h3>{text(name)}</h3>"
            f'<p class="note">layers {text(", ".join(map(str, m.get("layers") or [])) or "-")}; '
            f"collapse point: {text(collapse)}</p>"
            + (table(head, rows, digits=[0, 0] + [1] * len(keys) + [2, 1, 4]) if rows else "<p>(no checkpoint)</p>")
        )
        change = m.get("weight_change") or {}
        if change:
            layers = sorted(change, key=int)
            parts.append(
                table(
                    ["after the last edit"] + [f"layer {la}" for la in layers],
                    [["||W - W0|| / ||W0||"] + [change[la] for la in layers]],
                )
            )
    if parts:
        sections.append(Section("checkpoints", "Checkpoints", "".join(parts)))
    if summary.get("identity"):
        sections.append(Section("run", "Run", _identity(summary["identity"])))
    return summary.get("title", "eval"), sections


# ------------------------------------------------------------------------------------------------ trace


def _load_fact(fact_dir: Path) -> tuple[TraceResult, dict]:
    try:
        return TraceResult.load(fact_dir / "scores.npz")
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{fact_dir / 'scores.npz'} cannot be read ({err}); trace the fact again") from None


def _peak(effect: np.ndarray, tokens: list[str]) -> str:
    tok, layer = np.unravel_index(int(np.argmax(effect)), effect.shape)
    return f"{effect[tok, layer]:+.3f} at {tokens[tok]!r}, layer {layer}"


def _fact_block(fact_dir: Path, res: TraceResult, meta: dict) -> str:
    subject = (meta.get("settings") or {}).get("subject", "")
    kinds = list(res.effects)
    numbers = key_values(
        [
            ("prompt", meta.get("prompt", "".join(res.tokens))),
            ("subject", subject),
            ("answer", res.answer.strip()),
            ("P(answer) clean", res.p_clean),
            ("P(answer) corrupted", res.p_corrupted),
            ("total effect", res.total_effect),
            ("noise ν, samples, window", f"{res.noise:.4f}, {res.samples}, {res.window}"),
        ]
        + [(f"largest {kind} effect", _peak(res.effects[kind], res.tokens)) for kind in kinds]
    )
    pictures = [image(fact_dir / f"{kind}.png", f"{kind}: P(answer) restored - corrupted") for kind in kinds]
    if not any((fact_dir / f"{kind}.png").is_file() for kind in kinds):
        pictures = ['<p class="note">(no heatmaps: traced with trace.plots=false)</p>']
    return f'<h3 id="{text(fact_dir.name)}">{text(fact_dir.name)}</h3>{numbers}{figures(pictures)}'


def _facts_table(loaded: list[tuple[Path, TraceResult, dict]]) -> str:
    rows = [
        [
            d.name,
            (meta.get("settings") or {}).get("subject", ""),
            meta.get("prompt", ""),
            res.answer.strip(),
            res.p_clean,
            res.p_corrupted,
            res.total_effect,
        ]
        for d, res, meta in loaded
    ]
    return table(["fact", "subject", "prompt", "answer", "P clean", "P corrupted", "total effect"], rows)


def _trace_sections(directory: Path) -> tuple[str, list[Section]]:
    loaded = [(d, *_load_fact(d)) for d in _fact_dirs(directory)]
    sections = [Section("facts", f"Facts ({len(loaded)})", _facts_table(loaded))]
    shown = "".join(_fact_block(d, r, m) for d, r, m in loaded[:SINGLE_FACTS])
    sections.append(Section("heatmaps", "Heatmaps", _first(loaded, SINGLE_FACTS, "the fact directories") + shown))
    model = (loaded[0][2].get("settings") or {}).get("model", {}).get("name", "")
    return f"Causal trace: {len(loaded)} fact(s), {model}", sections


def _trace_dataset_sections(directory: Path) -> tuple[str, list[Section]]:
    s = _json(directory / "summary.json")
    model = s.get("model") or {}
    layer = s.get("recommended_layer")
    overview = key_values(
        [
            ("model", " ".join(str(v) for v in model.values() if v)),
            (
                "dataset",
                f"{s.get('dataset')} (records {s.get('start')} to {s.get('start', 0) + s.get('records', 0) - 1})",
            ),
            ("facts known and traced", f"{s.get('known')} of {s.get('records')}"),
            ("mean P(answer) clean", s.get("mean_p_clean")),
            ("mean P(answer) corrupted", s.get("mean_p_corrupted")),
            ("mean total effect", s.get("mean_total_effect")),
            ("noise ν, samples, window", f"{s.get('noise', 0):.4f}, {s.get('samples')}, {s.get('window')}"),
            ("averaging (trace.aie)", s.get("aie")),
            ("recommended edit layer", layer),
            ("rule", s.get("recommendation_rule")),
            ("seconds", s.get("seconds")),
        ]
    )
    kinds = sorted(s.get("average_indirect_effect") or {}, key=TRACE_KINDS.index)  # summary.json sorts its keys
    plots = [image(directory / f"aie_{kind}.png", f"average indirect effect, {kind}") for kind in kinds]
    plots.append(image(directory / "aie_lines.png", "per-bucket lines with 95% CI"))
    effect = s.get("mlp_effect_at_last_subject_token") or []
    per_layer = table(
        ["layer", "average MLP effect at the last subject token"],
        [[i, v] for i, v in enumerate(effect)],
        highlight=[layer] if isinstance(layer, int) else [],
    )
    sections = [
        Section("overview", "Overview", overview),
        Section("aie", "Average indirect effects", figures(plots)),
        Section("layer", "Recommended layer", per_layer),
    ]
    fact_dirs = _fact_dirs(directory / "facts")
    if fact_dirs:
        loaded = [(d, *_load_fact(d)) for d in fact_dirs]
        shown = "".join(_fact_block(d, r, m) for d, r, m in loaded[:HEATMAP_FACTS])
        sections.append(Section("facts", f"Facts ({len(loaded)})", _facts_table(loaded)))
        sections.append(Section("heatmaps", "Heatmaps", _first(loaded, HEATMAP_FACTS, "facts/") + shown))
    skipped = s.get("skipped") or []
    if skipped:
        rows = [(x.get("id"), x.get("subject"), x.get("reason")) for x in skipped]
        sections.append(
            Section(
                "skipped",
                f"Skipped ({len(skipped)})",
                _first(rows, SKIPPED_ROWS, "summary.json") + table(["id", "subject", "reason"], rows[:SKIPPED_ROWS]),
            )
        )
    return f"Causal trace of {s.get('known')} facts, {model.get('name', '')}", sections


# ------------------------------------------------------------------------------------------------- edit


def _probs_table(probs: dict) -> str:
    """P(true) and P(new) before and after, per prompt (the prompt, its paraphrases, the neighbours); for a
    rolled-back edit also what the rejected edit gave (``after`` is then the restored model)."""
    pre, post, rejected = probs.get("pre") or {}, probs.get("post") or {}, probs.get("rejected") or {}
    head = ["prompts", "P(true) before", "P(true) after", "P(new) before", "P(new) after"]
    if rejected:
        head += ["P(true) rejected edit", "P(new) rejected edit"]
    rows = []
    for group in ("prompt", "paraphrases", "neighbours"):
        b, a, r = pre.get(group) or {}, post.get(group) or {}, rejected.get(group) or {}
        for i in range(len(b.get("new", []))):
            row = [group if i == 0 else "", _at(b, "true", i), _at(a, "true", i), _at(b, "new", i), _at(a, "new", i)]
            rows.append(row + ([_at(r, "true", i), _at(r, "new", i)] if rejected else []))
    return table(head, rows) if rows else ""


WHEN = (("pre", "before"), ("post", "after"), ("rejected", "the rejected edit"))


def _at(group: dict, which: str, i: int) -> float | None:
    values = group.get(which)
    return values[i] if values and i < len(values) else None


def _request_line(req: dict, own_answer: bool = False) -> str:
    prompt = str(req.get("prompt", "")).replace("{}", str(req.get("subject", "")))
    own = ", the model's own answer" if own_answer else ""
    was = f" (was {req['target_true']}{own})" if req.get("target_true") else ""
    return f"{prompt} → {req.get('target_new')}{was}"


def _entry_block(entry: dict) -> str:
    """One ledger entry: a ROME edit (its request, checks, probabilities, continuations) or a MEMIT /
    AlphaEdit / UltraEdit batch (its requests with the P(new) their target value reached, per layer
    the update's size)."""
    status = str(entry.get("status", ""))
    requests = _requests(entry)
    own = bool(entry.get("true_from_model"))
    head = (
        f'<h3 id="edit-{text(entry.get("id"))}">edit {text(entry.get("id"))}: {text(entry.get("method", "rome"))} '
        f'<span class="status-{text(status)}">{text(status)}</span></h3>'
    )
    parts = [head]
    norms = entry.get("norms") or {}
    facts: list[tuple[str, object]] = []
    if entry.get("kind") == "batch":
        targets = entry.get("p_target") or []
        checks = (entry.get("verification") or {}).get("checks") or []
        owns = [c.get("true_from_model") for c in checks] + [None] * (len(requests) - len(checks))
        rows = [
            [
                i,
                _request_line({**r, "target_true": own} if own else r, bool(own)),
                targets[i] if i < len(targets) else None,
            ]
            for i, (r, own) in enumerate(zip(requests, owns))
        ]
        parts.append(_first(rows, CASE_ROWS, "ledger.json"))
        parts.append(table(["#", "request", "P(new) its target value reached"], rows[:CASE_ROWS]))
        layers = [str(la) for la in entry.get("layers") or []]
        if layers:
            updates = [(norms.get(la) or {}).get("relative_update") for la in layers]
            parts.append(table(["layer", *layers], [["‖ΔW‖ / ‖W‖", *updates]]))
    else:
        parts.append(f"<p>{text(_request_line(requests[0], own) if requests else '-')}</p>")
        facts.append(("layer", entry.get("layer")))
        if "relative_update" in norms:
            facts.append(("‖ΔW‖ / ‖W‖", norms["relative_update"]))
        if "verified" in entry:
            facts.append(("verified", "yes" if entry["verified"] else "no"))
        check = (entry.get("checks") or [{}])[0]
        if check.get("said_after") is not None:
            facts.append(("the model says after", check["said_after"]))
        if check.get("said_in_chat") is not None:
            facts.append(("asked through its chat template", check["said_in_chat"]))
    if entry.get("reason"):
        facts.append(("reason", entry["reason"]))
    for warning in entry.get("warnings") or []:
        facts.append(("warning", warning))
    timings = entry.get("timings") or {}
    if timings:
        facts.append(("time (s)", ", ".join(f"{k} {v:.2f}" for k, v in timings.items())))
    parts.append(key_values(facts))
    parts.append(_probs_table(entry.get("probs") or {}))
    generations = entry.get("generations") or {}
    if generations and requests:
        prompt = _request_line(requests[0]).split(" → ")[0]
        rows = [[label, prompt + str(generations[when])] for when, label in WHEN if when in generations]
        parts.append(table(["", "greedy continuation"], rows))
    return "".join(parts)


def _edit_sections(directory: Path) -> tuple[str, list[Section]]:
    ledger = _json(directory / "ledger.json")
    entries = ledger.get("entries") or []
    model = ledger.get("model") or {}
    counts: dict[str, int] = {}
    for e in entries:
        counts[str(e.get("status"))] = counts.get(str(e.get("status")), 0) + 1
    overview = key_values(
        [
            ("model", " ".join(str(v) for v in model.values() if v)),
            ("dtype", ledger.get("model_dtype")),
            ("edits", f"{len(entries)} (" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")"),
            ("saved to", ledger.get("saved_to") or "-"),
        ]
    )
    rows = []
    for e in entries:
        requests = _requests(e)
        shown = "; ".join(map(_request_line, requests[:2])) + (f"; ... ({len(requests)})" if len(requests) > 2 else "")
        rows.append([e.get("id"), e.get("method", "rome"), e.get("status"), shown])
    sections = [
        Section("overview", "Overview", overview + table(["edit", "method", "status", "request(s)"], rows)),
        Section("edits", "Edits", "".join(_entry_block(e) for e in entries) or "<p>(no edit recorded)</p>"),
    ]
    return f"Edit ledger: {len(entries)} edit(s), {model.get('name', '')}", sections


def _requests(entry: dict) -> list[dict]:
    return entry.get("requests") or ([entry["request"]] if "request" in entry else [])


# ------------------------------------------------------------------------------------------------ write

_SECTIONS = {
    "edit": _edit_sections,
    "eval": _eval_sections,
    "eval_scale": _scale_sections,
    "trace_dataset": _trace_dataset_sections,
    "trace": _trace_sections,
}


def render_report(directory: str | Path) -> str:
    """The HTML page of the output in ``directory`` (its kind detected from its files)."""
    directory = Path(directory)
    kind = detect_kind(directory)
    title, sections = _SECTIONS[kind](directory)
    when = datetime.datetime.now().isoformat(timespec="seconds")
    return page(title, f"{kind} output in {directory.resolve()}, reported {when}", sections)


def _ours(path: Path) -> bool:
    """Whether ``path`` is a page this project wrote (its marker within the first lines)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return MARKER in f.read(512)
    except OSError:
        return False


def write_report(directory: str | Path, out: str | Path | None = None) -> Path:
    """Render the report of ``directory`` into ``out`` (default ``directory/report.html``), atomically; a file
    already at ``out`` is replaced only when it is a report this project wrote."""
    directory = Path(directory).expanduser()
    path = Path(out).expanduser() if out else directory / REPORT_FILE
    if path.is_dir():
        raise UserError(f"report.out={path} is a directory; name the HTML file to write, e.g. {path / REPORT_FILE}")
    if path.exists() and not _ours(path):
        raise UserError(
            f"{path} exists and is not a report this project wrote; nothing was touched: name another report.out"
        )
    document = render_report(directory)
    with atomic_path(path) as tmp:
        tmp.write_text(document, encoding="utf-8")
    return path


def report_after_run(directory: str | Path, enabled: bool) -> Path | None:
    """The report a stage writes into its output at the end (``report.after_run``): a failure is one warning
    line, never the run's failure (its results are written already)."""
    if not enabled:
        return None
    try:
        path = write_report(directory)
    except Exception as err:  # noqa: BLE001  (whatever went wrong, the run's own results stand)
        print(f"warning: no report written ({type(err).__name__}: {err}); the results are in {directory}")
        return None
    print(f"report: {path}")
    return path
