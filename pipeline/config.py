"""Compose ``configs/`` with command-line ``key=value`` overrides (OmegaConf, dotted keys, YAML values).

Order: ``configs/config.yaml`` (plus every ``configs/method/<name>.yaml`` as ``method.<name>``) <- the model
file from ``configs/model/`` that names ``model.name`` (or, for an unnamed model, the family file for its
``config.model_type``) <- command-line overrides.
A model file's keys go into the ``model`` group, except its ``edit:`` and ``method:`` blocks, which go over
those groups: the hyperparameters a release sets for that model (GPT-2 medium's clamp_norm_factor 3).
Unknown keys are rejected with the nearest known key (``stats.layer=6``: "did you mean stats.layers?"), and
every override is checked against the type of its default (``stats.tokens=abc``: "expects an integer") and
keys with a fixed set of values against it (``stats.dtype=float16``), so a bad value fails here, in one line,
before any work. This is the pipeline's ground floor: it imports nothing of the pipeline but its errors. What
needs a model or a machine (a model's family read from its config, the devices this machine has, the cache
root, ``edit.layer=auto``) lives where it is used: ``pipeline.core.loading.configure`` composes with the
model's family and checks the machine, ``pipeline.editors.settings`` resolves the edit layer.
"""

from __future__ import annotations

import datetime
import difflib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from rome.pipeline.errors import UserError

__all__ = ["CONFIG_DIR", "compose", "parse_overrides", "model_file_for", "config_keys", "nearest", "CHOICES"]

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
        if isinstance(value, (datetime.date, datetime.datetime)):
            value = raw  # edit.out=2026-12-04 names a directory: YAML's date type is not a config value
        OmegaConf.update(cli, key, value, merge=False, force_add=True)
    return cli


def _model_files(config_dir: Path) -> list[tuple[Path, DictConfig]]:
    return [(p, OmegaConf.load(p)) for p in sorted((config_dir / "model").glob("*.yaml"))]


def model_file_for(name: str, config_dir: Path = CONFIG_DIR, model_type: str | None = None) -> DictConfig | None:
    """The model file whose ``name`` or ``aliases`` match, else the family file for ``model_type``
    (the model's ``config.model_type``, when the caller could read it)."""
    files = _model_files(config_dir)
    for _, f in files:
        if name == f.get("name") or name in (f.get("aliases") or []):
            return f
    for _, f in files:
        if model_type and model_type in (f.get("model_types") or []):
            return f
    return None


def _define_methods(base: DictConfig, cli: DictConfig) -> None:
    """``method.<new name>={class: rome, layer: 4}`` on the command line defines a method for ``eval.methods``:
    the keys it does not set come from the file of its class (``configs/method/<class>.yaml``). ``class`` may
    also name a method file of another class (``{class: encore, memit: {preserve_edits: false}}``): that file
    is the template, its class the new method's, so a variant of it runs beside it under its own name."""
    for name, value in (cli.get("method") or {}).items():
        if name in base.method or not isinstance(value, DictConfig) or "class" not in value:
            continue  # an existing method's override, or no definition: the struct merge judges it
        files = [n for n, conf in base.method.items() if conf.get("class") == value["class"]]
        if not files and value["class"] not in base.method:
            raise UserError(
                f"method.{name}: class '{value['class']}' is neither an editor's class nor a configs/method/ file "
                f"(classes: {', '.join(sorted({str(c.get('class')) for c in base.method.values()}))}; "
                f"files: {', '.join(sorted(base.method))})"
            )
        template = base.method[value["class"] if value["class"] in base.method else files[0]]
        value["class"] = template["class"]  # the command line's value is merged over this definition later
        base.method[name] = OmegaConf.merge(template, {k: v for k, v in value.items() if k in template})
        unknown = [k for k in value if k not in template]
        if unknown:
            raise UserError(
                f"method.{name}: unknown key(s) {', '.join(unknown)} for class '{value['class']}' "
                f"(it has: {', '.join(template)})"
            )
        for k in value:  # a block merged over an edit group (encore's memit:) holds only that group's keys
            if isinstance(value[k], DictConfig) and k in base.edit and OmegaConf.is_dict(base.edit[k]):
                group = OmegaConf.to_container(base.edit[k], resolve=True)
                prefix = f"method.{name}.{k}."
                _check_types(OmegaConf.to_container(value[k]), group, [prefix + c for c in config_keys(group)], prefix)


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
        raise UserError(
            f"configs/model/ file of {model_file.get('name')}: unknown key '{err.full_key}' "
            "(a model file sets model, edit and method keys that configs/ has)"
        ) from err
    OmegaConf.set_struct(merged, False)
    return merged


