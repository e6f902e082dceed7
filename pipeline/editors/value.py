"""v*: the value the edited layer should output for the subject, found by a short optimisation.

Rows: one "rewriting" row per context template, ``<template with the prompt> + target[:-1]`` (the loss is
the NLL of the target tokens), plus one KL row per ``kl_prompts`` entry (``"{subject} is a"``: KL of its
next-token distribution at the subject's last token against the unedited model). δ is added to the edit
module's output (the MLP's for ROME) at the subject's last token of every row.

Several requests can be optimised together (``ValueBatch.build`` takes one ``Rows`` per request): each
request has its own δ (a row of ``delta`` [R, d], float32, and so Adam's state), its rows sit in one batch,
its loss is its own sum (never a mean over the batch) and depends only on its own rows, so the gradient of
the summed loss with respect to δ_r is request r's own gradient; Adam works element by element and each
request stops early on its own loss, so the batched optimisation gives every request the result it gets
alone. That holds in the arithmetic too, in bf16 as in float32, because nothing a row computes depends on
the batch's shapes (``batch_invariant``): the attention runs eagerly (the fused SDPA kernels block and
reduce the keys by the padded length: a longer neighbour changed a bf16 row's loss gradient by 1% on a CPU,
and the issue measured batched δ 19% away from δ alone in bf16 on an H200), the GEMMs reduce in float32
(``pipeline.core.precision``), and the loss's log-softmax is taken in float32 (``ArchSpec.logits``).
A batch can be optimised in micro-batches of requests with the same result (``MicroBatches``).

Work δ cannot change is done once (``ValueBatch.build``):
- tokens before the subject's last token never see δ (causal attention), at any layer: their keys and
  values are computed once as a KV cache, and each step runs only the tokens from the subject's last
  token on (the "suffix");
- the loss needs the LM head only at the target positions and the KL positions, not over the sequence.
``pipeline/editors/reference.py`` computes the same loss the plain way (the original's procedure), to check against.

``norm_anchor`` (NAS; on by default for MEMIT only) rescales a solved v* to a fixed reference norm, for ROME and
MEMIT/AlphaEdit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import psutil
import torch

from rome.pipeline.core.arch import ArchSpec, cache_kwarg
from rome.pipeline.core.hooks import Trace, get_module
from rome.pipeline.core.padding import left_pad, right_pad
from rome.pipeline.core.precision import full_precision_reductions
from rome.pipeline.core.probability import target_token_ids
from rome.pipeline.core.subject import fill_prompt, subject_token_range
from rome.pipeline.core.timing import model_device
from rome.pipeline.editors.hparams import ValueHparams
from rome.pipeline.errors import UserError

if TYPE_CHECKING:  # transformers is imported where the cache is built
    from transformers import DynamicCache

__all__ = [
    "check_value_settings",
    "NormReference",
    "Rows",
    "build_rows",
    "subject_rows",
    "ValueBatch",
    "value_loss",
    "LossParts",
    "ValueOptimisation",
    "batch_invariant",
    "MicroBatches",
    "optimise_values",
    "step_memory",
    "requests_per_micro_batch",
    "note_if_short_of_memory",
    "MICRO_BATCH_MEMORY",
    "norm_anchor",
    "anchor_reference",
    "require_mlp_output",
]


def require_mlp_output(name: str, model: torch.nn.Module, spec: ArchSpec, layers: Sequence[int]) -> None:
    """ROME's v* and MEMIT's / AlphaEdit's z are optimised at the MLP's output (``spec.mlp_name``) and written
    into the edited module's weight, so that module must be the one whose output the MLP returns: the
    down-projection. ``model.arch.down_proj`` may name another linear module (``mlp.up_proj``: UltraEdit's step
    is the same on any of them, docs/many-edits.md); for these methods a module of another output width is
    refused here, before any statistics are computed, instead of failing at the first v* step."""
    width = get_module(model, spec.embed).weight.shape[-1]
    for layer in layers:
        out = spec.down_proj_matrix(model, layer).shape[0]
        if out != width:
            raise UserError(
                f"{name} writes its value at the MLP's output ({width} values), but {spec.down_proj_name(layer)} "
                f"returns {out}: model.arch.down_proj must name the module whose output the MLP returns (its "
                "down-projection); other linear modules only edit.method=ultraedit edits"
            )


@contextlib.contextmanager
def batch_invariant(model: torch.nn.Module) -> Iterator[None]:
    """For the block, what a row computes does not depend on the other rows of its batch or on its padding:
    the model's attention runs eagerly (its scores, float32 softmax and weighted sum per row, where the
    fused SDPA kernels block the keys by the padded length) and bf16 / fp16 GEMMs reduce in float32 (the
    float32 matmul precision is left as the process set it). Restored after the block; switching costs
    tens of microseconds (a config attribute the attention and mask code read at every forward)."""
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    switch = before is not None and before != "eager"
    with full_precision_reductions(ieee_fp32=False):
        if switch:
            config._attn_implementation = "eager"  # the setter passes it on to the sub-configs
        try:
            yield
        finally:
            if switch:
                config._attn_implementation = before


@dataclasses.dataclass
class Rows:
    """The token rows of one request."""

    ids: list[list[int]]  # full token ids of every row
    subject_last: list[int]  # index of the subject's last token in each row
    n_rewrite: int  # rows [0, n_rewrite) are rewriting rows, the rest KL rows
    target: list[int]  # target token ids


def subject_rows(tokenizer: Any, prompts: Sequence[str], subject: str) -> list[tuple[list[int], int]]:
    """Each prompt (with ``{}`` for the subject) as token ids and the index of the subject's last token."""
    out = []
    for p in prompts:
        text, start, end = fill_prompt(p, subject)
        out.append((tokenizer(text)["input_ids"], subject_token_range(tokenizer, text, start, end)[1] - 1))
    return out


