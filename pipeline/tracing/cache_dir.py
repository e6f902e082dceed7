"""Where tracing keeps its per-model files in the project cache (the noise level, the recommended layer):
one directory per model, named so that two models never share one."""

from __future__ import annotations

from pathlib import Path

from rome.pipeline.core.digest import json_digest, slug

__all__ = ["model_slug", "model_dir"]


def model_slug(identity: dict[str, str]) -> str:
    """A directory name for a model: its readable name plus a hash of its full identity."""
    return f"{slug(identity.get('name', 'model').strip('/'))}-{json_digest(identity)}"


def model_dir(cache_dir: str | Path, identity: dict[str, str]) -> Path:
    """This model's tracing directory under the project cache ``cache_dir``."""
    return Path(cache_dir) / "trace" / model_slug(identity)
