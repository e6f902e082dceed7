"""Reports of a many-edit evaluation: the table (Markdown) and the curve of the metrics of the cases edited so
far against the number of edits (PNG), the plot people look at first."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_path
from pipeline.evaluation.report import LABELS

__all__ = ["scale_table", "curve_plot"]


def _cell(stat: Mapping[str, Any] | None) -> str:
    if not stat:
        return "-"
    return f"{stat['mean']:.1f}" + (f" ± {stat['ci95']:.1f}" if stat.get("ci95") is not None else "")


def scale_table(summary: Mapping[str, Any]) -> str:
    """One row per method: the CounterFact metrics over every case after the last edit, fluency, held-out
    perplexity, known-fact accuracy and edit throughput."""
    cols = ["es", "ps", "ns", "em", "pm", "nm", "ge"]
    head = ["Method", "edits", "S"] + [LABELS[k] for k in cols] + ["ppl", "known facts", "edits/s"]
    lines = [f"**{summary['title']}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = ([("unedited", summary["unedited"])] if "unedited" in summary else []) + [
        (name, summary["methods"][name]) for name in summary["order"]
    ]
    for name, m in rows:
        cells = [name, str(m["edits"]), f"{m['s']:.1f}" if m.get("s") is not None else "-"]
        cells += [_cell(m["metrics"].get(k)) for k in cols]
        cells += [
            f"{m['perplexity']:.2f}",
            f"{100 * m['known_accuracy']:.1f}",
            f"{m['edits_per_second']:.3f}" if m.get("edits_per_second") else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Protocol: {summary['protocol']}.", ""] + [f"- {n}" for n in summary.get("notes", [])] + [""]
    return "\n".join(lines)


def curve_plot(summary: Mapping[str, Any], path: str | Path) -> None:
    """ES, PS, NS of the cases edited so far and the score S, against the number of edits, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["s", "es", "ps", "ns"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), sharex=True)
    for ax, key in zip(axes, keys):
        for name in summary["order"]:
            curve = summary["methods"][name].get("curve") or []
            if curve:
                ax.plot([p["edits"] for p in curve], [p[key] for p in curve], marker="o", markersize=3, label=name)
        ax.set_title(
            LABELS[key] + (" (harmonic mean of ES, PS, NS)" if key == "s" else " of the cases edited so far"),
            fontsize=9,
        )
        ax.set_xlabel("edits applied")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(summary["title"], fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
