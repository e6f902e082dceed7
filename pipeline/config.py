"""Compose ``configs/`` with command-line ``key=value`` overrides (OmegaConf, dotted keys, YAML values).

Order: ``configs/config.yaml`` (plus every ``configs/method/<name>.yaml`` as ``method.<name>``) <- the model file from ``configs/model/`` that names ``model.name`` (or, for
an unnamed model, the family file for its ``config.model_type``) <- command-line overrides.
Unknown keys are rejected, so a typo such as ``stats.layer=6`` fails instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import UserError

__all__ = ["CONFIG_DIR", "compose", "parse_overrides", "model_file_for"]

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


def model_file_for(name: str, config_dir: Path = CONFIG_DIR) -> DictConfig | None:
    """The model file whose ``name`` or ``aliases`` match, else the family file for its model_type."""
    files = _model_files(config_dir)
    for _, f in files:
        if name == f.get("name") or name in (f.get("aliases") or []):
            return f
    model_type = _model_type(name)
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


def compose(argv: Sequence[str] = (), config_dir: Path = CONFIG_DIR) -> DictConfig:
    base = OmegaConf.load(config_dir / "config.yaml")
    base.method = {p.stem: OmegaConf.load(p) for p in sorted((config_dir / "method").glob("*.yaml"))}
    cli = parse_overrides(argv)
    name = OmegaConf.select(cli, "model.name", default=base.model.name)
    model_file = model_file_for(str(name), config_dir)
    if model_file is not None:
        base = OmegaConf.merge(base, {"model": {k: v for k, v in model_file.items() if k not in ("name", "aliases", "model_types")}})
    OmegaConf.set_struct(base, True)
    try:
        cfg = OmegaConf.merge(base, cli)
        OmegaConf.resolve(cfg)
    except ConfigKeyError as err:
        raise UserError(f"unknown config key '{err.full_key}' (see configs/config.yaml for the keys)") from err
    except OmegaConfBaseException as err:
        raise UserError(f"bad configuration: {str(err).splitlines()[0]}") from err
    return cfg
