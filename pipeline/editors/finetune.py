"""Constrained fine-tuning of one weight matrix (the paper's FT+L baseline).

Adam on the NLL of the new object's tokens after the rewrite prompt (teacher-forced, mean over tokens),
only ``params`` trainable (FT+L: a down-projection's weight and bias); after every step each is clamped
into the L∞ ball of radius ``eps`` around its original value. Stops early when the loss falls below ``early_stop_loss``.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from pipeline.core.probability import target_token_ids

__all__ = ["constrained_finetune"]


def constrained_finetune(model: torch.nn.Module, tokenizer: Any, params: Sequence[torch.nn.Parameter], prompt: str,
                         target: str, lr: float, steps: int, eps: float, early_stop_loss: float) -> dict[str, Any]:
    """Fine-tune ``params`` in place; returns the losses and the final L∞ distance from the original."""
    params = list(params)
    device = params[0].device
    p_ids = tokenizer(prompt)["input_ids"]
    t_ids = target_token_ids(tokenizer, target)
    ids = torch.tensor([p_ids + t_ids[:-1]], device=device)
    positions = torch.arange(len(p_ids) - 1, len(p_ids) - 1 + len(t_ids), device=device)
    target_ids = torch.tensor(t_ids, device=device)
    originals = [p.detach().clone() for p in params]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    t0 = time.perf_counter()
    try:
        with torch.enable_grad():
            for _ in range(int(steps)):
                logits = model(input_ids=ids).logits[0, positions].float()
                loss = torch.nn.functional.cross_entropy(logits, target_ids)
                losses.append(loss.item())
                if losses[-1] < early_stop_loss:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for p, o in zip(params, originals):
                        p.copy_(torch.clamp(p, o - eps, o + eps))
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    linf = max(float((p.detach() - o).abs().max()) for p, o in zip(params, originals))
    return {"losses": losses, "steps": len(losses), "linf": linf, "seconds": time.perf_counter() - t0}
