"""Editing methods for the eval stage, by name. Adding one is one class here and one config file:

    # modules/methods/my_method.py                    # configs/method/my_method.yaml
    @register("my_method")                            # class: my_method
    class MyMethod(Method):                           # lr: 1.0e-3
        def apply(self, ctx, case, seed): ...

``eval.methods=[none,rome,my_method]`` then runs it; ``method.my_method.lr=...`` overrides its config.
Every module in this package is imported here, so registering needs no other edit.
"""

from __future__ import annotations

import importlib
import pkgutil

from omegaconf import DictConfig

from pipeline.errors import UserError

from .base import REGISTRY, EvalContext, Method, register

__all__ = ["Method", "EvalContext", "register", "build_methods", "REGISTRY"]

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")


def build_methods(cfg: DictConfig) -> list[Method]:
    """The methods named in ``eval.methods``, each from its ``configs/method/<name>.yaml``."""
    names = list(cfg.eval.methods or [])
    if not names:
        raise UserError("eval.methods is empty; name at least one of: " + ", ".join(sorted(cfg.method)))
    if len(set(names)) != len(names):
        raise UserError(f"eval.methods={names} names a method twice")
    out = []
    for name in names:
        if name not in cfg.method:
            raise UserError(f"eval.methods: unknown method '{name}' (configs/method/ has: {', '.join(sorted(cfg.method))})")
        conf = cfg.method[name]
        cls = REGISTRY.get(conf.get("class", name))
        if cls is None:
            raise UserError(f"configs/method/{name}.yaml names class '{conf.get('class')}', which is not registered "
                            f"(registered: {', '.join(sorted(REGISTRY))})")
        out.append(cls(name, conf))
    return out
