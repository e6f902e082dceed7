"""What every evaluated method is: ``apply`` edits the model in place for one case (the evaluator scores
it, then restores the edited matrix); ``setup`` prepares what is shared by all cases, once per process."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.evaluation.cases import EvalCase
from pipeline.core.hooks import get_module
from pipeline.core.loading import cache_root
from pipeline.core.loading import LoadedModel
from pipeline.editors.templates import context_templates

from ..statistics import second_moment

__all__ = ["Method", "EvalContext", "register", "REGISTRY"]

REGISTRY: dict[str, type["Method"]] = {}


def register(name: str) -> Callable[[type["Method"]], type["Method"]]:
    def deco(cls: type["Method"]) -> type["Method"]:
        REGISTRY[name] = cls
        return cls

    return deco


@dataclasses.dataclass
class EvalContext:
    """The model being evaluated and the shared, lazily built inputs of the methods."""

    cfg: DictConfig
    loaded: LoadedModel
    layer: int
    _templates: list[str] | None = None
    _moments: dict[int, tuple[torch.Tensor | None, dict | None]] = dataclasses.field(default_factory=dict)

    def templates(self) -> list[str]:
        """ROME's context templates (sampled once per model from the clean model, cached on disk)."""
        if self._templates is None:
            self._templates = context_templates(self.loaded.model, self.loaded.tokenizer, self.loaded.identity,
                                                self.cfg.edit.templates, cache_root(self.cfg), seed=int(self.cfg.seed))
        return self._templates

    def second_moment(self, layer: int) -> tuple[torch.Tensor | None, dict | None]:
        """C of ``layer`` from the statistics cache; computed now, in this process only, when missing."""
        if layer not in self._moments:
            one = OmegaConf.merge(self.cfg, {"edit": {"mom2_adjustment": True},
                                             "trainer": {"devices": 1, "strategy": "auto", "num_nodes": 1}})
            self._moments[layer] = second_moment(one, self.loaded, layer)
        return self._moments[layer]


class Method:
    edits: bool = True  # False: the unedited model ("none")

    def __init__(self, name: str, conf: DictConfig) -> None:
        self.name, self.conf = name, conf

    def config(self) -> dict[str, Any]:
        """What identifies this method's results (a rerun with another config must not mix with them)."""
        return OmegaConf.to_container(self.conf, resolve=True)

    def setup(self, ctx: EvalContext) -> None:
        pass

    def layer(self, ctx: EvalContext) -> int:
        """The layer this method edits: its config's ``layer``, else the run's edit layer."""
        layer = self.conf.get("layer")
        if layer is None:
            return ctx.layer
        return ctx.loaded.spec.check_layer(ctx.loaded.model, layer, f"method.{self.name}.layer")

    def touched(self, ctx: EvalContext) -> list[str]:
        """Names of the parameters ``apply`` may change (the evaluator restores them after every case)."""
        if not self.edits:
            return []
        module = ctx.loaded.spec.down_proj_name(self.layer(ctx))
        return [f"{module}.{n}" for n, _ in get_module(ctx.loaded.model, module).named_parameters(recurse=False)]

    def apply(self, ctx: EvalContext, case: EvalCase, seed: int) -> dict[str, Any]:
        """Edit ``ctx.loaded.model`` in place for ``case``; return {"timings": {...}, ...} (JSON-able)."""
        raise NotImplementedError
