"""Compose ``configs/`` with command-line ``key=value`` overrides (OmegaConf, dotted keys, YAML values).

Order: ``configs/config.yaml`` (plus every ``configs/method/<name>.yaml`` as ``method.<name>``) <- the model file from ``configs/model/`` that names ``model.name`` (or, for
an unnamed model, the family file for its ``config.model_type``) <- command-line overrides.
A model file's keys go into the ``model`` group, except its ``edit:`` and ``method:`` blocks, which go over
those groups: the hyperparameters a release sets for that model (GPT-2 medium's clamp_norm_factor 3).
Unknown keys are rejected, so a typo such as ``stats.layer=6`` fails instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import UserError

__all__ = ["CONFIG_DIR", "compose", "parse_overrides", "model_file_for", "cache_root", "edit_defaults", "edit_layer"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def parse_overrides(argv: Sequence[str]) -> DictConfig:
    """``["a.b=1", "c=[1,2]", 'prompt={} is in']`` -> a DictConfig; values are YAML, else plain strings."""
    cli = OmegaConf.create()
    for arg in argv:
        key, sep, raw = arg.partition("=")
        if not sep or not key:
            raise UserError(f"argument '{arg}' is not key=value (example: stats.layers=[6])")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw  # e.g. prompt={} is located in ... is text, not YAML
        if isinstance(value, dict) and raw.lstrip().startswith("{}"):
            value = raw
        OmegaConf.update(cli, key, value, merge=False, force_add=True)
    return cli


def _model_files(config_dir: Path) -> list[tuple[Path, DictConfig]]:
    return [(p, OmegaConf.load(p)) for p in sorted((config_dir / "model").glob("*.yaml"))]


def model_file_for(name: str, config_dir: Path = CONFIG_DIR, model_type: str | None = None) -> DictConfig | None:
    """The model file whose ``name`` or ``aliases`` match, else the family file for its model_type
    (read from the model's config when not given)."""
    files = _model_files(config_dir)
    for _, f in files:
        if name == f.get("name") or name in (f.get("aliases") or []):
            return f
    model_type = model_type or _model_type(name)
    for _, f in files:
        if model_type and model_type in (f.get("model_types") or []):
            return f
    return None


def _model_type(name: str) -> str | None:
    """``config.model_type`` of a local directory or hub id, or None when it cannot be read."""
    from .loading import model_config

    try:
        return model_config(name).model_type
    except UserError:  # unknown or offline: load_model reports it (the failure is remembered, not retried)
        return None


def _define_methods(base: DictConfig, cli: DictConfig) -> None:
    """``method.<new name>={class: rome, layer: 4}`` on the command line defines a method for ``eval.methods``:
    the keys it does not set come from the file of its class (``configs/method/<class>.yaml``)."""
    for name, value in (cli.get("method") or {}).items():
        if name in base.method or not isinstance(value, DictConfig) or "class" not in value:
            continue  # an existing method's override, or no definition: the struct merge judges it
        files = [n for n, conf in base.method.items() if conf.get("class") == value["class"]]
        if not files:
            raise UserError(f"method.{name}: class '{value['class']}' is not the class of any configs/method/ file "
                            f"(classes: {', '.join(sorted({str(c.get('class')) for c in base.method.values()}))})")
        template = base.method[value["class"] if value["class"] in files else files[0]]
        base.method[name] = OmegaConf.merge(template, {k: v for k, v in value.items() if k in template})
        unknown = [k for k in value if k not in template]
        if unknown:
            raise UserError(f"method.{name}: unknown key(s) {', '.join(unknown)} for class '{value['class']}' "
                            f"(it has: {', '.join(template)})")


_MODEL_FILE_IDS = ("name", "aliases", "model_types")  # how a model file is found, not configuration
_MODEL_FILE_GROUPS = ("edit", "method")  # blocks of a model file merged over these groups, not over ``model``


def _merge_model_file(base: DictConfig, model_file: DictConfig) -> DictConfig:
    """``base`` with the model file over it: its ``edit:`` / ``method:`` blocks over those groups, every other
    key over ``model``. A key configs/ does not have is an error in the model file, never a new setting."""
    blocks = {g: model_file[g] for g in _MODEL_FILE_GROUPS if g in model_file}
    model = {k: v for k, v in model_file.items() if k not in _MODEL_FILE_IDS + _MODEL_FILE_GROUPS}
    OmegaConf.set_struct(base, True)
    try:
        merged = OmegaConf.merge(base, {"model": model, **blocks})
    except ConfigKeyError as err:
        raise UserError(f"configs/model/ file of {model_file.get('name')}: unknown key '{err.full_key}' "
                        "(a model file sets model, edit and method keys that configs/ has)") from err
    OmegaConf.set_struct(merged, False)
    return merged


def compose(argv: Sequence[str] = (), config_dir: Path = CONFIG_DIR, model_file: DictConfig | None = None) -> DictConfig:
    """configs/ + the model's file (found from ``model.name`` unless given) + ``key=value`` overrides."""
    base = OmegaConf.load(config_dir / "config.yaml")
    base.method = {p.stem: OmegaConf.load(p) for p in sorted((config_dir / "method").glob("*.yaml"))}
    cli = parse_overrides(argv)
    if model_file is None:
        name = OmegaConf.select(cli, "model.name", default=base.model.name)
        model_file = model_file_for(str(name), config_dir)
    if model_file is not None:
        base = _merge_model_file(base, model_file)
    _define_methods(base, cli)  # after the model file: a study method starts from its class's values for this model
    OmegaConf.set_struct(base, True)
    try:
        cfg = OmegaConf.merge(base, cli)
        OmegaConf.resolve(cfg)
    except ConfigKeyError as err:
        raise UserError(f"unknown config key '{err.full_key}' (see configs/config.yaml for the keys)") from err
    except OmegaConfBaseException as err:
        raise UserError(f"bad configuration: {str(err).splitlines()[0]}") from err
    return cfg


def cache_root(cfg: DictConfig) -> Path:
    """Where everything the project caches lives: ``model.cache_dir``, else $ROME_CACHE or ~/.cache/rome-lightning."""
    from .loading import default_cache_dir

    return Path(cfg.model.cache_dir or default_cache_dir())


def edit_defaults(model: Any = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The ``edit`` group as configured in ``configs/`` for ``model`` (a loaded HF model, a name, or None for
    the default model), with ``edit.x=y`` style overrides: what the Python API uses when given no hparams."""
    if model is None or isinstance(model, str):
        return compose([*( [f"model.name={model}"] if model else []), *overrides]).edit
    config = getattr(model, "config", None)
    names = [getattr(config, "name_or_path", "") or ""]
    marker = Path(names[0]) / "rome_identity.json" if names[0] else None
    if marker is not None and marker.is_file():  # the embedded models' converted copies name themselves
        import json

        names.insert(0, json.loads(marker.read_text()).get("name", ""))
    model_type = getattr(config, "model_type", None)
    found = next((f for f in (model_file_for(n, model_type=model_type) for n in names if n) if f is not None), None)
    return compose(list(overrides), model_file=found).edit


def edit_layer(cfg: DictConfig, loaded: Any) -> int:
    """``edit.layer`` checked against the model; ``auto`` takes the trace stage's latest recommendation."""
    layer = cfg.edit.layer
    if isinstance(layer, str) and layer == "auto":
        from .tracing import latest_recommendation

        layer, path = latest_recommendation(cache_root(cfg), loaded.identity)
        print(f"edit.layer=auto: layer {layer}, recommended by the trace stage in {path}")
    if layer is None:
        raise UserError("this model has no default edit layer; pass edit.layer=N (or edit.layer=auto after a trace)")
    return loaded.spec.check_layer(loaded.model, layer, "edit.layer")
