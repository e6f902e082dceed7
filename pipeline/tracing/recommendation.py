"""The recommended edit layer a dataset trace leaves for ``edit.layer=auto``: one JSON file per model in
the project cache, saved by the trace stage and read by the editors."""

from __future__ import annotations

import json
from pathlib import Path

from rome.pipeline.core.atomic import write_json
from rome.pipeline.errors import UserError
from rome.pipeline.tracing.cache_dir import model_dir

__all__ = ["save_recommendation", "latest_recommendation"]

_FILE = "recommended_layer.json"


def save_recommendation(
    cache_dir: str | Path, identity: dict[str, str], layer: int, n_facts: int, summary: str | Path
) -> Path:
    """Record ``layer`` as this model's recommended edit layer (atomically); returns the file."""
    path = model_dir(cache_dir, identity) / _FILE
    write_json(
        path, {"layer": int(layer), "model": identity, "n_facts": int(n_facts), "summary": str(Path(summary).resolve())}
    )
    return path


def latest_recommendation(cache_dir: str | Path, model_identity: dict[str, str]) -> tuple[int, Path]:
    """The edit layer the latest dataset trace recommended for this model, and the file it came from.
    Raises UserError (saying how to make one) when this model has never been traced over a dataset."""
    path = model_dir(cache_dir, model_identity) / _FILE
    try:
        rec = json.loads(path.read_text())
        layer = int(rec["layer"])
    except FileNotFoundError:
        raise UserError(
            f"no traced layer recommendation for model {model_identity.get('name')} yet ({path} is missing); "
            "run python train.py stage=trace trace.dataset=../shared/data/known_1000.json first, "
            "or pass edit.layer=N"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read the layer recommendation {path}: {err}; rerun the trace stage") from err
    # the directory name holds a short hash of the identity; the record's own copy catches a collision or a
    # file copied in from another model's directory
    if rec.get("model") != dict(model_identity):
        raise UserError(f"{path} was written for model {rec.get('model')}, not {model_identity}; rerun the trace stage")
    return layer, path