def build_rows(
    tokenizer: Any, templates: Sequence[str], prompt: str, subject: str, target_new: str, kl_prompts: Sequence[str]
) -> Rows:
    target = target_token_ids(tokenizer, target_new)
    rewrite = subject_rows(tokenizer, [t.replace("{}", prompt) for t in templates], subject)
    kl = subject_rows(tokenizer, kl_prompts, subject)
    return Rows(
        [r + target[:-1] for r, _ in rewrite] + [r for r, _ in kl], [s for _, s in rewrite + kl], len(templates), target
    )


@dataclasses.dataclass
class LossParts:
    """ROME's loss of every request ([R] tensors): mean over its rewriting rows of (target NLL summed over
    the target's tokens / their number) + kl_factor x KL(current || initial) averaged over its KL rows
    + weight_decay x ‖δ‖ / ‖v₀‖²."""

    total: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    weight_decay: torch.Tensor
    p_target: torch.Tensor  # mean over rewriting rows of exp(-NLL per row): how sure the model is
    kl_logp: torch.Tensor  # [KL rows, vocab]: the step's KL log-probabilities (the first become the reference)
    target_top: torch.Tensor  # [R] bool: every target token is the most probable one in every rewriting row


@dataclasses.dataclass
class ValueBatch:
    """Everything a step needs, built once for a set of requests."""

    suffix_ids: torch.Tensor  # [rows, S]: from each row's subject-last token on, right-padded
    full_mask: torch.Tensor  # [rows, P + S]: prefix mask (left-padded prefixes) then suffix mask
    suffix_pos: torch.Tensor  # [rows, S]: true positions of the suffix tokens
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # per-layer K, V of the prefix (pads zeroed)
    row_request: torch.Tensor  # [rows]: the request each row belongs to (whose δ it gets)
    target_row: torch.Tensor  # [T]: every (row, target token) pair of the rewriting rows, flattened:
    target_col: torch.Tensor  # [T]   the suffix column whose logits predict the token,
    target_id: torch.Tensor  # [T]    the token,
    target_scale: torch.Tensor  # [T]   1 / the target's length
    rewrite_rows: torch.Tensor  # [rewriting rows]
    rewrite_weight: torch.Tensor  # [rewriting rows]: 1 / rewriting rows of its request
    kl_rows: torch.Tensor  # [KL rows]
    kl_weight: torch.Tensor  # [KL rows]: 1 / KL rows of its request
    n_requests: int

    @classmethod
    @torch.no_grad()
    def build(cls, model: torch.nn.Module, spec: ArchSpec, requests: Sequence[Rows], pad: int) -> ValueBatch:
        device = model_device(model)
        ids = [r for rows in requests for r in rows.ids]
        last = [s for rows in requests for s in rows.subject_last]
        # The prefixes are left-padded and the suffixes right-padded, so that each row's real tokens sit in
        # consecutive cache slots: a sliding-window layer's mask measures distances in slots (Gemma 2/3).
        prefix_ids, prefix_mask = left_pad([r[:s] for r, s in zip(ids, last)], pad, device)
        suffix_ids, suffix_mask = right_pad([r[s:] for r, s in zip(ids, last)], pad, device)
        prefix_kv = None
        if max(last) > 0:
            from transformers import DynamicCache

            pos = (prefix_mask.cumsum(1) - 1).clamp_min(0)  # true positions (pads: 0, masked anyway)
            # Full layers for every layer, sliding-window ones too (a config-built cache would keep only a
            # window's worth of a sliding layer's prefix): the model's own masks apply the window.
            cache = DynamicCache()
            # only the keys and values are needed: stop before the final norm (no LM head over the prefixes)
            with batch_invariant(model), Trace(get_module(model, spec.final_norm), stop=True):
                model(
                    input_ids=prefix_ids,
                    attention_mask=prefix_mask,
                    position_ids=pos,
                    use_cache=True,
                    **{cache_kwarg(model): cache},
                )
            keep = prefix_mask[:, None, :, None].bool()  # zero the pads: a 0-weight NaN would still poison
            prefix_kv = [(torch.where(keep, kv.keys, 0), torch.where(keep, kv.values, 0)) for kv in cache.layers]
        else:
            prefix_mask = prefix_mask[:, :0]
        suffix_pos = torch.tensor(last, device=device)[:, None] + torch.arange(suffix_ids.shape[1], device=device)[None]
        # Host-side index lists, copied once. Row i = prompt + target[:-1]: in suffix coordinates the
        # prompt's last token sits at len(row) - last - t, and the logits there and at the t - 1 following
        # columns predict the t target tokens.
        row_request, t_row, t_col, t_id, t_w, rw, rw_w, kl, kl_w = [], [], [], [], [], [], [], [], []
        offset = 0
        for r, rows in enumerate(requests):
            n, t, n_kl = rows.n_rewrite, len(rows.target), len(rows.ids) - rows.n_rewrite
            row_request += [r] * len(rows.ids)
            for i in range(n):
                start = len(rows.ids[i]) - rows.subject_last[i] - t
                t_row += [offset + i] * t
                t_col += range(start, start + t)
                t_id += rows.target
                t_w += [1.0 / t] * t
            rw += range(offset, offset + n)
            rw_w += [1.0 / n] * n
            kl += range(offset + n, offset + len(rows.ids))
            kl_w += [1.0 / n_kl] * n_kl
            offset += len(rows.ids)
        long = dict(dtype=torch.long, device=device)
        flt = dict(dtype=torch.float32, device=device)
        return cls(
            suffix_ids,
            torch.cat([prefix_mask, suffix_mask], 1),
            suffix_pos,
            prefix_kv,
            torch.tensor(row_request, **long),
            torch.tensor(t_row, **long),
            torch.tensor(t_col, **long),
            torch.tensor(t_id, **long),
            torch.tensor(t_w, **flt),
            torch.tensor(rw, **long),
            torch.tensor(rw_w, **flt),
            torch.tensor(kl, **long),
            torch.tensor(kl_w, **flt),
            len(requests),
        )

    def subset(self, requests: Sequence[int]) -> tuple[ValueBatch, torch.Tensor]:
        """The rows of ``requests`` only (indices keep their meaning: ``row_request`` and the per-request
        outputs still count all ``n_requests``), and which of the KL rows stay (to slice their reference).
        Finished requests leave the batch so later steps do not compute them; nothing a row computes depends
        on the others (``batch_invariant``), so the rest go on as before."""
        wanted = torch.zeros(self.n_requests, dtype=torch.bool, device=self.row_request.device)
        wanted[list(requests)] = True
        keep = wanted[self.row_request]  # [rows]
        new_index = keep.long().cumsum(0) - 1  # old row -> new row (valid where kept)
        rows = keep.nonzero()[:, 0]
        kept_targets, kept_rewrite, kept_kl = keep[self.target_row], keep[self.rewrite_rows], keep[self.kl_rows]
        kv = None if self.prefix_kv is None else [(k[rows], v[rows]) for k, v in self.prefix_kv]
        batch = ValueBatch(
            self.suffix_ids[rows],
            self.full_mask[rows],
            self.suffix_pos[rows],
            kv,
            self.row_request[rows],
            new_index[self.target_row[kept_targets]],
            self.target_col[kept_targets],
            self.target_id[kept_targets],
            self.target_scale[kept_targets],
            new_index[self.rewrite_rows[kept_rewrite]],
            self.rewrite_weight[kept_rewrite],
            new_index[self.kl_rows[kept_kl]],
            self.kl_weight[kept_kl],
            self.n_requests,
        )
        return batch, kept_kl

    def cache(self) -> DynamicCache | None:
        if self.prefix_kv is None:
            return None
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=self.prefix_kv)

    def per_request(self, values: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Σ weight x value over each request's entries: [R]."""
        out = torch.zeros(self.n_requests, dtype=values.dtype, device=values.device)
        return out.index_add(0, self.row_request[rows], values * weight)


def _add_at_column0(delta: torch.Tensor, row_request: torch.Tensor):
    """δ of each row's request added to the hidden state of the row's first suffix column (the subject's
    last token)."""

    def edit(h: torch.Tensor) -> torch.Tensor:
        first = h[:, :1] + delta[row_request].to(h.dtype)[:, None]
        return torch.cat([first, h[:, 1:]], 1)

    return edit


def _loss_parts(
    batch: ValueBatch,
    target_logp: torch.Tensor,
    target_top: torch.Tensor,
    kl_logp: torch.Tensor,
    kl_init: torch.Tensor | None,
    delta: torch.Tensor,
    v0_norm: torch.Tensor,
    hp: ValueHparams,
) -> LossParts:
    # per rewriting row: the mean NLL of the target's tokens; per request: the mean over its rows
    row_nll = torch.zeros(batch.suffix_ids.shape[0], dtype=target_logp.dtype, device=target_logp.device)
    row_nll = row_nll.index_add(0, batch.target_row, -target_logp * batch.target_scale)[batch.rewrite_rows]
    nll = batch.per_request(row_nll, batch.rewrite_rows, batch.rewrite_weight)
    p_target = batch.per_request(torch.exp(-row_nll).detach(), batch.rewrite_rows, batch.rewrite_weight)
    kl = torch.zeros_like(nll)
    if kl_init is not None:
        row_kl = (kl_logp.exp() * (kl_logp - kl_init)).sum(-1)  # KL(current || initial) per KL row
        kl = hp.kl_factor * batch.per_request(row_kl, batch.kl_rows, batch.kl_weight)
    wd = hp.weight_decay * delta.norm(dim=-1) / v0_norm**2
    # MPES's test per request: no target position of any of its rewriting rows has another token on top
    row_miss = torch.zeros(batch.suffix_ids.shape[0], dtype=nll.dtype, device=nll.device)
    row_miss = row_miss.index_add(0, batch.target_row, (~target_top).to(nll.dtype))[batch.rewrite_rows]
    top = batch.per_request(row_miss, batch.rewrite_rows, torch.ones_like(batch.rewrite_weight)) == 0
    return LossParts(nll + kl + wd, nll, kl, wd, p_target, kl_logp, top)


def value_loss(
    model: torch.nn.Module,
    spec: ArchSpec,
    module: str,
    batch: ValueBatch,
    delta: torch.Tensor,
    v0_norm: torch.Tensor,
    kl_init: torch.Tensor | None,
    hp: ValueHparams,
) -> LossParts:
    """One step's loss, running only the suffix tokens and the LM head only where the loss looks.
    ``module`` is where δ is added (its output, at the subject's last token); ``delta`` is [R, d]."""
    norm = get_module(model, spec.final_norm)
    with (
        Trace(get_module(model, module), edit_output=_add_at_column0(delta, batch.row_request)),
        Trace(norm, retain_output=True, stop=True, detach=False) as out,
    ):
        model(
            input_ids=batch.suffix_ids,
            attention_mask=batch.full_mask,
            position_ids=batch.suffix_pos,
            use_cache=batch.prefix_kv is not None,
            **{cache_kwarg(model): batch.cache()},
        )
    h = out.output
    target_logits = spec.logits(model, h[batch.target_row, batch.target_col])  # [T, vocab]
    target_logp = torch.log_softmax(target_logits, -1).gather(-1, batch.target_id[:, None])[:, 0]
    target_top = target_logits.argmax(-1) == batch.target_id
    kl_logp = torch.log_softmax(spec.logits(model, h[batch.kl_rows, 0]), -1)
    return _loss_parts(batch, target_logp, target_top, kl_logp, kl_init, delta, v0_norm, hp)


class ValueOptimisation:
    """ROME's v* loop for one or more requests, one ``step()`` at a time (a Trainer or a plain loop drives it).

    Adam (lr ``hp.lr``) on δ, zero-initialised; a request stops, as in the original, *before* stepping
    when its loss is below ``hp.early_stop_loss`` or at the last of ``hp.steps`` iterations, or, with
    ``hp.most_probable_stop`` = N > 0, at the N-th evaluation where the new object's every token is the
    model's most probable one in every rewriting row (ENCORE's most-probable early stopping, MPES: Gupta et
    al. 2025, arXiv 2502.01636; their release counts the context-prefixed rows only, here the bare prompt
    counts too); after every step each δ_r is clamped to ``hp.clamp_norm_factor`` x ‖v₀_r‖. A finished
    request's rows leave the batch (``ValueBatch.subset``). One host sync per step: the losses and tests
    the early stop needs (the progress display reads the same numbers).
    """

    def __init__(
        self, model: torch.nn.Module, spec: ArchSpec, module: str, batch: ValueBatch, v0: torch.Tensor, hp: ValueHparams
    ) -> None:
        self.model, self.spec, self.module, self.batch, self.hp = model, spec, module, batch, hp
        self.v0_norm = v0.float().norm(dim=-1)  # [R]
        self.delta = torch.zeros_like(v0, dtype=torch.float32, requires_grad=True)  # [R, d]
        self.opt = torch.optim.Adam([self.delta], lr=float(hp.lr))
        self.kl_init: torch.Tensor | None = None
        self.steps, self.early_stop = int(hp.steps), float(hp.early_stop_loss)
        self.most_probable_stop = int(hp.most_probable_stop)
        self.times_on_top = [0] * batch.n_requests  # MPES: evaluations where the new object was on top
        self.in_batch = batch.n_requests  # requests whose rows the batch still holds (the active ones)
        self.max_norm = float(hp.clamp_norm_factor) * self.v0_norm
        self.active = [True] * batch.n_requests
        self.losses: list[list[float]] = [[] for _ in range(batch.n_requests)]
        self.p_target: list[float] = [0.0] * batch.n_requests
        self.step_index = 0

    @property
    def done(self) -> bool:
        return not any(self.active)

    def step(self) -> bool:
        """One iteration for every active request; True once every request has finished."""
        with batch_invariant(self.model):
            return self._step()

    def _step(self) -> bool:
        parts = value_loss(
            self.model, self.spec, self.module, self.batch, self.delta, self.v0_norm, self.kl_init, self.hp
        )
        if self.kl_init is None:
            self.kl_init = parts.kl_logp.detach()
        checks = torch.stack([parts.total.detach(), parts.p_target, parts.target_top.float()])
        totals, p_target, on_top = checks.tolist()  # the one sync
        last = self.step_index == self.steps - 1
        stepping = []
        for r, active in enumerate(self.active):
            if not active:
                continue
            self.losses[r].append(totals[r])
            self.p_target[r] = p_target[r]
            self.times_on_top[r] += int(on_top[r])
            most_probable = 0 < self.most_probable_stop <= self.times_on_top[r]
            if totals[r] < self.early_stop or last or most_probable:
                self.active[r] = False
            else:
                stepping.append(r)
        self.step_index += 1
        if not stepping:
            return True
        frozen = None
        if len(stepping) < len(self.active):
            frozen = torch.tensor([r not in stepping for r in range(len(self.active))], device=self.delta.device)
            kept = self.delta.detach().clone()
        self.opt.zero_grad(set_to_none=True)
        (parts.total.sum() if len(stepping) == len(self.active) else parts.total[stepping].sum()).backward()
        self.opt.step()
        with torch.no_grad():
            # finished requests keep their δ (Adam's momentum would still move it); the others are clamped
            if frozen is not None:
                self.delta.copy_(torch.where(frozen[:, None], kept, self.delta))
            scale = (self.max_norm / self.delta.norm(dim=-1).clamp_min(1e-30)).clamp(max=1.0)
            self.delta.mul_(scale[:, None])
        if len(stepping) < self.in_batch:  # the finished leave the batch
            self.batch, kept_kl = self.batch.subset(stepping)
            self.kl_init, self.in_batch = self.kl_init[kept_kl], len(stepping)
        return False

    def result(self) -> torch.Tensor:
        """δ [R, d], detached."""
        return self.delta.detach().clone()


class MicroBatches:
    """One batch's requests optimised in micro-batches, stepped as one optimisation: each ``step`` runs one
    step of every micro-batch still going (its forward, backward and Adam step; its graph is freed before
    the next one's forward), so one micro-batch's activations are in memory at a time. Every request's δ,
    losses and early stop are its own (``batch_invariant``), so the result is the whole batch's, in
    float32 as in bf16. The interface of ``ValueOptimisation``: ``step``, ``done``, ``steps``, ``losses``,
    ``p_target``, ``result``."""

    def __init__(self, parts: Sequence[ValueOptimisation]) -> None:
        self.parts = list(parts)
        self.steps = self.parts[0].steps

    @property
    def done(self) -> bool:
        return all(p.done for p in self.parts)

    @property
    def losses(self) -> list[list[float]]:
        return [losses for p in self.parts for losses in p.losses]

    @property
    def p_target(self) -> list[float]:
        return [x for p in self.parts for x in p.p_target]

    def step(self) -> bool:
        for part in self.parts:
            if not part.done:
                part.step()
        return self.done

    def result(self) -> torch.Tensor:
        return torch.cat([p.result() for p in self.parts])


# ``micro_batch`` auto on a GPU: the most a micro-batch's activations may take, and at most half the free memory
# (the rest is for the solves that follow and for the allocator's slack). By ``step_memory``'s arithmetic, 8 GiB
# keeps MEMIT's 100 requests on an 8B model in bf16 near the weights + 16 GB (with C's 8 GB of Cholesky factors)
# and within a 48 GB card (the issue measured 71 GB peak in one batch).
MICRO_BATCH_MEMORY = 8 * 2**30


def step_memory(model: torch.nn.Module, spec: ArchSpec, layer: int, requests: Sequence[Rows]) -> int:
    """Estimated bytes of one v* step's activations for ``requests`` with δ at ``layer``: autograd keeps, for
    every block after it and every suffix token (rows padded to the longest suffix), about 16 x d_model +
    4 x d_ff values in the model's dtype (the norms' float32 copies, q/k/v, the attention output, the MLP's
    gate, up and product: 246 kB per token per block for Llama-3-8B in bf16, within 30% of what the issue's
    H200 run took), plus the float32 logits, log-probabilities and their gradient at the loss positions."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    d_model, d_ff = config.hidden_size, spec.key_size(model, layer)
    element = next(model.parameters()).element_size()
    blocks = spec.num_layers(model) - layer
    suffix = max(len(r) - s for rows in requests for r, s in zip(rows.ids, rows.subject_last))
    tokens = suffix * sum(len(rows.ids) for rows in requests)
    positions = sum(rows.n_rewrite * len(rows.target) + len(rows.ids) - rows.n_rewrite for rows in requests)
    return tokens * blocks * (16 * d_model + 4 * d_ff) * element + positions * config.vocab_size * 4 * 3


def requests_per_micro_batch(n_requests: int, memory: int, free: int) -> int:
    """``micro_batch`` auto: the most requests whose step (``memory`` bytes for all ``n_requests``) takes at
    most ``MICRO_BATCH_MEMORY`` and half of ``free`` bytes; at least one."""
    budget = min(MICRO_BATCH_MEMORY, free // 2)
    return max(1, min(n_requests, budget * n_requests // max(memory, 1)))


_memory_noted = False  # the note below is printed once per process: every batch of a sequential run would repeat it


def note_if_short_of_memory(n_requests: int, memory: int) -> None:
    """On a CPU the requests' step runs all at once (so the result does not depend on the memory free at the
    time); when its ``memory`` bytes pass half the available RAM, say so, and which ``micro_batch`` would fit,
    before the run is killed for memory with no message."""
    global _memory_noted
    available = psutil.virtual_memory().available
    if memory > available // 2 and not _memory_noted:
        _memory_noted = True
        fit = requests_per_micro_batch(n_requests, memory, available)
        print(
            f"note: the z optimisation of {n_requests} requests takes about {memory / 2**30:.1f} GiB at once and "
            f"{available / 2**30:.1f} GiB of memory is available; edit.memit.micro_batch={fit} splits it (the same z "
            "within 1e-6)",
            file=sys.stderr,
        )


def _free_memory(device: torch.device) -> int:
    """Bytes free on a CUDA device: the driver's free memory and what PyTorch's allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_value_settings(hp: Any, where: str) -> None:
    """A value optimisation's settings a run cannot start with, refused before any work (``where``: the key
    prefix, e.g. ``edit.memit.v``)."""
    stop = hp.most_probable_stop
    if isinstance(stop, bool) or not isinstance(stop, int) or stop < 0:
        raise UserError(
            f"{where}.most_probable_stop={stop} must be a count >= 0: stop at the N-th step the new object is "
            "the most probable token (MPES), 0: off (method encore takes edit.encore.most_probable_stop)"
        )


