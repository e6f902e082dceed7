"""The eval stage's LightningModule: ``predict_step`` evaluates one case under every pending method.

Per case: score the clean model once (the "pre" numbers, and the "none" row: the paper's teacher-forced
metrics and, with ``eval.generative``, the greedy-generation scores); then for each method's editor
edit (``Editor.edit``, the request's rewrite alone), score, and copy back the clean values of every parameter
an editor may touch (``Editor.touched``: its layers' down-projections; checked with ``torch.equal``), so every
edit starts from the clean model. Each (case, method) result is appended to this rank's JSON-lines file at once, and its
post-edit values go into ``CaseValues`` metrics, which are gathered across ranks at the end.
After a stop request (SIGTERM, SIGINT) the case in progress is finished and recorded and the remaining ones
are passed over (Lightning's predict loop has no stop of its own); the recipe then reports how to resume.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from datamodules.cases import NO_CASE
from pipeline.core.loading import LoadedModel
from pipeline.core.signals import stop_requested
from pipeline.core.timing import Clock
from pipeline.editors.base import Editor
from pipeline.errors import UserError
from pipeline.evaluation.case_log import CaseLog
from pipeline.evaluation.cases import EvalCase
from pipeline.evaluation.generative import generative_settings
from pipeline.evaluation.report import GENERATIVE, METRICS
from pipeline.evaluation.scoring import Generation, References, score_case

from .case_values import CaseValues

OK = "ok"  # the metric that counts a method's evaluated cases


@dataclasses.dataclass
class EvalContext:
    """The run being evaluated: its configuration, the model, and the run's edit layer (``edit.layer``)."""

    cfg: DictConfig
    loaded: LoadedModel
    layer: int


