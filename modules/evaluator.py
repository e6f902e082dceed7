"""The eval stage's LightningModule: ``predict_step`` evaluates one case under every pending method.

Per case: score the clean model once (the "pre" numbers, and the "none" row: the paper's teacher-forced
metrics and, with ``eval.generative``, the greedy-generation scores); then for each method's editor
edit (``Editor.edit``, the request's rewrite alone), score, and copy back the clean values of every parameter
an editor may touch (``Editor.touched``: its layers' down-projections; checked with ``torch.equal``), so every
edit starts from the clean model. Each (case, method) result is appended to this rank's JSON-lines file at once, and its
post-edit values go into ``CaseValues`` metrics, which are gathered across ranks at the end.
A case's records are appended together once its last method is scored: the unit of work is the case.
After a stop request (SIGTERM, SIGINT) the case in flight is abandoned at the next forward pass of the model
(a scoring chunk, a generated token, a v* step: ``progress.on_forward``) or between methods, its edit undone,
nothing of it recorded (it is evaluated again on resume), and the remaining cases are passed over (Lightning's
predict loop has no stop of its own); the recipe then reports how to resume. Rank 0 shows which case, method
and phase runs and counts the cases recorded (``progress.CaseProgress``).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from rome.datamodules.cases import NO_CASE, shard
from rome.pipeline.core.loading import LoadedModel
from rome.pipeline.core.signals import stop_requested
from rome.pipeline.core.timing import Clock
from rome.pipeline.editors.base import Editor
from rome.pipeline.errors import UserError
from rome.pipeline.evaluation.case_log import CaseLog
from rome.pipeline.evaluation.cases import EvalCase
from rome.pipeline.evaluation.generative import generative_settings
from rome.pipeline.evaluation.report import GENERATIVE, METRICS
from rome.pipeline.evaluation.scoring import Generation, References, score_case

from .case_values import CaseValues
from .progress import Abandoned, CaseProgress, abandon_if_stopped, on_forward

OK = "ok"  # the metric that counts a method's evaluated cases
OPTIMISATION = {"rome": "v*", "ft_l": "fine-tuning"}  # what a method's optimisation steps are called in the progress


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
        # each case is edited from the clean model, so each method starts it from its state before any case: the
        # sequential state (NAS's reference, UltraEdit's statistics, AlphaEdit's preserved keys) is put back too
        self.initial_state = {m.name: m.state() for m in methods}
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
        self.progress = CaseProgress(0, show=False)  # rank 0's real one is made when predicting starts
        self.case_seconds: dict[str, float] = {}  # the last case's seconds per part: "unedited" and per method

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
            pending = [i for i, methods in self.todo.items() if methods]
            world = self.trainer.world_size
            mine = [i for i in shard(pending, 0, world) if i != NO_CASE]
            before = len(self.todo) - len(pending) if world == 1 else 0  # cases an earlier run finished
            label = "eval" if world == 1 else f"eval (rank 0 of {world})"
            self.progress = CaseProgress(before + len(mine), before, label, show=bool(mine))

    def predict_step(self, index: int, batch_idx: int = 0) -> None:
        if int(index) == NO_CASE or stop_requested():
            return None
        case = self.cases[int(index)]
        self.progress.start()
        try:
            with on_forward(self.ctx.loaded.model, abandon_if_stopped):
                records = self.evaluate(case, self.todo[case.index])
        except Abandoned:  # a stop request: nothing of the case is recorded, the model is the clean one again
            self.progress.abandon()
            return None
        for rec in records:
            self.case_log.append(rec)
            self._update(rec)
        self.progress.finish(self.case_seconds)
        return None

    def on_predict_end(self) -> None:
        self.progress.close()
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

    def _on_step(self, method: Editor) -> Callable[[Any], None]:
        """``Editor.edit``'s ``on_step``: the step in the progress; a stop request abandons the case here."""
        name = f"{method.name}: {OPTIMISATION.get(method.method, 'optimisation')}"

        def on_step(edit: Any) -> None:
            opt = edit.optimisation
            self.progress.phase(name, f"step {max(map(len, opt.losses))}/{opt.steps}")
            abandon_if_stopped()

        return on_step

    def evaluate(self, case: EvalCase, methods: Sequence[Editor]) -> list[dict[str, Any]]:
        """Every pending method's record of ``case`` (``Abandoned`` on a stop request: no record, the clean
        model restored)."""
        self._check_clean(f"before case {case.index}")
        self.progress.phase("scoring the unedited model")
        start = time.perf_counter()
        pre = self._score(case)
        self.case_seconds = {"unedited": time.perf_counter() - start}
        out = []
        for m in methods:
            abandon_if_stopped()
            start = time.perf_counter()
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
                self.progress.phase(f"{m.name}: editing")
                clock = Clock(self.ctx.loaded.model)
                torch.manual_seed(self.seed + case.index)
                # the rewrite alone: paraphrases and neighbours are for scoring, never seen by the edit
                request = dataclasses.replace(case.request, paraphrases=(), neighbours=())
                (edit,) = m.edit([request], on_step=self._on_step(m))
                info = m.info(edit)
                edit_seconds = clock.lap("edit")
                self.progress.phase(f"{m.name}: scoring the edited model")
                post = self._score(case)
            except UserError as err:  # this case cannot be edited by this method: reported, not fatal
                out.append({**rec, "status": "skipped", "reason": str(err)})
                continue
            finally:
                self._restore()
                m.load_state(self.initial_state[m.name])
                self.case_seconds[m.name] = time.perf_counter() - start
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
