"""The reference for the batched engine, not used by the trace stage: ROME's plain method, one forward pass
per (token, layer) cell, every token run, nothing reused.  The tests and benchmarks/trace_speed.py compare
``pipeline.tracing.engine.trace_fact`` against it (which is why it lives here and not under tests/: the
benchmark cannot import the tests)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from rome.pipeline.core.arch import ArchSpec
from rome.pipeline.core.hooks import TraceDict
from rome.pipeline.core.timing import model_device
from rome.pipeline.tracing.engine import TraceResult, answer_prob, restored_names
from rome.pipeline.tracing.noise import add_noise, fact_noise
from rome.pipeline.tracing.prompt import FactPrompt

__all__ = ["trace_with_patch", "trace_fact_per_cell"]


@torch.inference_mode()
def trace_with_patch(
    model: nn.Module, spec: ArchSpec, p: FactPrompt, noise: torch.Tensor, restore: Sequence[tuple[int, str]]
) -> tuple[float, float]:
    """ROME's ``trace_with_patch``: one pass over [clean row, noise samples...]; the outputs of the
    modules in ``restore`` ((token, module name) pairs) are copied from the clean row into the corrupted
    rows.  Full logits at every position, as the original.  Returns (P(clean), P(corrupted, restored))."""
    samples = noise.shape[0]
    ids = p.input_ids.to(model_device(model)).expand(samples + 1, -1)
    by_name: dict[str, list[int]] = {}
    for tok, name in restore:
        by_name.setdefault(name, []).append(tok)

    def edit(h: torch.Tensor, name: str) -> torch.Tensor:
        if name == spec.embed:
            h = add_noise(h, noise, p.subject, slice(1, None))  # row 0 stays clean
        elif name in by_name:
            h = h.clone()
        if name in by_name:
            toks = by_name[name]
            h[1:, toks] = h[0, toks]
        return h

    with TraceDict(model, [spec.embed, *by_name], edit_output=edit):
        probs = answer_prob(model(input_ids=ids, use_cache=False).logits, p.answer_id)
    return float(probs[0]), float(probs[1:].mean())


def trace_fact_per_cell(
    model: nn.Module,
    spec: ArchSpec,
    p: FactPrompt,
    *,
    noise: float,
    samples: int,
    seed: int,
    kinds: Sequence[str],
    window: int,
    progress: Callable[[int], None] | None = None,
) -> TraceResult:
    """``trace_fact``'s result the slow way: every cell of every kind in its own forward pass, every token
    run (even those before the subject) -- the method of ROME's ``calculate_hidden_flow``.  The same
    ``seed`` draws the same noise as ``trace_fact``, so the two agree to float rounding."""
    n_layers, n_tokens = spec.num_layers(model), p.input_ids.shape[1]
    eps = fact_noise(model, spec, p, noise, samples, seed)
    p_clean, p_corrupted = trace_with_patch(model, spec, p, eps, [])
    effects = {}
    for kind in kinds:
        grid = np.zeros((n_tokens, n_layers))
        for t in range(n_tokens):
            for layer in range(n_layers):
                names = restored_names(spec, kind, layer, window, n_layers)
                grid[t, layer] = trace_with_patch(model, spec, p, eps, [(t, n) for n in names])[1] - p_corrupted
            if progress is not None:
                progress(n_layers)
        effects[kind] = grid
    return TraceResult(
        p.tokens, p.subject, p.answer, p.answer_id, p_clean, p_corrupted, effects, float(noise), samples, window
    )
