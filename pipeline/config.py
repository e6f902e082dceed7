"""Compose ``configs/`` with command-line ``key=value`` overrides (OmegaConf, dotted keys, YAML values).

Order: ``configs/config.yaml`` (plus every ``configs/method/<name>.yaml`` as ``method.<name>``) <- the model file from ``configs/model/`` that names ``model.name`` (or, for
an unnamed model, the family file for its ``config.model_type``) <- command-line overrides.
A model file's keys go into the ``model`` group, except its ``edit:`` and ``method:`` blocks, which go over
those groups: the hyperparameters a release sets for that model (GPT-2 medium's clamp_norm_factor 3).
Unknown keys are rejected with the nearest known key (``stats.layer=6``: "did you mean stats.layers?"), and
every override is checked against the type of its default (``stats.tokens=abc``: "expects an integer"), so
a bad value fails here, in one line, before any work; so do devices this machine does not have.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import UserError

__all__ = ["CONFIG_DIR", "compose", "parse_overrides", "model_file_for", "cache_root", "edit_defaults", "edit_layer",
           "config_keys", "nearest"]

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


# What a key may hold besides the type of its default (each checked again where it is used).
OTHER_VALUES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "edit.layer": ("auto", lambda v: v == "auto"),
    "trainer.devices": ("auto, a list of device ids or a string such as '0,1'", lambda v: isinstance(v, (str, list))),
    "data.batch_tokens": ("a positive number of tokens", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
}
NULLABLE = {"eval.n"}  # null means "all"
NUMBER = {"edit.memit.mom2_update_weight", "stats.checkpoint_minutes"}  # written as an integer, any number is fine
TEXT = {"prompt", "subject", "answer"}  # a fact's text, even when it looks like a number or a boolean
POSITIVE = {"data.max_length", "data.batch_tokens", "data.chars_per_token", "data.sort_window", "stats.tokens",
            "stats.convergence.first_tokens", "stats.convergence.threshold", "edit.batch_size",
            "edit.v.steps", "edit.memit.v.steps", "edit.memit.rows_per_pass", "edit.verify.batch_size",
            "edit.verify.answer_tokens", "eval.score_batch_size", "eval.batch_size", "eval.generation.batch_size",
            "eval.generation.top_k", "eval.heldout.articles", "eval.heldout.max_length", "eval.heldout.batch_size",
            "trainer.num_nodes"}
NON_NEGATIVE = {"seed", "data.num_workers", "stats.checkpoint_minutes", "stats.checkpoint_every_batches",
                "stats.convergence.probes", "edit.ridge", "edit.generate_tokens",
                "eval.start", "eval.eval_every", "eval.generation.tokens", "trace.start"}


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
            raise UserError(f"{key}={value} must be {'positive' if key in POSITIVE else 'zero or more'} (default: {default})")
    elif isinstance(default, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
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
    return UserError(f"unknown config key '{key}'{nearest(key, known)} (every key is in configs/config.yaml; "
                     "python train.py --help)")


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
                raise UserError(f"{key} is a group of keys ({', '.join(map(str, default))}), not a value; "
                                f"set one of them, e.g. {key}.{next(iter(default), 'x')}=...")
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


def nearest(word: str, choices: Sequence[str]) -> str:
    """' (did you mean X?)' for the closest of ``choices``, else ''."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {found[0]}?)" if found else ""


def _check_environment(cfg: DictConfig) -> None:
    """Dtypes and devices this machine has, named by their key (before any model is loaded)."""
    import torch

    from .loading import resolve_device, resolve_dtype
    from .statistics import accumulation_dtype

    resolve_dtype(str(cfg.model.dtype), "model.dtype")
    accumulation_dtype(cfg)  # stats.dtype: the running total's, float64 or float32
    device = resolve_device(str(cfg.model.device))
    cuda = torch.cuda.is_available()
    if device.type == "cuda" and not cuda:
        raise UserError(f"model.device={cfg.model.device} but no CUDA device is visible here "
                        "(torch.cuda.is_available() is False); use model.device=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"model.device={cfg.model.device} but this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s) (0..{torch.cuda.device_count() - 1})")
    if str(cfg.trainer.accelerator) in ("gpu", "cuda") and not cuda:
        raise UserError(f"trainer.accelerator={cfg.trainer.accelerator} but no CUDA device is visible here "
                        "(torch.cuda.is_available() is False); use trainer.accelerator=cpu or auto")


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
        overrides = OmegaConf.to_container(cli)
        _check_types(overrides, OmegaConf.to_container(base, resolve=True), config_keys(base))
        cfg = OmegaConf.merge(base, OmegaConf.create(overrides))
        OmegaConf.resolve(cfg)
    except ConfigKeyError as err:
        raise _unknown(str(err.full_key), config_keys(base)) from err
    except OmegaConfBaseException as err:
        raise UserError(f"bad configuration: {str(err).splitlines()[0]}") from err
    _check_environment(cfg)
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