def optimise_values(
    model: torch.nn.Module,
    spec: ArchSpec,
    module: str,
    layer: int,
    requests: Sequence[Rows],
    v0: torch.Tensor,
    hp: ValueHparams,
    pad: int,
    micro_batch: int | None = None,
) -> ValueOptimisation | MicroBatches:
    """The optimisation of every request's δ at ``module`` (in block ``layer``), in micro-batches of
    ``micro_batch`` requests (None: auto, by free memory on a GPU, ``requests_per_micro_batch``; all at
    once elsewhere, with a note when that may not fit). One micro-batch is a plain ``ValueOptimisation``."""
    n = len(requests)
    device = model_device(model)
    if micro_batch is None:
        micro_batch = n
        if device.type == "cuda":
            micro_batch = requests_per_micro_batch(n, step_memory(model, spec, layer, requests), _free_memory(device))
        else:
            note_if_short_of_memory(n, step_memory(model, spec, layer, requests))
    parts = []
    for i in range(0, n, micro_batch):
        batch = ValueBatch.build(model, spec, requests[i : i + micro_batch], pad)
        parts.append(ValueOptimisation(model, spec, module, batch, v0[i : i + micro_batch], hp))
    return parts[0] if len(parts) == 1 else MicroBatches(parts)


def norm_anchor(v0: torch.Tensor, delta: torch.Tensor, reference: float, skip_factor: float) -> torch.Tensor:
    """Norm-Anchor Scaling (NAS: Liu et al. 2026, arXiv 2602.02543, as its authors' code does it): each solved
    value v* = v₀ + δ ([R, d]) rescaled to the norm ``reference``, returned as the δ' with v₀ + δ' = reference x
    v*/‖v*‖. The reference is measured on the unedited model, so what is written cannot grow with the edits
    already in the weights (the norm feedback loop NAS breaks). A v* longer than ``skip_factor`` x reference is
    an outlier whose δ is dropped (δ' = 0: v* = v₀, nothing new is written), NAS's rule. Applied once, to the
    optimisation's result: the per-step clamp of ‖δ‖ is unchanged. float64 inside, ``delta``'s dtype out."""
    v0, v = v0.double(), v0.double() + delta.double()
    norm = v.norm(dim=-1, keepdim=True)
    anchored = v * (reference / norm.clamp_min(torch.finfo(torch.float64).tiny)) - v0
    return torch.where(norm <= skip_factor * reference, anchored, 0.0).to(delta.dtype)