class CaseEvaluator(L.LightningModule):
    def __init__(
        self,
        ctx: EvalContext,
        cases: dict[int, EvalCase],
        todo: dict[int, list[Editor]],
        done: Sequence[dict[str, Any]],
        log: CaseLog,
        gen: Generation,
        refs: References | None,
        seed: int,
        kind: str,
        methods: Sequence[Editor],
        on_start: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.ctx, self.cases, self.todo, self.done, self.case_log = ctx, cases, todo, list(done), log
        self.gen, self.refs, self.seed, self.kind, self.on_start = gen, refs, seed, kind, on_start
        self.model = ctx.loaded.model  # registered: the Trainer places it on this rank's device
        self.methods, self.method_names = list(methods), [m.name for m in methods]
        # the greedy-generation scores beside the paper's (eval.generative; chat resolved against the tokenizer)
        self.generative = generative_settings(ctx.cfg.eval.generative, ctx.loaded.tokenizer)
        keys = [OK, *METRICS[kind], *GENERATIVE[kind]]
        self.metrics = torch.nn.ModuleDict(
            {key: CaseValues() for m in self.method_names for key in [f"{m}__{k}" for k in keys]}
        )
        # every parameter some method may change, with a clean copy (buffers: they follow the model's device)
        self.touched = sorted({name for m in methods for name in m.touched()})
        for i, name in enumerate(self.touched):
            self.register_buffer(f"clean_{i}", ctx.loaded.model.get_parameter(name).detach().clone(), persistent=False)
        self.values: dict[str, dict[str, list[tuple[int, float]]]] = {}

    # -- the edited parameters --------------------------------------------------------------------------
    def _pairs(self) -> list[tuple[str, torch.nn.Parameter, torch.Tensor]]:
        model = self.ctx.loaded.model
        return [(name, model.get_parameter(name), getattr(self, f"clean_{i}")) for i, name in enumerate(self.touched)]

    def _check_clean(self, when: str) -> None:
        for name, param, clean in self._pairs():
            if not torch.equal(param, clean):
                raise RuntimeError(f"{name} is not the clean parameter {when}")

    def _restore(self) -> None:
        with torch.no_grad():
            for _, param, clean in self._pairs():
                param.copy_(clean)
        self._check_clean("after restoring it")

    # -- Lightning hooks --------------------------------------------------------------------------------
    def on_predict_start(self) -> None:
        self.case_log.open(self.global_rank)
        if self.trainer.is_global_zero:
            if self.on_start is not None:
                self.on_start()
            for rec in self.done:  # results of an earlier run count once, on rank 0
                self._update(rec)

    def predict_step(self, index: int, batch_idx: int = 0) -> None:
        if int(index) == NO_CASE or stop_requested():
            return None
        case = self.cases[int(index)]
        for rec in self.evaluate(case, self.todo[case.index]):
            self.case_log.append(rec)
            self._update(rec)
        return None

    def on_predict_end(self) -> None:
        self.case_log.close()
        with warnings.catch_warnings():  # a rank without cases computes before any update
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            values = {key: self.metrics[key].compute() for key in sorted(self.metrics)}
        for key, pairs in values.items():
            method, metric = key.split("__", 1)
            self.values.setdefault(method, {})[metric] = pairs

    # -- one case ---------------------------------------------------------------------------------------
    def _score(self, case: EvalCase) -> dict[str, Any]:
        loaded = self.ctx.loaded
        return score_case(
            loaded.model,
            loaded.tokenizer,
            case,
            self.gen,
            self.seed + case.index,
            int(self.ctx.cfg.eval.score_batch_size),
            self.refs,
            self.generative,
        )

    def evaluate(self, case: EvalCase, methods: Sequence[Editor]) -> list[dict[str, Any]]:
        self._check_clean(f"before case {case.index}")
        pre = self._score(case)
        out = []
        for m in methods:
            rec = {
                "index": case.index,
                "case_id": case.case_id,
                "method": m.name,
                "request": case.request.as_dict(),
                "pre": pre["metrics"],
                "pre_probs": pre.get("probs"),
                "pre_timings": pre["timings"],
                "generations": {"pre": pre.get("generations", [])},
                "greedy": {"pre": pre.get("greedy", {})},
            }
            if not m.edits_weights:
                out.append(
                    {
                        **rec,
                        "status": "ok",
                        "post": pre["metrics"],
                        "post_probs": pre.get("probs"),
                        "timings": {"edit": 0.0, **pre["timings"]},
                        "info": {},
                    }
                )
                out[-1]["generations"]["post"] = out[-1]["generations"]["pre"]
                out[-1]["greedy"]["post"] = out[-1]["greedy"]["pre"]
                continue
            try:
                clock = Clock(self.ctx.loaded.model)
                torch.manual_seed(self.seed + case.index)
                # the rewrite alone: paraphrases and neighbours are for scoring, never seen by the edit
                (edit,) = m.edit([dataclasses.replace(case.request, paraphrases=(), neighbours=())])
                info = m.info(edit)
                edit_seconds = clock.lap("edit")
                post = self._score(case)
            except UserError as err:  # this case cannot be edited by this method: reported, not fatal
                out.append({**rec, "status": "skipped", "reason": str(err)})
                continue
            finally:
                self._restore()
            rec["generations"]["post"] = post.get("generations", [])
            rec["greedy"]["post"] = post.get("greedy", {})
            out.append(
                {
                    **rec,
                    "status": "ok",
                    "post": post["metrics"],
                    "post_probs": post.get("probs"),
                    "timings": {"edit": edit_seconds, **post["timings"]},
                    "info": info,
                }
            )
        return out

    def _update(self, rec: dict[str, Any]) -> None:
        if rec.get("status") != "ok" or rec["method"] not in self.method_names:
            return
        m = rec["method"]
        self.metrics[f"{m}__{OK}"].update(rec["index"], 1.0)
        for k, v in rec["post"].items():
            key = f"{m}__{k}"
            if key in self.metrics and v is not None:
                self.metrics[key].update(rec["index"], v)
