"""The v* loss as the original ROME release computes it, kept to check the fast path against: the whole model
over the whole right-padded prompts at every step, δ added at each row's subject-last token, logits at every
position. The tests compare ``value_loss`` with it (same numbers) and ``benchmarks/edit_latency.py`` times the
original's loop with it (the speed baseline). No editor uses it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rome.pipeline.core.arch import ArchSpec
from rome.pipeline.core.hooks import Trace, get_module
from rome.pipeline.core.padding import right_pad
from rome.pipeline.core.timing import model_device
from rome.pipeline.editors.hparams import ValueHparams
from rome.pipeline.editors.value import LossParts, Rows

__all__ = ["reference_loss"]


def reference_loss(
    model: torch.nn.Module,
    spec: ArchSpec,
    module: str,
    rows: Rows,
    pad: int,
    delta: torch.Tensor,
    v0_norm: torch.Tensor,
    kl_init: torch.Tensor | None,
    hp: ValueHparams,
) -> LossParts:
    """The same loss for one request the way the original computes it: the whole model over the whole
    right-padded prompts every step, δ added at each row's subject-last token, logits everywhere."""
    device = model_device(model)
    ids, mask = right_pad(rows.ids, pad, device)
    idx = torch.tensor(rows.subject_last, device=device)

    def add(h: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(idx, h.shape[1]).to(h.dtype)[..., None]  # [rows, T, 1]
        return h + onehot * delta[0].to(h.dtype)

    with Trace(get_module(model, module), edit_output=add):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    logp = torch.log_softmax(logits, -1)
    n, t = rows.n_rewrite, len(rows.target)
    lengths = mask.sum(1)
    target = torch.tensor(rows.target, device=device)[:, None]
    # row i = prompt + target[:-1]: the logits at lengths[i] - t + j predict target token j
    target_logp = torch.stack(
        [logp[i, lengths[i] - t + torch.arange(t, device=device)].gather(-1, target)[:, 0] for i in range(n)]
    )  # [n, t]
    nll = (-target_logp.sum(1) / t).mean()
    predicted = torch.stack([logp[i, lengths[i] - t + torch.arange(t, device=device)].argmax(-1) for i in range(n)])
    on_top = (predicted == target[:, 0]).all()  # MPES's test: every target token on top in every row
    kl_logp = logp[torch.arange(n, len(rows.ids), device=device), idx[n:]]
    kl = torch.zeros((), device=device)
    if kl_init is not None:
        kl = hp.kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
    wd = hp.weight_decay * delta[0].norm() / v0_norm[0] ** 2
    one = lambda x: x.reshape(1)  # noqa: E731
    return LossParts(
        one(nll + kl + wd),
        one(nll),
        one(kl),
        one(wd),
        one(torch.exp(target_logp.sum(1) / t).mean()),
        kl_logp,
        one(on_top),
    )
