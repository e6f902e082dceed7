"""Causal-tracing figures in the style of the paper: per-fact heatmaps (its Figure 1) and the average
indirect effect over many facts (its Figure 2), each saved as PNG and PDF (written atomically)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rome.pipeline.core.figures import plt, save_figure
from rome.pipeline.tracing.aie import BUCKETS
from rome.pipeline.tracing.engine import TraceResult

__all__ = ["fact_title", "plot_fact", "plot_average", "plot_lines"]

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
COLORS = {"hidden": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
NAMES = {"hidden": "single restored layer", "mlp": "MLP", "attn": "Attn"}


def _xticks(ax: plt.Axes, n_layers: int) -> None:
    ticks = list(range(0, n_layers, 5))
    ax.set_xticks([t + 0.5 for t in ticks])
    ax.set_xticklabels(ticks)


def fact_title(res: TraceResult, low_p_clean: float) -> str:
    """What a fact's heatmap shows: the prompt, the answer, P(clean) and P(corrupted); a fact the model
    barely predicts (P(clean) < ``low_p_clean``, trace.low_p_clean) is flagged, since its colour scale then
    spans noise."""
    prompt = "".join(res.tokens).strip()
    title = f"{prompt} -> {res.answer.strip()}\nP(clean) {res.p_clean:.3f}, P(corrupted) {res.p_corrupted:.3f}"
    if res.p_clean < low_p_clean:
        title += f"\nLOW P(clean) < {low_p_clean:g}: the model does not predict this answer; effects are noise"
    return title


def plot_fact(res: TraceResult, kind: str, stem: Path, *, model_name: str, low_p_clean: float) -> list[Path]:
    """One fact, one kind: P(answer) with each state restored, tokens x layers.  As in the paper, the
    colour scale starts at the corrupted probability, so white means 'no effect'; subject tokens get *.
    The title names the fact and its clean and corrupted probabilities (``fact_title``)."""
    probs = res.effects[kind] + res.p_corrupted
    labels = [f"{t}*" if res.subject[0] <= i < res.subject[1] else t for i, t in enumerate(res.tokens)]
    fig, ax = plt.subplots(figsize=(3.5, 0.25 * len(labels) + 0.8))
    h = ax.pcolor(probs, cmap=CMAPS[kind], vmin=res.p_corrupted, vmax=max(res.p_clean, probs.max()))
    ax.invert_yaxis()
    ax.set_yticks([i + 0.5 for i in range(len(labels))])
    ax.set_yticklabels([repr(label)[1:-1] for label in labels], fontsize=7)
    _xticks(ax, probs.shape[1])
    head = fact_title(res, low_p_clean)
    low = res.p_clean < low_p_clean
    if kind == "hidden":
        ax.set_title(
            f"{head}\nImpact of restoring state after corrupted input", fontsize=7, color="tab:red" if low else "black"
        )
        ax.set_xlabel(f"single restored layer within {model_name}", fontsize=7)
    else:
        ax.set_title(
            f"{head}\nImpact of restoring {NAMES[kind]} after corrupted input",
            fontsize=7,
            color="tab:red" if low else "black",
        )
        ax.set_xlabel(f"center of interval of {res.window} restored {NAMES[kind]} layers", fontsize=7)
    cb = fig.colorbar(h)
    cb.ax.set_title(f"p({res.answer.strip()})", y=-0.12, fontsize=7)
    return save_figure(fig, stem)


def plot_average(aie: dict, kind: str, stem: Path, n_facts: int, model_name: str) -> list[Path]:
    """Figure 2 style: the average indirect effect of one kind, token buckets x layers."""
    mean = aie[kind]["mean"]
    fig, ax = plt.subplots(figsize=(4.2, 2.0))
    h = ax.pcolor(np.ma.masked_invalid(mean), cmap=CMAPS[kind], vmin=min(0.0, np.nanmin(mean)))
    ax.invert_yaxis()
    ax.set_yticks([i + 0.5 for i in range(len(BUCKETS))])
    ax.set_yticklabels([b.capitalize() for b in BUCKETS], fontsize=7)
    _xticks(ax, mean.shape[1])
    what = "a single restored layer" if kind == "hidden" else f"restored {NAMES[kind]} (window centre)"
    ax.set_title(f"Average indirect effect of {what}\n{model_name}, {n_facts} known facts", fontsize=8)
    ax.set_xlabel("layer", fontsize=7)
    cb = fig.colorbar(h)
    cb.ax.set_title("AIE", fontsize=7)
    return save_figure(fig, stem)


def plot_lines(
    aie: dict, stem: Path, n_facts: int, model_name: str, buckets: Sequence[str] = ("last subject token", "last token")
) -> list[Path]:
    """The average indirect effect across layers at chosen token buckets, one line per kind, with a
    shaded 95% confidence interval."""
    fig, axes = plt.subplots(
        1, len(buckets), figsize=(4.0 * len(buckets), 2.8), sharey=True, layout="constrained"
    )  # keeps the suptitle clear of the panel titles
    for ax, bucket in zip(np.atleast_1d(axes), buckets):
        b = BUCKETS.index(bucket)
        for kind in aie:
            mean, ci = aie[kind]["mean"][b], aie[kind]["ci95"][b]
            layers = np.arange(len(mean))
            ax.plot(layers, mean, color=COLORS[kind], label=NAMES[kind] if kind != "hidden" else "hidden state")
            ax.fill_between(layers, mean - ci, mean + ci, color=COLORS[kind], alpha=0.2, linewidth=0)
        ax.axhline(0, color="0.6", linewidth=0.5)
        ax.set_title(f"AIE at the {bucket}", fontsize=9)
        ax.set_xlabel("layer (window centre for MLP / Attn)", fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("average indirect effect", fontsize=8)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(f"{model_name}, {n_facts} known facts (shaded: 95% CI)", fontsize=9)
    return save_figure(fig, stem)
