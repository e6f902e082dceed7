"""Causal tracing of one fact (Meng et al. 2022, section 2), batched: where in the network does a model
recall it?

Corrupt the subject (add nu * N(0, 1) to its token embeddings), then put back the clean value of one
state -- a block's output h_i^(l), or the MLP / attention outputs of a window of layers at token i --
and measure how much of P(answer) comes back:

    effect(i, l) = P(answer | corrupted, state restored) - P(answer | corrupted)
    total effect = P(answer | clean) - P(answer | corrupted)

The probability of a corrupted run is the mean over the noise samples of the softmax probability.

Speed.  ROME runs one forward pass per (token, layer) cell.  Here every cell of a kind goes through a
few batched passes (rows = cells x noise samples), and each pass computes only what a restoration can
change.  Restoring a state at token t, layer l leaves everything before it exactly as in the corrupted
run: tokens before t at every layer (causal attention) and layers below l at every token.  So a pass
  * starts at token t: the corrupted run's keys/values of tokens < t are handed in as a KV cache;
  * starts at layer l: the layers below it run on a single throw-away row, and at the first layer
    that matters the hook swaps in the corrupted run's hidden states, expanded to every row;
  * computes the LM head only at the last position.
Tokens before the first subject token are identical in the clean and the corrupted run, so restoring
them changes nothing: their effect is exactly 0 and they are not run.  ``pipeline.tracing.reference``
holds the plain one-pass-per-cell method (as ROME) that the tests and the benchmark check all of this with.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rome.pipeline.core.arch import ArchSpec, cache_kwarg
from rome.pipeline.core.atomic import atomic_path
from rome.pipeline.core.hooks import Trace, TraceDict, get_module
from rome.pipeline.core.timing import model_device
from rome.pipeline.tracing.noise import add_noise, fact_noise
from rome.pipeline.tracing.prompt import FactPrompt

__all__ = ["KINDS", "TraceResult", "restored_names", "answer_prob", "trace_fact"]

KINDS = ("hidden", "mlp", "attn")  # block output h_i^(l); MLP output window; attention output window


# ------------------------------------------------------------------------------ what gets restored


def restored_names(spec: ArchSpec, kind: str, layer: int, window: int, num_layers: int) -> list[str]:
    """The modules whose output a restoration of kind ``kind`` centred on ``layer`` puts back: the
    block itself, or the MLPs / attentions of up to ``window`` layers around it (as ROME: layers
    layer - window//2 ... layer + window - window//2 - 1, clipped to the model)."""
    if kind == "hidden":
        return [spec.block_name(layer)]
    name = {"mlp": spec.mlp_name, "attn": spec.attn_name}[kind]
    lo, hi = max(0, layer - window // 2), min(num_layers, layer - (-window // 2))
    return [name(i) for i in range(lo, hi)]


def _first_layer(kind: str, layer: int, window: int) -> int:
    """The first block whose *input* a restoration changes (the hidden kind changes block l's output)."""
    return layer + 1 if kind == "hidden" else max(0, layer - window // 2)


# ----------------------------------------------------------------------------------------- results


@dataclasses.dataclass
class TraceResult:
    """The effect grids of one fact and what they were traced with; saved as one .npz."""

    tokens: list[str]
    subject: tuple[int, int]
    answer: str
    answer_id: int
    p_clean: float
    p_corrupted: float
    effects: dict[str, np.ndarray]  # kind -> [tokens, layers]: P(restored) - P(corrupted)
    noise: float
    samples: int
    window: int

    @property
    def total_effect(self) -> float:
        return self.p_clean - self.p_corrupted

    def save(self, path: str | Path, **extra: Any) -> None:
        """An .npz with every field (``extra`` goes into the JSON ``meta`` entry), written atomically."""
        meta = {
            k: getattr(self, k)
            for k in ("tokens", "answer", "answer_id", "p_clean", "p_corrupted", "noise", "samples", "window")
        }
        meta.update(subject=list(self.subject), total_effect=self.total_effect, kinds=list(self.effects), **extra)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                meta=np.array(json.dumps(meta)),
                subject_range=np.array(self.subject),
                p_clean=self.p_clean,
                p_corrupted=self.p_corrupted,
                **{f"effect_{k}": v for k, v in self.effects.items()},
            )

    @classmethod
    def load(cls, path: str | Path) -> tuple[TraceResult, dict]:
        """The result saved at ``path`` and its JSON ``meta`` entry (with what ``save`` was given)."""
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            effects = {k: z[f"effect_{k}"] for k in meta["kinds"]}
        fields = {f.name for f in dataclasses.fields(cls)}
        res = cls(
            **{k: v for k, v in meta.items() if k in fields and k != "subject"},
            subject=tuple(meta["subject"]),
            effects=effects,
        )
        return res, meta


# ------------------------------------------------------------------------------------ batched runs


def answer_prob(logits: torch.Tensor, answer_id: int) -> torch.Tensor:
    """P(answer) at the last position of every row, [rows] (softmax in float32: bf16 logits lose the tail)."""
    return torch.softmax(logits[:, -1].float(), dim=-1)[:, answer_id]


@dataclasses.dataclass
class _Run:
    prob: float
    states: dict[str, torch.Tensor]  # module name -> [rows, T, d]
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer (keys, values), seq on dim -2


def _clean_run(model: nn.Module, spec: ArchSpec, p: FactPrompt, names: list[str]) -> _Run:
    ids = p.input_ids.to(model_device(model))
    with TraceDict(model, names, retain_output=True) as td:
        logits = model(input_ids=ids, use_cache=False).logits
    return _Run(float(answer_prob(logits, p.answer_id)[0]), {n: td[n].output for n in names}, None)


def _corrupted_run(model: nn.Module, spec: ArchSpec, p: FactPrompt, noise: torch.Tensor) -> _Run:
    """The corrupted input once, all noise samples in the batch: its probability, the outputs of the
    embedding and of every block, and the keys/values of every layer (None if the model has no cache)."""
    samples = noise.shape[0]
    ids = p.input_ids.to(model_device(model)).expand(samples, -1)
    names = [spec.embed] + [spec.block_name(i) for i in range(spec.num_layers(model))]
    edit = {spec.embed: lambda x: add_noise(x, noise, p.subject, slice(None))}
    from transformers import DynamicCache

    # Full layers for sliding-window layers too (the model's own cache keeps only a window's worth there):
    # the passes that reuse a prefix take any length of it, and the model's masks apply the window.
    cache = DynamicCache()
    with TraceDict(model, names, retain_output=True, edit_output=edit) as td:
        out = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
    prob = float(answer_prob(out.logits, p.answer_id).mean())
    return _Run(prob, {n: td[n].output for n in names}, _kv_list(cache))


def _kv_list(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer (keys, values) of a filled DynamicCache; None when the model did not fill it (no prefix reuse)."""
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


@dataclasses.dataclass(frozen=True)
class _Cell:
    token: int
    layer: int
    start: int  # the first block whose input the restoration changes
    names: tuple[str, ...]  # modules whose output is restored at ``token``


def _chunks(cells: list[_Cell], samples: int, batch_size: int, prefix: bool) -> list[list[_Cell]]:
    """Cells grouped into passes of at most ``batch_size`` rows, each pass sorted by first changed block.
    With prefix reuse a pass holds cells of one token (the KV cache is cut at that token).  Cells that
    change block 0 (they join at the embedding) get passes of their own: transformers sizes the
    attention mask by the embedding output's batch, so no rows may join after it."""
    per_pass = max(1, batch_size // samples)
    key = lambda c: (c.token if prefix else 0, c.start > 0)  # noqa: E731 -- cells that may share a pass
    out: list[list[_Cell]] = []
    for c in sorted(cells, key=lambda c: (*key(c), c.start, c.token, c.layer)):
        if not out or len(out[-1]) == per_pass or key(out[-1][0]) != key(c):
            out.append([c])
        else:
            out[-1].append(c)
    return out


def _entry_name(spec: ArchSpec, start: int) -> str:
    """The module after which block ``start``'s input is available: the embedding, or block start-1."""
    return spec.embed if start == 0 else spec.block_name(start - 1)


def _run_chunk(
    model: nn.Module, spec: ArchSpec, p: FactPrompt, cells: list[_Cell], clean: _Run, corrupted: _Run, prefix: bool
) -> torch.Tensor:
    """P(answer) for each cell of one pass, [cells].

    The pass runs tokens t0.. only (t0 = the cells' token with prefix reuse, else 0).  It starts as one
    throw-away row; each cell's rows (one per noise sample) join the batch, as copies of the corrupted
    run's hidden states, right before the first block the cell's restoration changes -- so no row ever
    runs a layer whose result is already known.  Cells are sorted by that block, so cell c owns rows
    c*S .. c*S+S-1 from the moment it joins to the end."""
    from transformers import DynamicCache

    samples = next(iter(corrupted.states.values())).shape[0]
    assert all(a.start <= b.start for a, b in zip(cells, cells[1:])), "cells must come sorted by start"
    t0 = min(c.token for c in cells) if prefix else 0
    joins: dict[str, int] = {}  # entry module -> number of cells joining there
    for cell in cells:
        name = _entry_name(spec, cell.start)
        joins[name] = joins.get(name, 0) + 1
    first_entry = _entry_name(spec, cells[0].start)

    patches: dict[str, tuple[list[int], list[int], list[torch.Tensor]]] = {}
    for c, cell in enumerate(cells):
        for name in cell.names:
            rows, cols, vals = patches.setdefault(name, ([], [], []))
            rows += range(c * samples, (c + 1) * samples)
            cols += [cell.token - t0] * samples
            vals += [clean.states[name][0, cell.token]] * samples
    device = clean.states[cells[0].names[0]].device
    index = {
        n: (torch.tensor(r, device=device), torch.tensor(k, device=device), torch.stack(v))
        for n, (r, k, v) in patches.items()
    }

    def edit(h: torch.Tensor, name: str) -> torch.Tensor:
        if name in joins:
            new = corrupted.states[name][:, t0:].repeat(joins[name], 1, 1)
            h = new if name == first_entry else torch.cat([h, new.to(h)])  # first: drop the throw-away row
        elif name in index:
            h = h.clone()
        if name in index:
            rows, cols, vals = index[name]
            h[rows, cols] = vals.to(h)
        return h

    past = None
    if t0 > 0:  # keys/values of tokens < t0, one copy per row present at each layer
        rows_at = [sum(1 for c in cells if c.start <= layer) for layer in range(len(corrupted.cache))]
        past = DynamicCache(
            [
                (k[:1, ..., :t0, :], v[:1, ..., :t0, :])
                if r == 0
                else (k[..., :t0, :].repeat(r, 1, 1, 1), v[..., :t0, :].repeat(r, 1, 1, 1))
                for r, (k, v) in zip(rows_at, corrupted.cache)
            ]
        )
    ids = p.input_ids[:, t0:].to(device)
    # Contiguous: a strided [rows, 1, d] slice makes torch multiply the vocabulary matrix row by row
    # (a memory-bound gemv per row, half the pass) instead of in one GEMM.
    last_only = Trace(get_module(model, spec.lm_head), edit_input=lambda x: x[:, -1:].contiguous())
    with TraceDict(model, [*joins, *index], edit_output=edit), last_only:
        logits = model(input_ids=ids, use_cache=past is not None, **{cache_kwarg(model): past}).logits
    assert logits.shape[0] == len(cells) * samples, "a joining hook did not run"
    return answer_prob(logits, p.answer_id).view(len(cells), samples).mean(dim=1)


@torch.inference_mode()
def trace_fact(
    model: nn.Module,
    spec: ArchSpec,
    p: FactPrompt,
    *,
    noise: float,
    samples: int,
    seed: int,
    kinds: Sequence[str],
    window: int,
    batch_size: int,
    prefix: bool = True,
    progress: Callable[[int], None] | None = None,
) -> TraceResult:
    """The effect grids of one fact, batched.  ``noise``: the level nu; ``seed`` fixes the samples.
    ``samples``, ``kinds``, ``window``, ``batch_size``: trace.* of configs/config.yaml, the one place their
    defaults live.  ``prefix=False`` turns off the KV-cache reuse of tokens before the restored one (for
    checking).  ``progress`` is called with the number of cells of each finished pass."""
    n_layers, n_tokens = spec.num_layers(model), p.input_ids.shape[1]
    eps = fact_noise(model, spec, p, noise, samples, seed)
    cells = {
        k: [
            _Cell(t, i, _first_layer(k, i, window), tuple(restored_names(spec, k, i, window, n_layers)))
            for t in range(p.subject[0], n_tokens)
            for i in range(n_layers)
        ]
        for k in kinds
    }
    names = sorted({n for cs in cells.values() for c in cs for n in c.names})
    clean = _clean_run(model, spec, p, names)
    corrupted = _corrupted_run(model, spec, p, eps)
    prefix = prefix and corrupted.cache is not None
    effects = {}
    for kind in kinds:
        grid = torch.zeros(n_tokens, n_layers, dtype=torch.float64)  # tokens before the subject: exactly 0
        for chunk in _chunks(cells[kind], samples, batch_size, prefix):
            probs = _run_chunk(model, spec, p, chunk, clean, corrupted, prefix)
            for cell, pr in zip(chunk, probs.tolist()):
                grid[cell.token, cell.layer] = pr - corrupted.prob
            if progress is not None:
                progress(len(chunk))
        effects[kind] = grid.numpy()
    return TraceResult(
        p.tokens, p.subject, p.answer, p.answer_id, clean.prob, corrupted.prob, effects, float(noise), samples, window
    )
