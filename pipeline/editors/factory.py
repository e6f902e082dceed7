"""Which layer an editor edits and the ``edit`` defaults for a model: resolved where the editors are built."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig

from pipeline.config import model_file_for
from pipeline.core.loading import cache_root, configure
from pipeline.errors import UserError

__all__ = ["edit_defaults", "edit_layer"]


def edit_defaults(model: Any = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The ``edit`` group as configured in ``configs/`` for ``model`` (a loaded HF model, a name, or None for
    the default model), with ``edit.x=y`` style overrides: what the Python API uses when given no hparams."""
    if model is None or isinstance(model, str):
        return configure([*([f"model.name={model}"] if model else []), *overrides]).edit
    config = getattr(model, "config", None)
    names = [getattr(config, "name_or_path", "") or ""]
    marker = Path(names[0]) / "rome_identity.json" if names[0] else None
    if marker is not None and marker.is_file():  # the embedded models' converted copies name themselves
        names.insert(0, json.loads(marker.read_text()).get("name", ""))
    family = getattr(config, "model_type", None)
    found = next((f for f in (model_file_for(n, model_type=family) for n in names if n) if f is not None), None)
    return configure(list(overrides), model_file=found).edit


def edit_layer(cfg: DictConfig, loaded: Any) -> int:
    """``edit.layer`` checked against the model; ``auto`` takes the trace stage's latest recommendation."""
    layer = cfg.edit.layer
    if isinstance(layer, str) and layer == "auto":
        from pipeline.tracing.trace import latest_recommendation

        layer, path = latest_recommendation(cache_root(cfg), loaded.identity)
        print(f"edit.layer=auto: layer {layer}, recommended by the trace stage in {path}")
    if layer is None:
        raise UserError("this model has no default edit layer; pass edit.layer=N (or edit.layer=auto after a trace)")
    return loaded.spec.check_layer(loaded.model, layer, "edit.layer")
