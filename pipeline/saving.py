"""Saving an edited model so that plain transformers loads it: ``save_pretrained`` (safetensors) and the
tokenizer, written into a temporary directory and renamed into place as a whole."""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_dir
from .loading import LoadedModel

__all__ = ["save_model"]


def save_model(loaded: LoadedModel, directory: str | Path) -> None:
    with atomic_dir(directory) as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
