"""How far C, and the edit direction u = C⁻¹k, still move as tokens are added: the stats stage's convergence
readout, its plot and its hint.

At each readout (every doubling of a rank's token count, from ``stats.convergence.first_tokens``) the stage
records, per layer, the tokens so far, the relative change of C since the previous readout
(‖C_t − C_s‖_F / ‖C_t‖_F) and the relative change of u = C⁻¹k for a fixed set of probe keys (keys of the
first batch, drawn with the run's seed: the median over the probes of ‖u_t − u_s‖ / ‖u_t‖). Each
readout is a doubling of the data, so for an estimate whose error falls like 1/√tokens the changes fall by
about √2 per point, and a change below ``stats.convergence.threshold`` says that doubling the tokens moves
the edits' direction by less than that. Before C is positive definite (fewer tokens than its rank needs)
u is undefined and its change is recorded as null.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["Readout", "take_readout", "pick_probes", "converged_hint", "budget_verdict", "plot_convergence"]


@dataclasses.dataclass
class Readout:
    """One layer's state at a readout, kept (on the host, in the resumable state) for the next change."""

    tokens: int
    second_moment: torch.Tensor  # C, float32 on the host: a reference for the next change, not a result
    solutions: torch.Tensor | None  # C⁻¹ probesᵀ [d_ff, probes], float64 on the host; None: C not positive definite

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pick_probes(keys: torch.Tensor, tokens: int, n: int, seed: int) -> torch.Tensor:
    """``n`` rows of ``keys`` [tokens, d] drawn with ``seed`` (float32, on the host): fixed for the run."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(tokens, generator=g)[: min(n, tokens)]
    return keys.index_select(0, rows.to(keys.device)).float().cpu()


def _relative(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).norm() / new.norm().clamp_min(torch.finfo(new.dtype).tiny))


@torch.no_grad()
def take_readout(
    total: torch.Tensor, count: int, probes: torch.Tensor, previous: Readout | None
) -> tuple[Readout, dict[str, Any]]:
    """The readout at ``count`` tokens of a running total Σ k kᵀ, and its point for the manifest:
    {"tokens", "c_change", "u_change"} (changes None at the first readout or while C is singular)."""
    c = total.to(torch.float64) / count
    chol, info = torch.linalg.cholesky_ex(c)
    solutions = torch.cholesky_solve(probes.to(c).T, chol) if int(info) == 0 else None
    point: dict[str, Any] = {"tokens": int(count), "c_change": None, "u_change": None}
    if previous is not None:
        point["c_change"] = _relative(c, previous.second_moment.to(c))
        if solutions is not None and previous.solutions is not None:
            old = previous.solutions.to(solutions)
            per_probe = (solutions - old).norm(dim=0) / solutions.norm(dim=0).clamp_min(1e-300)
            point["u_change"] = float(per_probe.median())
    readout = Readout(int(count), c.float().cpu(), solutions.cpu() if solutions is not None else None)
    return readout, point


def converged_hint(curves: Mapping[int, Sequence[Mapping[str, Any]]], threshold: float, ranks: int = 1) -> str | None:
    """One line once every layer's latest change of u is under ``threshold``, else None. ``ranks``: the
    points count one rank's tokens of that many."""
    latest = [points[-2:] for points in curves.values() if len(points) >= 2]
    if (
        not curves
        or len(latest) < len(curves)
        or any(p[-1]["u_change"] is None or p[-1]["u_change"] >= threshold for p in latest)
    ):
        return None
    worst = max(p[-1]["u_change"] for p in latest)
    a, b = latest[0][0]["tokens"], latest[0][1]["tokens"]
    layers = ", ".join(map(str, sorted(curves)))
    where = "" if ranks == 1 else f" on rank 0 of {ranks}"
    return (
        f"stats: converged for editing: u = C⁻¹k moved at most {worst:.1%} from {a:,} to {b:,} tokens{where} "
        f"(layer {layers}; under stats.convergence.threshold={threshold:g}): more tokens will change edits little, "
        f'stats.tokens={b * ranks:,} would have done (docs/stats.md, "Convergence")'
    )


def budget_verdict(record: Mapping[str, Any] | None) -> tuple[bool | None, str]:
    """Whether one layer's token budget converged, and why, from its manifest entry's ``convergence`` record
    ({"points", "threshold", "ranks"}): True once u moved less than the threshold over the last doubling, False
    when it still moved more (with the budget the next doubling needs), None when there is no such change to
    judge (no readouts, fewer than two, or C not yet positive definite at the last)."""
    if not record:
        return None, "not measured (stats.convergence.probes=0, or statistics written before the readouts existed)"
    if not record.get("points"):
        return None, "not judged: no readout (fewer tokens read than stats.convergence.first_tokens)"
    points, threshold, ranks = record["points"], float(record["threshold"]), int(record.get("ranks", 1))
    last = points[-1]
    if len(points) < 2:
        return None, (
            f"not judged: one readout only, at {last['tokens'] * ranks:,} tokens (a change needs two: a budget of "
            "at least twice stats.convergence.first_tokens)"
        )
    if last["u_change"] is None:
        return None, (
            f"not judged: C was not yet invertible at {last['tokens'] * ranks:,} tokens (fewer tokens than its "
            "rank needs): raise stats.tokens"
        )
    a, b, change = points[-2]["tokens"] * ranks, last["tokens"] * ranks, float(last["u_change"])
    moved = f"u = C⁻¹k moved {change:.1%} from {a:,} to {b:,} tokens"
    if change < threshold:
        return True, f"converged: {moved}, under stats.convergence.threshold={threshold:g}"
    return False, (
        f"not converged: {moved}, over stats.convergence.threshold={threshold:g}: more tokens would still move "
        f"the edits' direction (stats.tokens={2 * b:,} for the next doubling; "
        "docs/stats.md#convergence-how-many-tokens)"
    )


def plot_convergence(
    curves: Mapping[int, Sequence[Mapping[str, Any]]],
    stem: Path,
    *,
    title: str,
    threshold: float,
    tokens_label: str = "tokens",
) -> list[Path]:
    """Relative change of C and of u per readout against tokens (log-log), one pair of lines per layer;
    ``stem``.png and .pdf, written atomically."""
    from rome.pipeline.core.figures import plt, save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (layer, points) in enumerate(sorted(curves.items())):
        color = f"C{i % 10}"
        for field, style, name in (("c_change", "--", "C"), ("u_change", "-", "u = C⁻¹k")):
            xs = [p["tokens"] for p in points if p[field] is not None]
            ys = [p[field] for p in points if p[field] is not None]
            if xs:
                ax.plot(xs, ys, style, marker="o", ms=3, color=color, label=f"layer {layer}: {name}")
    ax.axhline(threshold, color="grey", lw=0.8, ls=":", label=f"threshold {threshold:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(tokens_label)
    ax.set_ylabel("relative change since the previous readout (half the tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, stem)