# What a key may hold besides the type of its default (each checked again where it is used).
OTHER_VALUES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "edit.layer": ("auto", lambda v: v == "auto"),
    "ask.chat": ("true or false", lambda v: isinstance(v, bool)),
    "edit.verify.chat": ("true or false", lambda v: isinstance(v, bool)),
    "trainer.devices": ("auto, a list of device ids or a string such as '0,1'", lambda v: isinstance(v, (str, list))),
    "data.batch_tokens": (
        "a positive number of tokens",
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    ),
}
# Keys whose value is one of a fixed set (checked here, before any work; mapped to objects where used).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16", "float64"),
    "stats.dtype": ("float64", "float32"),  # the running total's
    "stats.product": ("fp32", "exact"),
}
NULLABLE = {"eval.n"}  # null means "all"
NUMBER = {"edit.memit.mom2_update_weight", "stats.checkpoint_minutes"}  # written as an integer, any number is fine
TEXT = {"prompt", "subject", "answer"}  # a fact's text, even when it looks like a number or a boolean
POSITIVE = {
    "data.max_length",
    "data.batch_tokens",
    "data.chars_per_token",
    "data.sort_window",
    "stats.tokens",
    "stats.convergence.first_tokens",
    "stats.convergence.threshold",
    "edit.batch_size",
    "edit.v.steps",
    "edit.memit.v.steps",
    "edit.memit.rows_per_pass",
    "edit.verify.batch_size",
    "edit.verify.answer_tokens",
    "eval.score_batch_size",
    "eval.n",
    "eval.batch_size",
    "eval.generation.batch_size",
    "eval.generation.top_k",
    "eval.heldout.articles",
    "eval.heldout.max_length",
    "eval.heldout.batch_size",
    "ask.max_tokens",
    "ask.temperature",
    "ask.top_k",
    "ask.batch_size",
    "trainer.num_nodes",
}
NON_NEGATIVE = {
    "seed",
    "data.num_workers",
    "stats.checkpoint_minutes",
    "stats.checkpoint_every_batches",
    "stats.convergence.probes",
    "edit.ridge",
    "edit.generate_tokens",
    "eval.start",
    "eval.eval_every",
    "eval.generation.tokens",
    "trace.start",
}


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, list):
        return "a list such as [1, 2]"
    return "text"


