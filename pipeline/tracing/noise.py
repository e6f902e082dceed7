"""The corruption: the noise level nu (ROME's 3 sigma of the subject-token embeddings, cached per model)
and the noise itself, nu * N(0, 1) drawn per fact and added to the subject's token embeddings."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rome.pipeline.core.arch import ArchSpec
from rome.pipeline.core.atomic import write_json
from rome.pipeline.core.digest import file_sha256, short
from rome.pipeline.core.hooks import Trace, get_module
from rome.pipeline.core.padding import right_pad
from rome.pipeline.core.timing import model_device
from rome.pipeline.errors import UserError
from rome.pipeline.tracing.cache_dir import model_dir
from rome.pipeline.tracing.facts import load_facts
from rome.pipeline.tracing.prompt import FactPrompt

__all__ = ["embedding_std", "subject_noise", "draw_noise", "fact_noise", "add_noise"]


@torch.inference_mode()
def embedding_std(model: nn.Module, spec: ArchSpec, tokenizer: Any, subjects: Sequence[str]) -> float:
    """Standard deviation of the token-embedding outputs of the subjects' tokens (ROME's sigma).
    Subjects are encoded on their own, without special tokens."""
    rows = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in subjects]
    rows = [r for r in rows if r]
    if not rows:
        raise UserError("no subject tokens to measure the embedding spread over")
    ids, mask = right_pad(rows, 0, model_device(model))
    with Trace(get_module(model, spec.embed), retain_output=True, stop=True) as t:
        model(input_ids=ids, use_cache=False)  # stops right after the embedding
    return float(t.output[mask.bool()].float().std())


def subject_noise(
    model: nn.Module,
    spec: ArchSpec,
    tokenizer: Any,
    identity: dict[str, str],
    subjects_file: str | Path,
    cache_dir: str | Path,
    *,
    factor: float,
) -> tuple[float, Path]:
    """nu = factor * sigma (``factor``: trace.noise_factor), sigma the embedding spread over the subjects of
    ``subjects_file`` (a known_1000-style file).  sigma is computed once per (model, file content) and
    cached as JSON; returns nu and that file."""
    try:
        digest = short(file_sha256(subjects_file))
    except OSError as err:
        raise UserError(
            f"cannot read trace.noise_subjects={subjects_file} ({err.strerror}); point it at "
            "known_1000.json or give the noise level itself: trace.noise=0.1"
        ) from None
    path = model_dir(cache_dir, identity) / f"embedding-std-{digest}.json"
    if path.exists():
        rec = json.loads(path.read_text())
        if rec.get("model") == dict(identity):
            return factor * float(rec["sigma"]), path
    subjects = [f.subject for f in load_facts(subjects_file)]  # as ROME: every record, repeats too
    sigma = embedding_std(model, spec, tokenizer, subjects)
    write_json(
        path,
        {"sigma": sigma, "subjects": len(subjects), "file": str(subjects_file), "sha256": digest, "model": identity},
    )
    return factor * sigma, path


def draw_noise(seed: int, samples: int, n_tokens: int, d_model: int, level: float) -> torch.Tensor:
    """[samples, n_tokens, d_model] of level * N(0, 1), drawn on the CPU so that a seed gives the same
    noise on every device; drawn once per fact and shared by every cell, whatever the batching."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(samples, n_tokens, d_model, generator=gen) * float(level)


def fact_noise(model: nn.Module, spec: ArchSpec, p: FactPrompt, level: float, samples: int, seed: int) -> torch.Tensor:
    """The noise of one fact: [samples, subject tokens, d_model], on the model's device and dtype."""
    param = get_module(model, spec.embed).weight
    d_model = param.shape[1]
    return draw_noise(seed, samples, p.subject[1] - p.subject[0], d_model, level).to(param.device, param.dtype)


def add_noise(x: torch.Tensor, noise: torch.Tensor, subject: tuple[int, int], rows: slice) -> torch.Tensor:
    """Embedding outputs ``x`` [rows, T, d] with ``noise`` added to the subject's tokens of ``rows``
    (a copy: the hook's input may be reused by the model)."""
    x = x.clone()
    x[rows, subject[0] : subject[1]] += noise.to(x)
    return x
