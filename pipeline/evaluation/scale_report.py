"""Reports of a many-edit evaluation: the tables (Markdown: teacher-forced and generative), the collapse
monitor's curve against the number of edits (PNG, the plot people look at first), and the collapse rule.

Collapse point: the first checkpoint where the held-out perplexity passes ``PPL_FACTOR`` x the unedited model's,
or the known-fact accuracy falls below ``KNOWN_FACTOR`` x the unedited model's (the rule is part of the
protocol, so its thresholds live here with it, and every report states them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rome.pipeline.core.atomic import atomic_path
from rome.pipeline.evaluation.report import LABELS, METRICS, generative_label, generative_table, stat_cell

__all__ = [
    "scale_table",
    "curve_plot",
    "merge_runs",
    "collapse_point",
    "curve_sample",
    "PPL_FACTOR",
    "KNOWN_FACTOR",
]

PPL_FACTOR = 2.0  # collapse: held-out perplexity above this multiple of the unedited model's
KNOWN_FACTOR = 0.5  # collapse: known-fact accuracy below this share of the unedited model's


def collapse_point(
    curve: Sequence[Mapping[str, Any]], unedited_ppl: float, unedited_known: float | None, n_edits: int
) -> dict[str, Any]:
    """{"edits": the first checkpoint's edit count where perplexity > 2x ``unedited_ppl`` or known-fact
    accuracy < 0.5x ``unedited_known`` (a NaN perplexity counts as past it; ``unedited_known`` None: the
    unedited model knew none of the facts, so that criterion is off), "text": what happened} or
    {"edits": None, "text": "none within N edits"}."""
    for p in sorted(curve, key=lambda p: p["edits"]):
        why = []
        ppl = p.get("perplexity")
        if ppl is not None and (math.isnan(ppl) or ppl > PPL_FACTOR * unedited_ppl):
            why.append(f"held-out perplexity {ppl:.2f} > {PPL_FACTOR:g}x the unedited {unedited_ppl:.2f}")
        known = p.get("known_accuracy")
        if known is not None and unedited_known is not None and known < KNOWN_FACTOR * unedited_known:
            why.append(f"known facts {100 * known:.1f}% < {KNOWN_FACTOR:g}x the unedited {100 * unedited_known:.1f}%")
        if why:
            return {"edits": int(p["edits"]), "text": f"after {p['edits']} edits: {'; '.join(why)}"}
    return {"edits": None, "text": f"none within {n_edits} edits"}


def curve_sample(n_done: int, k: int | None) -> list[int]:
    """Which of the ``n_done`` cases edited so far a checkpoint scores: all (``k`` None or >= n_done), else
    ``k`` evenly spaced in edit order, first and last included (early edits, which later ones may overwrite,
    and recent ones alike)."""
    if k is None or k >= n_done:
        return list(range(n_done))
    if k == 1:
        return [n_done - 1]
    return sorted({round(i * (n_done - 1) / (k - 1)) for i in range(k)})


def _rows(summary: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return ([("unedited", summary["unedited"])] if "unedited" in summary else []) + [
        (name, summary["methods"][name]) for name in summary["order"]
    ]


def scale_table(summary: Mapping[str, Any]) -> str:
    """One row per method: the teacher-forced metrics over every case after the last edit (columns marked
    "(tf)": CounterFact's S, ES, PS, NS, EM, PM, NM and GE; zsRE's efficacy, paraphrase and specificity),
    held-out perplexity, known-fact accuracy, the collapse point and edit throughput; then the generative scores
    ("(gen ...)" columns)."""
    kind = summary.get("kind", "counterfact")
    counterfact = kind == "counterfact"
    cols = ["es", "ps", "ns", "em", "pm", "nm"] if counterfact else list(METRICS[kind])
    head = ["Method", "edits"] + (["S (tf)"] if counterfact else []) + [f"{LABELS[k]} (tf)" for k in cols]
    head += (["GE"] if counterfact else []) + ["ppl", "known facts", "collapse point", "edits/s"]
    lines = [f"**{summary['title']}**", "", "Teacher-forced (tf), the paper's protocol, and retention:", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = _rows(summary)
    for name, m in rows:
        cells = [name, str(m["edits"])] + ([f"{m['s']:.1f}" if m.get("s") is not None else "-"] if counterfact else [])
        cells += [stat_cell(m["metrics"].get(k)) for k in cols + (["ge"] if counterfact else [])]
        cells += [
            f"{m['perplexity']:.2f}",
            f"{100 * m['known_accuracy']:.1f}",
            m.get("collapse_point", "-") if name != "unedited" else "-",
            f"{m['edits_per_second']:.3f}" if m.get("edits_per_second") else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Protocol: {summary['protocol']}.", ""]
    gen = generative_table(kind, dict(rows), first="edits")
    if gen:
        lines += [gen, f"Protocol: {summary.get('generative_protocol', '')}.", ""]
    lines += [f"- {n}" for n in summary.get("notes", [])] + [""]
    return "\n".join(lines)


# the curve's panels per dataset kind: (key of a curve point, title, y-limits or None)
_RETENTION = [
    ("perplexity", "held-out perplexity", None),
    ("known_accuracy", "known facts still answered (%)", (-2, 102)),
    ("weight_change", "||W - W0|| / ||W0|| per edited layer", None),
]
PANELS = {
    "counterfact": [
        ("s", "S (tf): harmonic mean of ES, PS, NS", (-2, 102)),
        ("es", "ES (tf)", (-2, 102)),
        ("ps", "PS (tf)", (-2, 102)),
        ("ns", "NS (tf)", (-2, 102)),
        ("es_gen_em", generative_label("es_gen_em"), (-2, 102)),
        ("es_gen_contains", generative_label("es_gen_contains"), (-2, 102)),
        *_RETENTION,
    ],
    "zsre": [
        ("efficacy", "Efficacy (tf token accuracy)", (-2, 102)),
        ("paraphrase", "Paraphrase (tf token accuracy)", (-2, 102)),
        ("specificity", "Specificity (tf token accuracy)", (-2, 102)),
        ("efficacy_gen_em", generative_label("efficacy_gen_em"), (-2, 102)),
        ("efficacy_gen_contains", generative_label("efficacy_gen_contains"), (-2, 102)),
        *_RETENTION,
    ],
}


def merge_runs(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One summary of several sequential runs' ``summary.json`` (``{label: summary}``), for one curve: each
    run's edited methods under ``<method> (<label>)``. The runs must share the model and the held-out and
    known-facts checks (the unedited references drawn once); a mismatch is an error, not a silent overlay. Where
    the runs' known facts differ (each sets aside those about a subject it edits), the title gives each run's count."""
    if not runs:
        raise ValueError("no runs to merge")
    first = next(iter(runs.values()))
    same = ("model", "heldout", "known")
    for label, run in runs.items():
        differs = [k for k in same if run["identity"].get(k) != first["identity"].get(k)]
        if run.get("kind", "counterfact") != first.get("kind", "counterfact"):
            differs.append("dataset kind")
        if differs:
            raise ValueError(f"run {label} differs from the first in {', '.join(differs)}: not one curve")
    methods, order = {}, []
    for label, run in runs.items():
        for name in run["order"]:
            if run["methods"][name].get("edits"):
                methods[f"{name} ({label})"] = run["methods"][name]
                order.append(f"{name} ({label})")
    # runs of different lengths set aside different facts (those about a subject each edits): say how many each kept
    sets = {tuple(run.get("known_facts", ())) for run in runs.values()}
    kept = lambda run: f" (known facts: {len(run.get('known_facts', ()))})" if len(sets) > 1 else ""  # noqa: E731
    runs_text = "\n".join(f"{label}: {run['title']}{kept(run)}" for label, run in runs.items())  # a line per run
    return {
        "methods": methods,
        "order": order,
        "pre_perplexity": first.get("pre_perplexity"),
        "title": runs_text,
        "kind": first.get("kind", "counterfact"),
    }


