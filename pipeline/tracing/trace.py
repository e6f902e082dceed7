"""Causal tracing (Meng et al. 2022, section 2): where in the network does a model recall a fact?

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
them changes nothing: their effect is exactly 0 and they are not run.  ``trace_fact_per_cell`` is the
plain one-pass-per-cell method (as ROME), used by the tests and the benchmark to check all of this.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.core.arch import ArchSpec, cache_kwarg
from pipeline.core.atomic import atomic_path, write_json
from pipeline.core.digest import file_sha256, json_digest, short, slug
from pipeline.errors import UserError
from pipeline.core.hooks import Trace, TraceDict, get_module
from pipeline.core.padding import right_pad
from pipeline.core.subject import fill_prompt, subject_token_range
from pipeline.core.timing import model_device

__all__ = [
    "KINDS", "BUCKETS", "FactPrompt", "TraceResult", "make_prompt", "answer_tokens", "greedy_tokens",
    "predicts", "embedding_std", "subject_noise", "draw_noise", "fact_noise", "trace_fact", "trace_fact_per_cell", "trace_with_patch",
    "restored_names", "bucket_rows", "bucket_scores", "average_effects", "AIE_MODES", "recommend_layer", "model_slug", "model_dir",
    "save_recommendation", "latest_recommendation",
]

KINDS = ("hidden", "mlp", "attn")  # block output h_i^(l); MLP output window; attention output window


# --------------------------------------------------------------------------------------- the prompt


@dataclasses.dataclass(frozen=True)
class FactPrompt:
    """One fact, tokenised: the prompt, where its subject is, and which token is the answer."""

    text: str
    input_ids: torch.Tensor  # [1, T]
    subject: tuple[int, int]  # token range [first, last + 1) of the subject
    answer: str  # the answer token as text
    answer_id: int
    tokens: list[str]  # the prompt's tokens as text, for plots


def answer_tokens(tokenizer: Any, text: str, answer: str) -> list[int]:
    """The token ids the answer continues ``text`` with (a space between them unless one is there)."""
    sep = "" if text[-1:].isspace() or answer[:1].isspace() else " "
    prompt_ids = tokenizer(text)["input_ids"]
    full_ids = tokenizer(text + sep + answer)["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return full_ids[len(prompt_ids):]
    # The tokenizer merged across the boundary: fall back to the answer encoded on its own.
    return tokenizer(sep + answer, add_special_tokens=False)["input_ids"]


def make_prompt(tokenizer: Any, prompt: str, subject: str, answer_id: int) -> FactPrompt:
    """Tokenise ``prompt`` (``{}`` or the subject itself marks the subject) for tracing ``answer_id``."""
    text, start, end = fill_prompt(prompt, subject)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    first, last = subject_token_range(tokenizer, text, start, end)
    tokens = [tokenizer.decode([i]) for i in ids[0].tolist()]
    return FactPrompt(text, ids, (first, last), tokenizer.decode([answer_id]), int(answer_id), tokens)


@torch.inference_mode()
def greedy_tokens(model: nn.Module, input_ids: torch.Tensor, k: int) -> list[int]:
    """The model's greedy continuation of ``input_ids`` [1, T], ``k`` tokens long."""
    ids = input_ids.to(_device(model))
    out = []
    for _ in range(k):
        nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
        out.append(int(nxt))
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return out


def predicts(model: nn.Module, tokenizer: Any, text: str, answer: str) -> tuple[bool, str]:
    """Does the model know this fact?  Rule: its greedy continuation, as many tokens long as the answer,
    starts with the answer (both stripped, case-insensitive).  Returns (known, the continuation)."""
    want = answer_tokens(tokenizer, text, answer)
    got = tokenizer.decode(greedy_tokens(model, torch.tensor([tokenizer(text)["input_ids"]]), len(want)))
    return got.strip().lower().startswith(answer.strip().lower()), got


