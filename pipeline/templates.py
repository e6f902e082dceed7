"""Context templates: the bare prompt plus short prefixes sampled from the model itself.

ROME averages the key and optimises v* over "<prefix>. {prompt}" so that the edit holds in context, not
only for the bare prompt.  Prefixes are sampled (top-k) from seed words in one batched ``generate``
call, seeded, and cached per model so every edit of that model uses the same templates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


from .atomic import write_json
from .digest import json_digest
from .generation import generate_tokens

__all__ = ["context_templates"]


def _sample_prefixes(model, tokenizer, seeds: Sequence[str], lengths: Sequence[Sequence[int]], top_k: int,
                     seed: int) -> list[str]:
    """One batched call: every (length, count) group is cut from rows of the longest generation."""
    total = sum(n for _, n in lengths)
    longest = max(length for length, _ in lengths)
    prompts = [seeds[i % len(seeds)] for i in range(total)]
    new = generate_tokens(model, tokenizer, prompts, longest, top_k=top_k, seed=seed)
    texts, row = [], 0
    for length, n in lengths:
        for _ in range(n):
            seed_text = prompts[row]
            cont = tokenizer.decode(new[row, :length], skip_special_tokens=True)
            texts.append((seed_text + cont).replace("{", " ").replace("}", " ").replace("\n", " ").strip())
            row += 1
    return texts


def context_templates(model, tokenizer, identity: dict[str, str], cfg: Any, cache_dir: Path | None,
                      seed: int = 0) -> list[str]:
    """``["{}", "<prefix 1>. {}", ...]``; cached in ``cache_dir`` per model identity and settings."""
    lengths = [tuple(int(x) for x in pair) for pair in cfg.lengths]
    settings = {"model": identity, "seeds": list(cfg.seeds), "lengths": lengths, "top_k": int(cfg.top_k), "seed": seed}
    digest = json_digest(settings)
    path = Path(cache_dir) / "templates" / f"{digest}.json" if cache_dir else None
    if path is not None and path.exists():
        return json.loads(path.read_text())["templates"]
    prefixes = _sample_prefixes(model, tokenizer, list(cfg.seeds), lengths, int(cfg.top_k), seed)
    templates = ["{}"] + [f"{p}. {{}}" for p in prefixes]
    if path is not None:
        write_json(path, {**settings, "templates": templates})
    return templates
