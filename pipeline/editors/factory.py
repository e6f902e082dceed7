"""The one factory of editors: ``build_editor`` turns a configuration into an editor bound to a model.

The edit stage, both eval protocols, the Python API and the benchmarks all build editors here. A method is
named either by ``edit.method`` (the edit stage) or by a file of ``configs/method/`` (the eval stage: its
``class:`` picks the editor, its other keys override the ``edit`` group, e.g. ``rome_identity_cov`` is ROME
with ``mom2_adjustment: false``). Every editor module of this package registers itself on import.
"""

from __future__ import annotations

import importlib
import pkgutil

from omegaconf import DictConfig, OmegaConf

import rome.pipeline.editors
from rome.pipeline.config import nearest
from rome.pipeline.core.loading import LoadedModel
from rome.pipeline.editors.base import REGISTRY, Editor, LayerStatistics
from rome.pipeline.errors import UserError

__all__ = ["build_editor", "method_class"]

for _module in pkgutil.iter_modules(rome.pipeline.editors.__path__):  # every editor registers itself
    importlib.import_module(f"rome.pipeline.editors.{_module.name}")


def method_class(cfg: DictConfig, method: str | None) -> tuple[str, DictConfig]:
    """(the editor's registry name, the method's own config) for ``method`` (a configs/method/ name) or, with
    None, for ``edit.method`` (an editor's name, or a configs/method/ file such as ``encore``)."""
    if method is None and str(cfg.edit.method) not in REGISTRY and str(cfg.edit.method) in cfg.method:
        method = str(cfg.edit.method)
    if method is None:
        name = str(cfg.edit.method)
        conf = OmegaConf.create({"class": name})
    else:
        if method not in cfg.method:
            raise UserError(
                f"unknown method '{method}'{nearest(method, list(cfg.method))} "
                f"(configs/method/ has: {', '.join(sorted(cfg.method))})"
            )
        conf = cfg.method[method]
        name = str(conf.get("class", method))
    if name not in REGISTRY:
        raise UserError(
            f"method '{method or name}' names class '{name}', which is not an editor "
            f"(editors: {', '.join(sorted(REGISTRY))})"
        )
    return name, conf


def build_editor(
    cfg: DictConfig,
    loaded: LoadedModel,
    method: str | None = None,
    statistics: LayerStatistics | None = None,
    measure_only: bool = False,
) -> Editor:
    """The editor ``method`` names (a configs/method/ file, or ``edit.method`` when None) for ``loaded``.
    ``statistics(layers)`` returns C for the layers it needs (``modules.statistics`` computes what the cache
    lacks); ``measure_only``: verification, rollback and generated text off (the evaluation measures the edit
    as made)."""
    name, conf = method_class(cfg, method)
    return REGISTRY[name].from_config(method or str(cfg.edit.method), cfg, loaded, conf, statistics, measure_only)