# ---------------------------------------------------------------------------------------- the noise


@torch.inference_mode()
def embedding_std(model: nn.Module, spec: ArchSpec, tokenizer: Any, subjects: Sequence[str]) -> float:
    """Standard deviation of the token-embedding outputs of the subjects' tokens (ROME's sigma; the
    noise is 3 sigma).  Subjects are encoded on their own, without special tokens."""
    rows = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in subjects]
    rows = [r for r in rows if r]
    if not rows:
        raise UserError("no subject tokens to measure the embedding spread over")
    ids, mask = right_pad(rows, 0, _device(model))
    with Trace(get_module(model, spec.embed), retain_output=True, stop=True) as t:
        model(input_ids=ids, use_cache=False)  # stops right after the embedding
    return float(t.output[mask.bool()].float().std())


def subject_noise(model: nn.Module, spec: ArchSpec, tokenizer: Any, identity: dict[str, str],
                  subjects_file: str | Path, cache_dir: str | Path, factor: float = 3.0) -> tuple[float, Path]:
    """nu = factor * sigma, sigma the embedding spread over the subjects of ``subjects_file`` (a
    known_1000-style file).  sigma is computed once per (model, file content) and cached as JSON."""
    from pipeline.tracing.facts import load_facts

    try:
        digest = short(file_sha256(subjects_file))
    except OSError as err:
        raise UserError(f"cannot read trace.noise_subjects={subjects_file} ({err.strerror}); point it at "
                        "known_1000.json or give the noise level itself: trace.noise=0.1") from None
    path = model_dir(cache_dir, identity) / f"embedding-std-{digest}.json"
    if path.exists():
        rec = json.loads(path.read_text())
        if rec.get("model") == dict(identity):
            return factor * float(rec["sigma"]), path
    subjects = [f.subject for f in load_facts(subjects_file)]  # as ROME: every record, repeats too
    sigma = embedding_std(model, spec, tokenizer, subjects)
    write_json(path, {"sigma": sigma, "subjects": len(subjects), "file": str(subjects_file),
                      "sha256": digest, "model": identity})
    return factor * sigma, path


