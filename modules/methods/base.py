"""What every evaluated method is: ``apply`` edits the model in place for one case (the evaluator scores
it, then restores the edited matrix); ``setup`` prepares what is shared by all cases, once per process."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.eval_data import EvalCase
from pipeline.config import cache_root
from pipeline.loading import LoadedModel
from pipeline.templates import context_templates

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
    _moment: tuple[torch.Tensor | None, dict | None] | None = None

    def templates(self) -> list[str]:
        """ROME's context templates (sampled once per model from the clean model, cached on disk)."""
        if self._templates is None:
            self._templates = context_templates(self.loaded.model, self.loaded.tokenizer, self.loaded.identity,
                                                self.cfg.edit.templates, cache_root(self.cfg), seed=int(self.cfg.seed))
        return self._templates

    def second_moment(self) -> tuple[torch.Tensor | None, dict | None]:
        """C of the edit layer from the statistics cache; computed now, in this process only, when missing."""
        if self._moment is None:
            one = OmegaConf.merge(self.cfg, {"edit": {"mom2_adjustment": True},
                                             "trainer": {"devices": 1, "strategy": "auto", "num_nodes": 1}})
            self._moment = second_moment(one, self.loaded, self.layer)
        return self._moment


class Method:
    edits: bool = True  # False: the unedited model ("none")

    def __init__(self, name: str, conf: DictConfig) -> None:
        self.name, self.conf = name, conf

    def config(self) -> dict[str, Any]:
        """What identifies this method's results (a rerun with another config must not mix with them)."""
        return OmegaConf.to_container(self.conf, resolve=True)

    def setup(self, ctx: EvalContext) -> None:
        pass

    def apply(self, ctx: EvalContext, case: EvalCase, seed: int) -> dict[str, Any]:
        """Edit ``ctx.loaded.model`` in place for ``case``; return {"timings": {...}, ...} (JSON-able)."""
        raise NotImplementedError
