"""Context templates: the bare prompt plus short prefixes sampled from the model itself.

ROME averages the key and optimises v* over "<prefix>. {prompt}" so that the edit holds in context, not
only for the bare prompt.  Prefixes are sampled (top-k) in one batched ``generate`` call, seeded, and cached
per model so every edit of that model uses the same templates. Two styles (``edit.templates.style``):

- ``seeded`` (the default; MEMIT's release): each prefix starts from a seed word (The, Therefore, Because,
  I, You) and a length counts the *new* tokens: 10 prefixes of the seed + 5 tokens, 10 of the seed + 10.
- ``original`` (ROME's release, ``rome_main.get_context_templates``): each prefix is sampled from the
  beginning-of-text token alone (``<|endoftext|>`` where the vocabulary has it, as in ROME; else the
  tokenizer's BOS, or EOS) and a length *includes* that token: 10 prefixes of 4 new tokens, 10 of 9.
  Double newlines become spaces and the text is NFKD-normalised, as its ``generate_fast`` does.

In both, end-of-text is never sampled inside a prefix and braces become spaces (a template has one ``{}``).
"""

from __future__ import annotations

import json
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from rome.pipeline.core.atomic import write_json
from rome.pipeline.core.digest import json_digest
from rome.pipeline.core.generation import generate_tokens
from rome.pipeline.errors import UserError

__all__ = ["context_templates", "STYLES", "start_text"]

STYLES = ("seeded", "original")
ROME_START = "<|endoftext|>"  # what ROME's release samples its prefixes from (GPT-2's only special token)


def start_text(tokenizer: Any) -> str:
    """The one-token text the ``original`` style samples from: ROME's ``<|endoftext|>`` where it is one token
    of this vocabulary, else the tokenizer's BOS (EOS when there is none)."""
    ids = tokenizer(ROME_START, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == ROME_START:
        return ROME_START
    start = tokenizer.bos_token or tokenizer.eos_token
    if start is None:
        raise UserError(
            "edit.templates.style=original needs a beginning- or end-of-text token and this tokenizer "
            "has neither; use edit.templates.style=seeded"
        )
    return start


def _sample_prefixes(
    model: nn.Module,
    tokenizer: Any,
    style: str,
    seeds: Sequence[str],
    lengths: Sequence[Sequence[int]],
    top_k: int,
    seed: int,
) -> list[str]:
    """One batched call: every (length, count) group is cut from rows of the longest generation."""
    total = sum(n for _, n in lengths)
    original = style == "original"
    new_counts = [length - 1 if original else length for length, n in lengths for _ in range(n)]
    prompts = [start_text(tokenizer)] * total if original else [seeds[i % len(seeds)] for i in range(total)]
    new = generate_tokens(
        model, tokenizer, prompts, max(new_counts), top_k=top_k, seed=seed, add_special_tokens=not original
    )
    texts = []
    for row, (prompt, count) in enumerate(zip(prompts, new_counts)):
        cont = tokenizer.decode(new[row, :count], skip_special_tokens=True)
        if original:  # the start token itself is not text
            texts.append(unicodedata.normalize("NFKD", cont).replace("\n\n", " ").replace("{", " ").replace("}", " "))
        else:
            texts.append((prompt + cont).replace("{", " ").replace("}", " ").replace("\n", " ").strip())
    return texts


def context_templates(
    model: nn.Module, tokenizer: Any, identity: dict[str, str], cfg: Any, cache_dir: Path | None, seed: int = 0
) -> list[str]:
    """``["{}", "<prefix 1>. {}", ...]``; cached in ``cache_dir`` per model identity and settings."""
    style = str(cfg.style)
    if style not in STYLES:
        raise UserError(f"edit.templates.style={style} is not one of {', '.join(STYLES)}")
    lengths = [tuple(int(x) for x in pair) for pair in cfg.lengths]
    if style == "original" and min(length for length, _ in lengths) < 2:
        raise UserError("edit.templates.style=original counts the start token in each length: lengths must be >= 2")
    settings = {
        "model": identity,
        "style": style,
        "seeds": list(cfg.seeds),
        "lengths": lengths,
        "top_k": int(cfg.top_k),
        "seed": seed,
    }
    digest = json_digest(settings)
    path = Path(cache_dir) / "templates" / f"{digest}.json" if cache_dir else None
    if path is not None and path.exists():
        cached = _read_cache(path, settings)
        if cached is not None:
            return cached
    prefixes = _sample_prefixes(model, tokenizer, style, list(cfg.seeds), lengths, int(cfg.top_k), seed)
    templates = ["{}"] + [f"{p}. {{}}" for p in prefixes]
    if path is not None:
        write_json(path, {**settings, "templates": templates})
    return templates


def _read_cache(path: Path, settings: dict[str, Any]) -> list[str] | None:
    """The cached templates when the file is whole and made with these settings; a damaged one (truncated, not
    UTF-8, another shape) is reported in one line and sampled again (the same seed gives the same templates)."""
    try:
        data = json.loads(path.read_text())
        templates = data["templates"]
        expected = json.loads(json.dumps(settings))  # as JSON stores them (tuples come back as lists)
        if {k: data.get(k) for k in expected} != expected or not isinstance(templates, list) or templates[:1] != ["{}"]:
            raise ValueError("not made with these settings")
        if not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
            raise ValueError("a template without exactly one {}")
        return templates
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError) as err:
        print(f"context templates cache {path} is damaged ({type(err).__name__}); sampling them again", file=sys.stderr)
        return None
