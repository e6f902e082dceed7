"""The pieces of ROME's v* optimisation that do not depend on Lightning.

Rows: one "rewriting" row per context template, ``<template with the prompt> + target[:-1]`` (the loss is
the NLL of the target tokens), plus one KL row ``"{subject} is a"`` (KL of its next-token distribution at
the subject's last token against the unedited model). δ is added to the edited layer's MLP output at the
subject's last token of every row.

Work δ cannot change is done once (``ValueBatch.build``):
- tokens before the subject's last token never see δ (causal attention), at any layer: their keys and
  values are computed once as a KV cache, and each step runs only the tokens from the subject's last
  token on (the "suffix");
- the loss needs the LM head only at the target positions and the KL position, not over the sequence.
``reference_loss`` is the plain way (whole model on whole prompts, full logits), kept to check against.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .arch import ArchSpec
from .hooks import Trace, get_module
from .probability import target_token_ids
from .subject import fill_prompt, subject_token_range

__all__ = ["Rows", "build_rows", "key_and_value", "ValueBatch", "value_loss", "reference_loss", "LossParts"]


@dataclasses.dataclass
class Rows:
    ids: list[list[int]]  # full token ids of every row
    subject_last: list[int]  # index of the subject's last token in each row
    n_rewrite: int  # rows [0, n_rewrite) are rewriting rows, the rest KL rows
    target: list[int]  # target token ids


def _tokens_and_subject(tokenizer: Any, template: str, subject: str) -> tuple[list[int], int]:
    text, start, end = fill_prompt(template, subject)
    ids = tokenizer(text)["input_ids"]
    return ids, subject_token_range(tokenizer, text, start, end)[1] - 1


def build_rows(tokenizer: Any, templates: Sequence[str], prompt: str, subject: str, target_new: str,
               kl_prompts: Sequence[str] = ("{} is a",)) -> Rows:
    target = target_token_ids(tokenizer, target_new)
    ids, last = [], []
    for t in templates:
        row, s = _tokens_and_subject(tokenizer, t.replace("{}", prompt), subject)
        ids.append(row + target[:-1])
        last.append(s)
    for kl in kl_prompts:
        row, s = _tokens_and_subject(tokenizer, kl, subject)
        ids.append(row)
        last.append(s)
    return Rows(ids, last, len(templates), target)


def _right_pad(rows: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(map(len, rows)))
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(r, device=device)
            mask[i, : len(r)] = 1
    return ids, mask


@torch.no_grad()
def key_and_value(model: torch.nn.Module, tokenizer: Any, spec: ArchSpec, layer: int, templates: Sequence[str],
                  prompt: str, subject: str) -> tuple[torch.Tensor, torch.Tensor]:
    """k* and v₀: the down-projection's input and output at the subject's last token, each averaged
    over *the same* templates (one batched pass that stops after the layer)."""
    device = next(model.parameters()).device
    rows = [_tokens_and_subject(tokenizer, t.replace("{}", prompt), subject) for t in templates]
    ids, mask = _right_pad([r for r, _ in rows], tokenizer.pad_token_id or 0, device)
    with Trace(get_module(model, spec.down_proj_name(layer)), retain_input=True, retain_output=True, stop=True) as t:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    idx = torch.tensor([s for _, s in rows], device=device)
    at = torch.arange(len(rows), device=device)
    return t.input[at, idx].float().mean(0), t.output[at, idx].float().mean(0)


@dataclasses.dataclass
class LossParts:
    total: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    weight_decay: torch.Tensor
    p_target: torch.Tensor  # mean over rewriting rows of exp(-NLL per row): how sure the model is


def _loss_parts(target_logp: torch.Tensor, target_mask: torch.Tensor, kl_logp: torch.Tensor,
                kl_init: torch.Tensor | None, delta: torch.Tensor, v0_norm: float, hp: Any) -> LossParts:
    """ROME's loss: mean over rewriting rows of (sum of target NLL / target length), plus
    kl_factor x KL(current || initial) at the KL rows, plus weight_decay x ‖δ‖ / ‖v₀‖²."""
    n_target = target_mask.shape[1]
    nll_rows = -(target_logp * target_mask).sum(1) / n_target
    nll = nll_rows.mean()
    kl = torch.zeros((), device=delta.device)
    if kl_init is not None:
        kl = hp.kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
    wd = hp.weight_decay * (delta.norm() / v0_norm**2)
    return LossParts(nll + kl + wd, nll, kl, wd, torch.exp(-nll_rows).mean().detach())


@dataclasses.dataclass
class ValueBatch:
    """Everything a step needs, built once per request."""

    suffix_ids: torch.Tensor  # [R, S]: from each row's subject-last token on, right-padded
    full_mask: torch.Tensor  # [R, P + S]: prefix mask then suffix mask
    suffix_pos: torch.Tensor  # [R, S]: true positions of the suffix tokens
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # per-layer K, V of the prefix (pads zeroed)
    target_rows: torch.Tensor  # gather indices (rows, suffix columns) of the logits predicting target tokens
    target_cols: torch.Tensor
    target_ids: torch.Tensor  # [n_rewrite, n_target]
    n_rewrite: int

    @classmethod
    @torch.no_grad()
    def build(cls, model: torch.nn.Module, rows: Rows, pad: int) -> "ValueBatch":
        device = next(model.parameters()).device
        prefixes = [r[:s] for r, s in zip(rows.ids, rows.subject_last)]
        suffixes = [r[s:] for r, s in zip(rows.ids, rows.subject_last)]
        prefix_ids, prefix_mask = _right_pad(prefixes, pad, device)
        suffix_ids, suffix_mask = _right_pad(suffixes, pad, device)
        lengths = torch.tensor(rows.subject_last, device=device)
        prefix_kv = None
        if max(rows.subject_last) > 0:
            pos = torch.arange(prefix_ids.shape[1], device=device).expand_as(prefix_ids)
            out = model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=pos, use_cache=True)
            keep = prefix_mask[:, None, :, None].bool()  # zero the pads: a 0-weight NaN would still poison
            prefix_kv = [(torch.where(keep, l.keys, 0), torch.where(keep, l.values, 0)) for l in out.past_key_values.layers]
        else:
            prefix_mask = prefix_mask[:, :0]
        suffix_pos = lengths[:, None] + torch.arange(suffix_ids.shape[1], device=device)[None]
        n, t = rows.n_rewrite, len(rows.target)
        # In suffix coordinates the prompt's last token sits at (row length - subject_last - 1) - (t - 1):
        # the logits there and at the t - 1 following columns predict the t target tokens.
        starts = torch.tensor([len(r) - s - t for r, s in zip(rows.ids[:n], rows.subject_last[:n])], device=device)
        cols = starts[:, None] + torch.arange(t, device=device)[None]
        return cls(suffix_ids, torch.cat([prefix_mask, suffix_mask], 1), suffix_pos, prefix_kv,
                   torch.arange(n, device=device)[:, None].expand(n, t), cols,
                   torch.tensor(rows.target, device=device)[None].expand(n, t), n)

    def cache(self):
        if self.prefix_kv is None:
            return None
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=self.prefix_kv)


def _add_at_column0(delta: torch.Tensor):
    def edit(h: torch.Tensor) -> torch.Tensor:
        onehot = torch.zeros(h.shape[1], 1, device=h.device, dtype=h.dtype)
        onehot[0] = 1
        return h + onehot * delta.to(h.dtype)

    return edit


def value_loss(model: torch.nn.Module, spec: ArchSpec, layer: int, batch: ValueBatch, delta: torch.Tensor,
               v0_norm: float, kl_init: torch.Tensor | None, hp: Any) -> tuple[LossParts, torch.Tensor]:
    """One step's loss, running only the suffix tokens and the LM head only where the loss looks.
    Returns the parts and the KL rows' log-probabilities (the initial ones become ``kl_init``)."""
    mlp = get_module(model, spec.mlp_name(layer))
    norm = get_module(model, spec.final_norm)
    with Trace(mlp, edit_output=_add_at_column0(delta)), Trace(norm, retain_output=True, stop=True, detach=False) as out:
        model(input_ids=batch.suffix_ids, attention_mask=batch.full_mask, position_ids=batch.suffix_pos,
              past_key_values=batch.cache(), use_cache=batch.prefix_kv is not None)
    head = get_module(model, spec.lm_head)
    h = out.output
    n = batch.n_rewrite
    target_logits = head(h[batch.target_rows, batch.target_cols]).float()  # [n, t, vocab]
    target_logp = torch.log_softmax(target_logits, -1).gather(-1, batch.target_ids[..., None])[..., 0]
    kl_logp = torch.log_softmax(head(h[n:, 0]).float(), -1)
    mask = torch.ones_like(target_logp)
    return _loss_parts(target_logp, mask, kl_logp, kl_init, delta, v0_norm, hp), kl_logp


