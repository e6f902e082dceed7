"""A many-edit run's method in progress, saved at a batch boundary so that a stopped run resumes there.

What the next batch depends on is the edited matrices as they are now (every edit so far is in them) and the
editor's own state (``Editor.state``: UltraEdit's lifelong statistics, AlphaEdit's preserved keys, the NAS
reference). Both go into one safetensors file, ``<stem>.safetensors``; ``<stem>.json`` says how far the method
got (batches done, the curve so far, timings) and carries the file's sha256 and the settings it was made
with. Restoring both gives the model and the editor bit for bit as they were, so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rome.pipeline.core.atomic import write_json, write_tensors
from rome.pipeline.core.digest import file_sha256

__all__ = ["save_progress", "load_progress", "drop_progress"]


def save_progress(
    stem: Path, weights: dict[int, torch.Tensor], state: dict[str, torch.Tensor], info: dict[str, Any]
) -> None:
    """Write the edited matrices ``weights`` (layer -> tensor), the editor's ``state`` and ``info`` (JSON)."""
    tensors = {f"weight.{layer}": w.detach().cpu().contiguous() for layer, w in weights.items()}
    tensors.update({f"state.{name}": t.detach().cpu().contiguous() for name, t in state.items()})
    tensor_path = stem.with_suffix(".safetensors")
    digest = write_tensors(tensor_path, tensors)
    write_json(stem.with_suffix(".json"), {**info, "tensors": tensor_path.name, "sha256": digest})


def load_progress(
    stem: Path, settings: dict[str, Any]
) -> tuple[dict[str, Any], dict[int, torch.Tensor], dict[str, torch.Tensor]] | str | None:
    """(info, weights, state) as ``save_progress`` wrote them; None when there is nothing; a line saying why
    the saved progress cannot be used (other ``settings``, a damaged file) instead of raising: the caller
    then starts the method again."""
    from safetensors.torch import load_file

    info_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not info_path.exists():
        return None
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as e:
        return f"its progress file {info_path} is unreadable ({e})"
    if not isinstance(info, dict) or info.get("settings") != json.loads(json.dumps(settings)):
        return f"its progress in {info_path} was made with other settings"
    if not tensor_path.exists() or file_sha256(tensor_path) != info.get("sha256"):
        return f"its saved weights {tensor_path} are missing or do not match their checksum"
    tensors = load_file(str(tensor_path))
    weights = {int(k.split(".", 1)[1]): t for k, t in tensors.items() if k.startswith("weight.")}
    state = {k.split(".", 1)[1]: t for k, t in tensors.items() if k.startswith("state.")}
    return info, weights, state


def drop_progress(stem: Path) -> None:
    """Remove a finished method's saved progress (files this run wrote; nothing else)."""
    for suffix in (".json", ".safetensors"):
        stem.with_suffix(suffix).unlink(missing_ok=True)