class NormReference:
    """NAS's reference norm, taken over the first units an editor solves: each unit's solved ‖v*‖ (before
    anchoring) join ``norms`` until at least ``count`` values are in, and the reference is their trimmed mean
    (``anchor_reference``), frozen from then on; a unit before that is anchored to the mean of the values so far
    (the first unit to its own). ``count=1``: the first unit alone (NAS's first batch). A larger count matters
    for ROME, whose unit is one request: otherwise that request's norm alone anchors every later edit, and the
    run depends on which request comes first (docs/edit.md#norm-anchoring-nas)."""

    def __init__(self, count: int, trim: float) -> None:
        if count < 1:
            raise UserError(f"edit.nas.reference_values={count} must be at least 1 (1: the first unit's values)")
        self.count, self.trim = int(count), float(trim)
        self.norms: torch.Tensor | None = None  # float64, on the CPU: the solved norms taken so far
        self.value: float | None = None

    @property
    def frozen(self) -> bool:
        """Set for good: enough values are in (or a ledger from before this rule saved the reference alone)."""
        return self.value is not None and (self.norms is None or len(self.norms) >= self.count)

    def update(self, solved: torch.Tensor) -> float:
        """The reference for the unit whose solved norms are ``solved``, taking them in while not frozen."""
        if not self.frozen:
            new = solved.detach().double().flatten().cpu()
            self.norms = new if self.norms is None else torch.cat([self.norms, new])
            self.value = anchor_reference(self.norms, self.trim)
        return self.value

    def state(self) -> dict[str, torch.Tensor]:
        if self.value is None:
            return {}
        out = {"anchor_reference": torch.tensor([self.value], dtype=torch.float64)}
        return out if self.norms is None else {**out, "anchor_norms": self.norms.clone()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Exactly what ``state`` saved: no reference when it saved none (a snapshot taken before the first unit
        puts the editor back to its start, as the case evaluation does between cases)."""
        reference, norms = tensors.get("anchor_reference"), tensors.get("anchor_norms")
        self.value = None if reference is None else float(reference[0])
        self.norms = None if norms is None or reference is None else norms.double().clone()


def anchor_reference(norms: torch.Tensor, trim: float) -> float:
    """NAS's reference norm from the norms of solved values (unanchored, on the unedited model): their mean
    with the largest ``trim`` fraction dropped (NAS drops 5%, so a few runaway solutions do not set it)."""
    if not 0.0 <= trim < 1.0:
        raise UserError(f"edit.nas.trim={trim} must be a fraction in [0, 1) (NAS: 0.05)")
    kept = norms.double().flatten().sort().values
    return float(kept[: len(kept) - int(trim * len(kept))].mean())
