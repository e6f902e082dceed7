"""The average indirect effect over many traced facts (the paper's Figure 2): the six token buckets, the
averages and their confidence intervals (the paper's protocol and a per-fact one), and the edit layer
they recommend."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rome.pipeline.errors import UserError
from rome.pipeline.tracing.engine import TraceResult

__all__ = ["BUCKETS", "AIE_MODES", "bucket_rows", "average_effects", "recommend_layer"]

BUCKETS = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
AIE_MODES = ("paper", "per_fact")


def bucket_rows(grid: np.ndarray, subject: tuple[int, int]) -> list[np.ndarray]:
    """A [tokens, layers] grid split into the six token buckets of the paper's Figure 2: each bucket's
    rows [its tokens, layers] (the middle and further buckets may have 0 or several tokens, the others one).
    As ROME's notebook, one token can sit in two buckets (a one-token subject is first and last)."""
    first, end = subject
    last_subj, last = end - 1, grid.shape[0] - 1
    return [
        grid[first : first + 1],
        grid[first + 1 : last_subj],
        grid[last_subj : last_subj + 1],
        grid[end : end + 1] if end <= last else grid[:0],
        grid[end + 1 : last],
        grid[last : last + 1],
    ]


def average_effects(results: Sequence[TraceResult], *, mode: str) -> dict[str, dict[str, np.ndarray]]:
    """Per kind: the average indirect effect [buckets, layers], its 95% confidence half-width, the number
    of facts with each bucket and the rows averaged in it.  ``mode``: one of AIE_MODES (trace.aie).

    ``paper`` (ROME's notebooks/average_causal_effects.ipynb): the restored probabilities P(answer |
    corrupted, restored) of every token of a bucket are pooled over the facts (a fact with three middle
    subject tokens adds three rows), averaged, and the mean corrupted probability over all facts is
    subtracted; CI = 1.96 x the std of the pooled probabilities / sqrt(facts), as the notebook draws it (its
    heatmaps then clip the averages at 0: recipes/trace.py does when plotting). ``per_fact``: each fact's
    bucket is the mean of its tokens' effects (P(restored) - its own P(corrupted)), averaged over the facts
    that have the bucket, CI = 1.96 standard errors. The two give the same averages on the one-token
    buckets (first and last subject token, first subsequent token, last token): the recommended layer is
    the same; they differ on the middle-subject and further-token rows and in the CIs."""
    if not results:
        raise UserError("no traced facts to average")
    if mode not in AIE_MODES:
        raise UserError(f"trace.aie={mode} is not one of {', '.join(AIE_MODES)}")
    out = {}
    low = float(np.mean([r.p_corrupted for r in results]))
    for kind in results[0].effects:
        rows: list[list[np.ndarray]] = [[] for _ in BUCKETS]
        facts = np.zeros(len(BUCKETS), dtype=int)
        for r in results:
            # paper: back to restored probabilities, so the pooled rows are what the notebook averages
            grid = r.effects[kind] + r.p_corrupted if mode == "paper" else r.effects[kind]
            for b, v in enumerate(bucket_rows(grid, r.subject)):
                if len(v):
                    facts[b] += 1
                    rows[b].append(v if mode == "paper" else v.mean(axis=0, keepdims=True))
        n_layers = results[0].effects[kind].shape[1]
        mean, ci = np.full((len(BUCKETS), n_layers), np.nan), np.full((len(BUCKETS), n_layers), np.nan)
        for b, vs in enumerate(rows):
            if not vs:
                continue
            a = np.concatenate(vs)
            if mode == "paper":
                mean[b] = a.mean(axis=0) - low
                ci[b] = 1.96 * a.std(axis=0) / np.sqrt(len(results))
            else:
                mean[b] = a.mean(axis=0)
                ci[b] = 1.96 * a.std(axis=0, ddof=1) / np.sqrt(len(a)) if len(a) > 1 else np.nan
        out[kind] = {"mean": mean, "ci95": ci, "count": facts, "rows": np.array([sum(map(len, v)) for v in rows])}
    return out


def recommend_layer(aie: dict[str, dict[str, np.ndarray]]) -> int:
    """The edit layer: where the average MLP effect at the last subject token is largest."""
    if "mlp" not in aie:
        raise UserError("the layer recommendation needs the mlp kind: keep mlp in trace.kinds")
    return int(np.nanargmax(aie["mlp"]["mean"][BUCKETS.index("last subject token")]))