def draw_noise(seed: int, samples: int, n_tokens: int, d_model: int, level: float) -> torch.Tensor:
    """[samples, n_tokens, d_model] of level * N(0, 1), drawn on the CPU so that a seed gives the same
    noise on every device; drawn once per fact and shared by every cell, whatever the batching."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(samples, n_tokens, d_model, generator=gen) * float(level)


def _add_noise(x: torch.Tensor, noise: torch.Tensor, subject: tuple[int, int], rows: slice) -> torch.Tensor:
    x = x.clone()
    x[rows, subject[0] : subject[1]] += noise.to(x)
    return x


# ------------------------------------------------------------------------------ what gets restored


def restored_names(spec: ArchSpec, kind: str, layer: int, window: int, num_layers: int) -> list[str]:
    """The modules whose output a restoration of kind ``kind`` centred on ``layer`` puts back: the
    block itself, or the MLPs / attentions of up to ``window`` layers around it (as ROME: layers
    layer - window//2 ... layer + window - window//2 - 1, clipped to the model)."""
    if kind == "hidden":
        return [spec.block_name(layer)]
    name = {"mlp": spec.mlp_name, "attn": spec.attn_name}[kind]
    lo, hi = max(0, layer - window // 2), min(num_layers, layer - (-window // 2))
    return [name(l) for l in range(lo, hi)]


def _first_layer(kind: str, layer: int, window: int) -> int:
    """The first block whose *input* a restoration changes (the hidden kind changes block l's output)."""
    return layer + 1 if kind == "hidden" else max(0, layer - window // 2)


# ----------------------------------------------------------------------------------------- results


@dataclasses.dataclass
class TraceResult:
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
        meta = {k: getattr(self, k) for k in ("tokens", "answer", "answer_id", "p_clean", "p_corrupted",
                                               "noise", "samples", "window")}
        meta.update(subject=list(self.subject), total_effect=self.total_effect, kinds=list(self.effects), **extra)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), subject_range=np.array(self.subject),
                     p_clean=self.p_clean, p_corrupted=self.p_corrupted,
                     **{f"effect_{k}": v for k, v in self.effects.items()})

    @classmethod
    def load(cls, path: str | Path) -> tuple["TraceResult", dict]:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            effects = {k: z[f"effect_{k}"] for k in meta["kinds"]}
        fields = {f.name for f in dataclasses.fields(cls)}
        res = cls(**{k: v for k, v in meta.items() if k in fields and k != "subject"},
                  subject=tuple(meta["subject"]), effects=effects)
        return res, meta


# ------------------------------------------------------------------------------------ batched runs


def _device(model: nn.Module) -> torch.device:
    return model_device(model)


def _answer_prob(logits: torch.Tensor, answer_id: int) -> torch.Tensor:
    """P(answer) at the last position of every row, [rows]."""
    return torch.softmax(logits[:, -1].float(), dim=-1)[:, answer_id]


@dataclasses.dataclass
class _Run:
    prob: float
    states: dict[str, torch.Tensor]  # module name -> [rows, T, d]
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer (keys, values), seq on dim -2


def _clean_run(model: nn.Module, spec: ArchSpec, p: FactPrompt, names: list[str]) -> _Run:
    ids = p.input_ids.to(_device(model))
    with TraceDict(model, names, retain_output=True) as td:
        logits = model(input_ids=ids, use_cache=False).logits
    return _Run(float(_answer_prob(logits, p.answer_id)[0]), {n: td[n].output for n in names}, None)


def _corrupted_run(model: nn.Module, spec: ArchSpec, p: FactPrompt, noise: torch.Tensor) -> _Run:
    """The corrupted input once, all noise samples in the batch: its probability, the outputs of the
    embedding and of every block, and the keys/values of every layer (None if the model has no cache)."""
    samples = noise.shape[0]
    ids = p.input_ids.to(_device(model)).expand(samples, -1)
    names = [spec.embed] + [spec.block_name(l) for l in range(spec.num_layers(model))]
    edit = {spec.embed: lambda x: _add_noise(x, noise, p.subject, slice(None))}
    from transformers import DynamicCache

    # Full layers for sliding-window layers too (the model's own cache keeps only a window's worth there):
    # the passes that reuse a prefix take any length of it, and the model's masks apply the window.
    cache = DynamicCache()
    with TraceDict(model, names, retain_output=True, edit_output=edit) as td:
        out = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
    prob = float(_answer_prob(out.logits, p.answer_id).mean())
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


def _run_chunk(model: nn.Module, spec: ArchSpec, p: FactPrompt, cells: list[_Cell], clean: _Run,
               corrupted: _Run, prefix: bool) -> torch.Tensor:
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
    index = {n: (torch.tensor(r, device=device), torch.tensor(k, device=device), torch.stack(v))
             for n, (r, k, v) in patches.items()}

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
        rows_at = [sum(1 for c in cells if c.start <= l) for l in range(len(corrupted.cache))]
        past = DynamicCache([(k[:1, ..., :t0, :], v[:1, ..., :t0, :]) if r == 0 else
                             (k[..., :t0, :].repeat(r, 1, 1, 1), v[..., :t0, :].repeat(r, 1, 1, 1))
                             for r, (k, v) in zip(rows_at, corrupted.cache)])
    ids = p.input_ids[:, t0:].to(device)
    # Contiguous: a strided [rows, 1, d] slice makes torch multiply the vocabulary matrix row by row
    # (a memory-bound gemv per row, half the pass) instead of in one GEMM.
    last_only = Trace(get_module(model, spec.lm_head), edit_input=lambda x: x[:, -1:].contiguous())
    with TraceDict(model, [*joins, *index], edit_output=edit), last_only:
        logits = model(input_ids=ids, use_cache=past is not None, **{cache_kwarg(model): past}).logits
    assert logits.shape[0] == len(cells) * samples, "a joining hook did not run"
    return _answer_prob(logits, p.answer_id).view(len(cells), samples).mean(dim=1)


def fact_noise(model: nn.Module, spec: ArchSpec, p: FactPrompt, level: float, samples: int, seed: int) -> torch.Tensor:
    """The noise of one fact: [samples, subject tokens, d_model], on the model's device and dtype."""
    param = get_module(model, spec.embed).weight
    d_model = param.shape[1]
    return draw_noise(seed, samples, p.subject[1] - p.subject[0], d_model, level).to(param.device, param.dtype)


@torch.inference_mode()
def trace_fact(model: nn.Module, spec: ArchSpec, p: FactPrompt, *, noise: float, samples: int = 10,
               seed: int = 0, kinds: Sequence[str] = KINDS, window: int = 10, batch_size: int = 320,
               prefix: bool = True, progress: Callable[[int], None] | None = None) -> TraceResult:
    """The effect grids of one fact, batched.  ``noise``: the level nu; ``seed`` fixes the samples.
    ``prefix=False`` turns off the KV-cache reuse of tokens before the restored one (for checking)."""
    n_layers, n_tokens = spec.num_layers(model), p.input_ids.shape[1]
    eps = fact_noise(model, spec, p, noise, samples, seed)
    cells = {k: [_Cell(t, l, _first_layer(k, l, window), tuple(restored_names(spec, k, l, window, n_layers)))
                 for t in range(p.subject[0], n_tokens) for l in range(n_layers)] for k in kinds}
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
    return TraceResult(p.tokens, p.subject, p.answer, p.answer_id, clean.prob, corrupted.prob, effects,
                       float(noise), samples, window)


# --------------------------------------------------------------------- the one-pass-per-cell method


@torch.inference_mode()
def trace_with_patch(model: nn.Module, spec: ArchSpec, p: FactPrompt, noise: torch.Tensor,
                     restore: Sequence[tuple[int, str]]) -> tuple[float, float]:
    """ROME's ``trace_with_patch``: one pass over [clean row, noise samples...]; the outputs of the
    modules in ``restore`` ((token, module name) pairs) are copied from the clean row into the corrupted
    rows.  Full logits at every position, as the original.  Returns (P(clean), P(corrupted, restored))."""
    samples = noise.shape[0]
    ids = p.input_ids.to(_device(model)).expand(samples + 1, -1)
    by_name: dict[str, list[int]] = {}
    for tok, name in restore:
        by_name.setdefault(name, []).append(tok)

    def edit(h: torch.Tensor, name: str) -> torch.Tensor:
        if name == spec.embed:
            h = _add_noise(h, noise, p.subject, slice(1, None))
        elif name in by_name:
            h = h.clone()
        if name in by_name:
            toks = by_name[name]
            h[1:, toks] = h[0, toks]
        return h

    with TraceDict(model, [spec.embed, *by_name], edit_output=edit):
        probs = _answer_prob(model(input_ids=ids, use_cache=False).logits, p.answer_id)
    return float(probs[0]), float(probs[1:].mean())


def trace_fact_per_cell(model: nn.Module, spec: ArchSpec, p: FactPrompt, *, noise: float, samples: int = 10,
                        seed: int = 0, kinds: Sequence[str] = KINDS, window: int = 10,
                        progress: Callable[[int], None] | None = None) -> TraceResult:
    """The reference: every cell of every kind in its own forward pass, every token run (even those
    before the subject), nothing reused -- the method of ROME's ``calculate_hidden_flow``."""
    n_layers, n_tokens = spec.num_layers(model), p.input_ids.shape[1]
    eps = fact_noise(model, spec, p, noise, samples, seed)
    p_clean, p_corrupted = trace_with_patch(model, spec, p, eps, [])
    effects = {}
    for kind in kinds:
        grid = np.zeros((n_tokens, n_layers))
        for t in range(n_tokens):
            for l in range(n_layers):
                names = restored_names(spec, kind, l, window, n_layers)
                grid[t, l] = trace_with_patch(model, spec, p, eps, [(t, n) for n in names])[1] - p_corrupted
            if progress is not None:
                progress(n_layers)
        effects[kind] = grid
    return TraceResult(p.tokens, p.subject, p.answer, p.answer_id, p_clean, p_corrupted, effects,
                       float(noise), samples, window)


# ------------------------------------------------------------------ average indirect effect (Fig. 2)

BUCKETS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
           "further tokens", "last token")