def reference_loss(model: torch.nn.Module, spec: ArchSpec, layer: int, rows: Rows, pad: int, delta: torch.Tensor,
                   v0_norm: float, kl_init: torch.Tensor | None, hp: Any) -> tuple[LossParts, torch.Tensor]:
    """The same loss the way the original computes it: the whole model over the whole right-padded
    prompts every step, δ added at each row's subject-last token, logits over every position."""
    device = next(model.parameters()).device
    ids, mask = _right_pad(rows.ids, pad, device)
    idx = torch.tensor(rows.subject_last, device=device)

    def add(h: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(idx, h.shape[1]).to(h.dtype)[..., None]  # [R, T, 1]
        return h + onehot * delta.to(h.dtype)

    with Trace(get_module(model, spec.mlp_name(layer)), edit_output=add):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    logp = torch.log_softmax(logits, -1)
    n, t = rows.n_rewrite, len(rows.target)
    lengths = mask.sum(1)
    target = torch.tensor(rows.target, device=device)[:, None]
    # row i = prompt + target[:-1]: the logits at lengths[i] - t + j predict target token j
    target_logp = torch.stack([logp[i, lengths[i] - t + torch.arange(t, device=device)].gather(-1, target)[:, 0]
                               for i in range(n)])
    kl_logp = logp[torch.arange(n, len(rows.ids), device=device), idx[n:]]
    return _loss_parts(target_logp, torch.ones_like(target_logp), kl_logp, kl_init, delta, v0_norm, hp), kl_logp