def curve_plot(summary: Mapping[str, Any], path: str | Path, log_x: bool = False) -> None:
    """The collapse monitor against the number of edits, one line per method (per layer for the weight
    change): teacher-forced S/ES/PS/NS and generative efficacy of the sampled cases edited so far, held-out
    perplexity (unedited and 2x drawn), known facts (100% and 50% drawn); a method's collapse point dotted.
    ``log_x``: edits on a log scale (runs of 300 and 10,000 edits side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [(n, summary["methods"][n]) for n in summary["order"] if summary["methods"][n].get("curve")]
    fig, axes = plt.subplots(3, 3, figsize=(13, 10), sharex=True)
    pre_ppl = summary.get("pre_perplexity")
    panels = PANELS[summary.get("kind", "counterfact")]
    for ax in axes.flat[len(panels) :]:
        ax.set_axis_off()
    for ax, (key, title, ylim) in zip(axes.flat, panels):
        for j, (name, m) in enumerate(methods):
            color = f"C{j}"
            curve = m["curve"]
            xs = [p["edits"] for p in curve]
            if key == "weight_change":
                for layer in sorted({la for p in curve for la in p.get(key, {})}, key=int):
                    ys = [p.get(key, {}).get(layer, math.nan) for p in curve]
                    ax.plot(xs, ys, marker="o", markersize=3, color=color, alpha=0.5 + 0.5 / (1 + int(layer) % 3))
                    ax.annotate(f"L{layer}", (xs[-1], ys[-1]), fontsize=6, color=color)
            else:
                scale = 100 if key == "known_accuracy" else 1
                ys = [scale * p[key] if p.get(key) is not None else math.nan for p in curve]
                ax.plot(xs, ys, marker="o", markersize=3, color=color, label=name)
            if m.get("collapse_edits") is not None:
                ax.axvline(m["collapse_edits"], color=color, linestyle=":", linewidth=1)
        if key == "perplexity" and pre_ppl:
            ax.axhline(pre_ppl, color="grey", linewidth=0.8, linestyle="--", label="unedited")
            ax.axhline(PPL_FACTOR * pre_ppl, color="red", linewidth=0.8, linestyle="--", label="collapse")
            ax.set_yscale("log")
        if key == "known_accuracy":
            ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
            ax.axhline(100 * KNOWN_FACTOR, color="red", linewidth=0.8, linestyle="--")
        ax.set_title(title, fontsize=9)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("edits applied" + (" (log scale)" if log_x else ""))
    if log_x:
        axes.flat[0].set_xscale("log")  # shared x: every panel
    axes.flat[0].legend(fontsize=8)
    lines = summary["title"].split("\n")  # a merged curve's title: a line per run, each within the figure's width
    fig.suptitle(summary["title"], fontsize=9 if max(map(len, lines)) < 180 else 7)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.018 * len(lines)))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
