"""The evaluation's summary (JSON), its tables (Markdown: the paper's teacher-forced metrics like its Table 4,
then the generative ones) and a bar chart (PNG)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rome.pipeline.core.atomic import atomic_path
from rome.pipeline.evaluation.generative import metric_keys
from rome.pipeline.evaluation.metrics import harmonic_mean, mean_ci

__all__ = [
    "METRICS",
    "GENERATIVE",
    "PROTOCOL",
    "GENERATIVE_PROTOCOL",
    "TF_CAPTION",
    "summarize",
    "markdown_table",
    "generative_table",
    "generative_label",
    "stat_cell",
    "bar_chart",
    "earlier_eval_output",
    "error_bars",
]

# column order of the table, per dataset kind; every value is x100
METRICS = {
    "counterfact": ["es", "em", "ps", "pm", "ns", "nm", "ge", "rs"],
    "zsre": ["efficacy", "paraphrase", "specificity"],
}
LABELS = {
    "es": "ES",
    "em": "EM",
    "ps": "PS",
    "pm": "PM",
    "ns": "NS",
    "nm": "NM",
    "ge": "GE",
    "rs": "RS",
    "s": "S",
    "efficacy": "Efficacy",
    "paraphrase": "Paraphrase",
    "specificity": "Specificity",
}
# the generative metrics (pipeline.evaluation.generative), kept apart from the paper's in the summary
GENERATIVE = {kind: metric_keys(kind) for kind in METRICS}
_FORM = {"gen": "gen", "chat": "chat"}
_SCORE = {"em": "EM", "contains": "contains"}


def generative_label(key: str) -> str:
    """``es_gen_em`` -> "ES (gen EM)", ``specificity_chat_contains`` -> "Specificity (chat contains)"."""
    base, form, score = key.rsplit("_", 2)
    return f"{LABELS[base]} ({_FORM[form]} {_SCORE[score]})"


TF_CAPTION = "Teacher-forced (tf), the paper's protocol:"
GENERATIVE_PROTOCOL = (
    "generative (gen): the model continues each prompt GREEDILY (no teacher forcing, no truncation to the "
    "target's length; at most eval.generative.max_tokens new tokens, cut at the first newline and then after "
    "the first sentence end); text and target lower-cased, whitespace collapsed, leading quotes/markup "
    "stripped; EM (here exact match, not the paper's efficacy magnitude) = the continuation, a leading a/an/the "
    "removed, starts with the target as a whole word, contains = the target occurs in "
    "it as a whole word; ES/PS: the new object on the rewrite/paraphrase prompts, NS: the true object on the "
    "neighbourhood prompts (zsRE: efficacy, paraphrase, specificity likewise); chat: the same prompts asked "
    "through the tokenizer's chat template (a leading echo of the prompt removed from the reply); x100 "
    "(share of prompts, averaged per case, then over cases), 95% CI"
)
PROTOCOL = {
    "counterfact": (
        "paper (Meng et al. 2022): P(x|p) = exp(mean log-prob of the tokens of ' '+x after p); "
        "ES/PS = mean [P(new) > P(true)] on the rewrite/paraphrase prompts, EM/PM = mean (P(new) - P(true)); "
        "NS = mean [P(true) > P(new)], NM = mean (P(true) - P(new)) on the neighbourhood prompts; "
        "S = harmonic mean of ES, PS, NS; GE = (2/3 H2 + 4/3 H3)/2 of word n-grams of the generated texts; "
        "RS = TF-IDF cosine to the reference snippets; all x100, 95% CI (normal approximation)"
    ),
    "zsre": (
        "paper (zsRE, as ROME): teacher-forced top-1 accuracy of the answer's tokens; efficacy and paraphrase "
        "on the new answer, specificity on the neighbourhood question's answer; x100, 95% CI"
    ),
}


def _stat(values: Sequence[float]) -> dict[str, Any]:
    m, ci = mean_ci(values)
    return {"mean": 100 * m, "ci95": None if math.isnan(ci) else 100 * ci, "n": len(values)}


def summarize(
    kind: str, values: Mapping[str, Mapping[str, Sequence[float]]], counts: Mapping[str, int]
) -> dict[str, Any]:
    """``values[method][metric]`` = per-case values in case order -> {method: {"n", "metrics", "s",
    "generative"}}: "metrics" the paper's (teacher-forced), "generative" the greedy-generation scores."""
    out = {}
    for method, per_metric in values.items():
        metrics = {k: _stat(per_metric[k]) for k in METRICS[kind] if per_metric.get(k)}
        row: dict[str, Any] = {"n": counts.get(method, 0), "metrics": metrics}
        generative = {k: _stat(per_metric[k]) for k in GENERATIVE[kind] if per_metric.get(k)}
        if generative:
            row["generative"] = generative
        if kind == "counterfact" and all(k in metrics for k in ("es", "ps", "ns")):
            row["s"] = harmonic_mean([metrics[k]["mean"] for k in ("es", "ps", "ns")])
        out[method] = row
    return out


def stat_cell(stat: Mapping[str, Any] | None) -> str:
    """A table cell: the mean and its 95% interval ("-" where the metric was not measured)."""
    if not stat:
        return "-"
    return f"{stat['mean']:.1f}" + (f" ± {stat['ci95']:.1f}" if stat.get("ci95") is not None else "")


