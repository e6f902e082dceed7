"""Constrained fine-tuning of one weight matrix (the paper's FT+L baseline).

Adam on the NLL of the new object's tokens after the rewrite prompt (teacher-forced, mean over tokens),
only ``weight`` trainable; after every step the weight is clamped into the L∞ ball of radius ``eps``
around its original value. Stops early when the loss falls below ``early_stop_loss``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .probability import target_token_ids

__all__ = ["constrained_finetune"]


def constrained_finetune(model: torch.nn.Module, tokenizer: Any, weight: torch.nn.Parameter, prompt: str, target: str,
                         lr: float, steps: int, eps: float, early_stop_loss: float) -> dict[str, Any]:
    """Fine-tune ``weight`` in place; returns the losses and the final L∞ distance from the original."""
    device = weight.device
    p_ids = tokenizer(prompt)["input_ids"]
    t_ids = target_token_ids(tokenizer, target)
    ids = torch.tensor([p_ids + t_ids[:-1]], device=device)
    positions = torch.arange(len(p_ids) - 1, len(p_ids) - 1 + len(t_ids), device=device)
    target_ids = torch.tensor(t_ids, device=device)
    original = weight.detach().clone()
    lo, hi = original - eps, original + eps
    model.requires_grad_(False)
    weight.requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)
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
                    weight.copy_(torch.clamp(weight, lo, hi))
    finally:
        weight.requires_grad_(False)
        weight.grad = None
    return {"losses": losses, "steps": len(losses), "linf": float((weight.detach() - original).abs().max()),
            "seconds": time.perf_counter() - t0}
