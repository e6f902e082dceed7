"""What an editor is built from, read from the configuration: the method's hyperparameters (the ``edit``
group with a method file's overrides), the layer it edits, its context templates, and the defaults the
Python API uses. The editors import this module; the factory imports the editors."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rome.pipeline.config import model_file_for
from rome.pipeline.core.loading import LoadedModel, cache_root, configure
from rome.pipeline.editors.templates import context_templates
from rome.pipeline.errors import UserError
from rome.pipeline.tracing.recommendation import latest_recommendation

__all__ = [
    "method_hparams",
    "templates_for",
    "edit_defaults",
    "edit_layer",
    "changed_edit_settings",
    "changed_edit_note",
]

# a method file's keys that override the edit group (the rest: its class and its own settings); a method file's
# ``memit`` block is merged over edit.memit (encore.yaml: its tunable values point at edit.encore)
_EDIT_KEYS = ("layer", "variant", "mom2_adjustment", "memit")


def method_hparams(cfg: DictConfig, conf: DictConfig, measure_only: bool) -> DictConfig:
    """The ``edit`` group with the method file's overrides (its layer, variant, mom2_adjustment, memit when set);
    ``measure_only`` turns verification, rollback and generated text off."""
    own = {k: conf[k] for k in _EDIT_KEYS if k in conf and conf[k] is not None}
    # resolved here: a method file's ${edit.*} references belong to the run's config, not to the merged group
    own = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v for k, v in own.items()}
    hp = OmegaConf.merge(cfg.edit, own)
    if measure_only:
        hp = OmegaConf.merge(hp, {"generate_tokens": 0, "verify": {"enabled": False, "rollback": False}})
    return hp


def templates_for(cfg: DictConfig, loaded: LoadedModel, templates: DictConfig) -> list[str]:
    """Context templates for ``loaded`` (sampled once per model and setting with ``seed``, cached on disk)."""
    torch.manual_seed(int(cfg.seed))
    return context_templates(
        loaded.model, loaded.tokenizer, loaded.identity, templates, cache_root(cfg), seed=int(cfg.seed)
    )


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
        layer, path = latest_recommendation(cache_root(cfg), loaded.identity)
        print(f"edit.layer=auto: layer {layer}, recommended by the trace stage in {path}")
    if layer is None:
        raise UserError("this model has no default edit layer; pass edit.layer=N (or edit.layer=auto after a trace)")
    return loaded.spec.check_layer(loaded.model, layer, "edit.layer")


def changed_edit_settings(cfg: DictConfig) -> list[str]:
    """``edit.key=value`` for each ``edit`` setting of ``cfg`` (resolved) that differs from what ``configs/`` set for
    its model, ``method.name.key=value`` for each method file's value changed or method defined on the command line,
    and ``model.arch.key=value`` for each adapter override: what a results table must name, since a run with another
    setting measured another method."""

    def flat(node: Any, prefix: str) -> dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}.{key}").items()}
        return {prefix: node}

    def differing(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in ours.items() if key not in theirs or theirs[key] != value}

    model = [f"model.name={cfg.model.name}"] if cfg.model.get("name") else []
    configured = configure(model)
    changed = differing(
        flat(OmegaConf.to_container(cfg.edit, resolve=True), "edit"),
        flat(OmegaConf.to_container(configured.edit, resolve=True), "edit"),
    )
    # the method files as configs/ sets them under the run's edit group, so that a method value that points at
    # edit.* (encore's ${edit.encore.*}) is named once, as the edit key; a method defined on the command line
    # is named by its class and what differs from its class's file
    try:
        files = configure([*model, *(f"{key}={json.dumps(value)}" for key, value in changed.items())]).method
    except UserError:  # a value the command line cannot spell back: compare with the files as configs/ sets them
        files = configured.method
    for name, conf in OmegaConf.to_container(cfg.method, resolve=True).items():
        file = files.get(name) or files.get(conf["class"])
        theirs = flat(OmegaConf.to_container(file, resolve=True) if file is not None else {}, f"method.{name}")
        if name not in files:
            theirs.pop(f"method.{name}.class", None)
        changed.update(differing(flat(conf, f"method.{name}"), theirs))
    # the adapter's overrides too (configs/ sets none): model.arch.down_proj(_by_layer) names the edited module
    arch = OmegaConf.to_container(cfg.model.arch, resolve=True) if cfg.model.get("arch") is not None else {}
    changed.update({f"model.arch.{key}": value for key, value in arch.items() if value is not None})
    return [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in changed.items()]


def changed_edit_note(cfg: DictConfig) -> str | None:
    """The results tables' note naming ``changed_edit_settings`` (None when the run used configs/' settings)."""
    changed = changed_edit_settings(cfg)
    return f"edit settings other than configs/ sets for this model: {'; '.join(changed)}" if changed else None