def _methods(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The rows in ``eval.methods`` order (summary.json stores its keys sorted)."""
    return {name: summary["methods"][name] for name in summary.get("order", summary["methods"])}


def markdown_table(summary: Mapping[str, Any]) -> str:
    kind, methods = summary["kind"], _methods(summary)
    cols = [k for k in METRICS[kind] if any(k in m["metrics"] for m in methods.values())]
    head = ["Method", "n"] + (["S"] if kind == "counterfact" else []) + [LABELS[k] for k in cols]
    lines = [f"**{summary['title']}**", "", TF_CAPTION, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        cells = [name, str(m["n"])] + ([f"{m['s']:.1f}" if "s" in m else "-"] if kind == "counterfact" else [])
        lines.append("| " + " | ".join(cells + [stat_cell(m["metrics"].get(k)) for k in cols]) + " |")
    lines += ["", f"Protocol: {summary['protocol']}.", ""]
    gen = generative_table(kind, methods)
    if gen:
        lines += [gen, f"Protocol: {summary.get('generative_protocol', GENERATIVE_PROTOCOL)}.", ""]
    if summary.get("notes"):
        lines += [f"- {n}" for n in summary["notes"]] + [""]
    return "\n".join(lines)


def generative_table(kind: str, rows: Mapping[str, Mapping[str, Any]], first: str = "n") -> str:
    """The generative scores of ``rows`` (name -> summary row) as a Markdown table, columns named with their
    protocol ("ES (gen EM)", ...); "" when no row has any. ``first``: the count column ("n" or "edits")."""
    cols = [k for k in GENERATIVE[kind] if any(k in (m.get("generative") or {}) for m in rows.values())]
    if not cols:
        return ""
    head = ["Method", first] + [generative_label(k) for k in cols]
    lines = ["Generative (gen), greedy continuations:", "", "| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * len(head))
    for name, m in rows.items():
        cells = [name, str(m.get(first, m.get("n", "-")))] + [
            stat_cell((m.get("generative") or {}).get(k)) for k in cols
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


BOUNDED = {"es", "ps", "ns", "rs", "efficacy", "paraphrase", "specificity"}  # rates (x100): within [0, 100]


def error_bars(mean: float, ci: float | None, key: str) -> tuple[float, float]:
    """(below, above) the bar for a 95% interval: a rate's interval is clipped to [0, 100] (the normal
    approximation runs past them at small n); signed margins (EM, PM, NM) and GE are drawn as computed."""
    ci = ci or 0.0
    if (key not in BOUNDED and key not in _ALL_GENERATIVE) or math.isnan(mean):
        return ci, ci
    return mean - max(0.0, mean - ci), min(100.0, mean + ci) - mean


_ALL_GENERATIVE = {k for keys in GENERATIVE.values() for k in keys}  # rates too


def _stats(row: Mapping[str, Any]) -> dict[str, Any]:
    """A summary row's statistics, the paper's and the generative ones."""
    return {**row["metrics"], **(row.get("generative") or {})}


def bar_chart(summary: Mapping[str, Any], path: str | Path) -> None:
    """Methods side by side per metric, with 95% CI error bars (rates clipped to [0, 100]); rates, magnitudes
    and the generative exact match in separate panels; each method's n in the legend, and on a bar whose n
    differs from it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind, methods = summary["kind"], _methods(summary)
    panels = [["s", "es", "ps", "ns"], ["em", "pm", "nm"], ["ge"]] if kind == "counterfact" else [METRICS["zsre"]]
    panels.append([k for k in GENERATIVE[kind] if k.endswith("_em")])  # the generative exact match, last
    panels = [[k for k in p if k == "s" or any(k in _stats(m) for m in methods.values())] for p in panels]
    panels = [p for p in panels if p]
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(4 + 3 * sum(map(len, panels)) / 2, 4),
        gridspec_kw={"width_ratios": [len(p) for p in panels]},
        squeeze=False,
    )
    width = 0.8 / max(1, len(methods))
    for ax, keys in zip(axes[0], panels):
        for j, (name, m) in enumerate(methods.items()):
            vals, below, above, ns = [], [], [], []
            for k in keys:
                stat = {"mean": m.get("s", math.nan), "ci95": None} if k == "s" else _stats(m).get(k, {})
                vals.append(stat.get("mean", math.nan))
                lo, hi = error_bars(vals[-1], stat.get("ci95"), k)
                below.append(lo)
                above.append(hi)
                ns.append(stat.get("n", m["n"]))
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(keys))]
            ax.bar(xs, vals, width, yerr=[below, above], capsize=2, label=f"{name} (n={m['n']})")
            for x, v, n in zip(xs, vals, ns):
                if n != m["n"] and not math.isnan(v):
                    ax.annotate(f"n={n}", (x, v), ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(keys)), [LABELS[k] if k in LABELS else generative_label(k) for k in keys])
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(summary["title"], fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def earlier_eval_output(out: Path) -> bool:
    """An ``eval.out`` an earlier version wrote (before the output marker): only the files the eval stages write."""
    names = {
        "run.json",
        "cases.jsonl",
        "summary.json",
        "table.md",
        "chart.png",
        "timing.json",
        "unedited.json",
        "curve.png",
        "methods",
    }
    return all(p.name in names or p.name.startswith(("cases.rank", ".")) for p in Path(out).iterdir())