AIE_MODES = ("paper", "per_fact")


def bucket_rows(grid: np.ndarray, subject: tuple[int, int]) -> list[np.ndarray]:
    """A [tokens, layers] grid split into the six token buckets of the paper's Figure 2: each bucket's
    rows [its tokens, layers] (the middle and further buckets may have 0 or several tokens, the others one).
    As ROME's notebook, one token can sit in two buckets (a one-token subject is first and last)."""
    first, end = subject
    last_subj, last = end - 1, grid.shape[0] - 1
    return [grid[first : first + 1], grid[first + 1 : last_subj], grid[last_subj : last_subj + 1],
            grid[end : end + 1] if end <= last else grid[:0], grid[end + 1 : last], grid[last : last + 1]]


def bucket_scores(effect: np.ndarray, subject: tuple[int, int]) -> list[np.ndarray | None]:
    """One fact's buckets as one [layers] row each, the mean of the bucket's tokens (None: no token)."""
    return [rows.mean(axis=0) if len(rows) else None for rows in bucket_rows(effect, subject)]


def average_effects(results: Sequence[TraceResult], mode: str = "paper") -> dict[str, dict[str, np.ndarray]]:
    """Per kind: the average indirect effect [buckets, layers], its 95% confidence half-width, the number
    of facts with each bucket and the rows averaged in it.

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


# -------------------------------------------------------------------- per-model files in the cache


def model_slug(identity: dict[str, str]) -> str:
    """A directory name for a model: its readable name plus a hash of its full identity."""
    return f"{slug(identity.get('name', 'model').strip('/'))}-{json_digest(identity)}"


def model_dir(cache_dir: str | Path, identity: dict[str, str]) -> Path:
    return Path(cache_dir) / "trace" / model_slug(identity)


def save_recommendation(cache_dir: str | Path, identity: dict[str, str], layer: int, n_facts: int,
                        summary: str | Path) -> Path:
    """Record ``layer`` as this model's recommended edit layer (atomically); returns the file."""
    path = model_dir(cache_dir, identity) / "recommended_layer.json"
    write_json(path, {"layer": int(layer), "model": identity, "n_facts": int(n_facts),
                      "summary": str(Path(summary).resolve())})
    return path


def latest_recommendation(cache_dir: str | Path, model_identity: dict[str, str]) -> tuple[int, Path]:
    """The edit layer the latest dataset trace recommended for this model, and the file it came from.
    Raises UserError (saying how to make one) when this model has never been traced over a dataset."""
    path = model_dir(cache_dir, model_identity) / "recommended_layer.json"
    try:
        rec = json.loads(path.read_text())
        layer = int(rec["layer"])
    except FileNotFoundError:
        raise UserError(
            f"no traced layer recommendation for model {model_identity.get('name')} yet ({path} is missing); "
            "run python train.py stage=trace trace.dataset=../shared/data/known_1000.json first, "
            "or pass edit.layer=N") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read the layer recommendation {path}: {err}; rerun the trace stage") from err
    if rec.get("model") != dict(model_identity):
        raise UserError(f"{path} was written for model {rec.get('model')}, not {model_identity}; rerun the trace stage")
    return layer, path