def _typed(key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default`` (numbers written as text, e.g. 1e-3, become numbers), or a
    UserError that names the key and the type it expects."""
    if key in TEXT and value is not None and not isinstance(value, str):
        return str(value)
    if value is None:
        if default is None or key in NULLABLE:
            return value
        raise UserError(f"{key}=null is not allowed: it expects {_kind(default)} (default: {default})")
    if default is None or (isinstance(value, str) and value.startswith("${")):
        return value  # any value; an interpolation is judged once resolved
    also = OTHER_VALUES.get(key)
    if also is not None and also[1](value):
        return value
    expects = _kind(default) + (f" or {also[0]}" if also else "")
    bad = UserError(f"{key}={value} is not valid: it expects {expects} (default: {default})")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
    elif isinstance(default, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if isinstance(default, int) and key not in NUMBER:
            if value != int(value):
                raise bad
            value = int(value)
        if (key in POSITIVE and value <= 0) or (key in NON_NEGATIVE and value < 0):
            raise UserError(
                f"{key}={value} must be {'positive' if key in POSITIVE else 'zero or more'} (default: {default})"
            )
    elif isinstance(default, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if also is not None:  # a number where a key also takes one (data.batch_tokens) failed that test above
                raise bad
            return str(value)
        if not isinstance(value, str):
            raise bad
    elif isinstance(default, list):
        if not isinstance(value, list):
            raise bad
        element = next((x for x in default if x is not None), None)
        if element is not None and not isinstance(element, (list, dict)):
            value = [_typed(f"{key}[{i}]", x, element) for i, x in enumerate(value)]
    return value


def _unknown(key: str, known: Sequence[str]) -> UserError:
    return UserError(
        f"unknown config key '{key}'{nearest(key, known)} (every key is in configs/config.yaml; python train.py --help)"
    )


def _check_types(cli: dict, defaults: dict, known: Sequence[str], prefix: str = "") -> None:
    """Check (and convert in place) every override against its default; an unknown key is an error."""
    for k, value in cli.items():
        key, default = f"{prefix}{k}", defaults.get(k)
        if k not in defaults:
            while isinstance(value, dict) and value:  # the whole dotted key the user wrote
                k2, value = next(iter(value.items()))
                key = f"{key}.{k2}"
            raise _unknown(key, known)
        if isinstance(default, dict):
            if isinstance(value, dict):
                _check_types(value, default, known, f"{key}.")
            elif value is not None:
                raise UserError(
                    f"{key} is a group of keys ({', '.join(map(str, default))}), not a value; "
                    f"set one of them, e.g. {key}.{next(iter(default), 'x')}=..."
                )
            continue
        cli[k] = _typed(key, value, default)


def config_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (groups and leaves)."""
    out = []
    for k, v in node.items():
        out.append(f"{prefix}{k}")
        if isinstance(v, (dict, DictConfig)):
            out += config_keys(v, f"{prefix}{k}.")
    return out


def plain(node: Any) -> Any:
    """``node`` as plain dicts and lists (interpolations resolved) if it is a config, else itself: what JSON takes."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def nearest(word: str, choices: Sequence[str]) -> str:
    """' (did you mean X?)' for the closest of ``choices``, else ''."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {found[0]}?)" if found else ""


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if str(value) not in allowed:
            raise UserError(f"{key}={value} is not one of {', '.join(allowed)}")


def compose(
    argv: Sequence[str] = (),
    config_dir: Path = CONFIG_DIR,
    model_file: DictConfig | None = None,
    model_type: Callable[[str], str | None] | None = None,
) -> DictConfig:
    """configs/ + the model's file (found from ``model.name`` unless given) + ``key=value`` overrides.
    ``model_type(name)`` reads an unnamed model's family (``config.model_type``) for its family file."""
    base = OmegaConf.load(config_dir / "config.yaml")
    base.method = {p.stem: OmegaConf.load(p) for p in sorted((config_dir / "method").glob("*.yaml"))}
    cli = parse_overrides(argv)
    if model_file is None:
        name = OmegaConf.select(cli, "model.name", default=base.model.name)
        found = model_file_for(str(name), config_dir)
        model_file = found or model_file_for(str(name), config_dir, model_type(str(name)) if model_type else None)
    if model_file is not None:
        base = _merge_model_file(base, model_file)
    _define_methods(base, cli)  # after the model file: a study method starts from its class's values for this model
    OmegaConf.set_struct(base, True)
    try:
        overrides = OmegaConf.to_container(cli)
        _check_types(overrides, OmegaConf.to_container(base, resolve=True), config_keys(base))
        cfg = OmegaConf.merge(base, OmegaConf.create(overrides))
        OmegaConf.resolve(cfg)
    except ConfigKeyError as err:
        raise _unknown(str(err.full_key), config_keys(base)) from err
    except OmegaConfBaseException as err:
        raise UserError(f"bad configuration: {str(err).splitlines()[0]}") from err
    _check_choices(cfg)
    return cfg
