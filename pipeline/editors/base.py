"""The one interface every editing method implements, and the registry the factory builds them from.

An editor turns requests into weight changes in units of work: a unit is one request (ROME, FT+L) or a batch
of them (MEMIT, AlphaEdit). Each unit goes through the same phases, in this order:

    begin(requests) -> Edit     measure what verification needs, read keys, set up the optimisation
    step(edit)                  one optimisation step (v*, z, or the fine-tuning step); True once it has ended
    conclude(edit)              take the optimisation's result                        -> phase "optimised"
    apply(edit)                 write the update into the weights, in place           -> phase "applied"
    verify(edit)                check it took; roll it back if configured             -> phase "verified"
    record(edit, ledger, ...)   append it to the ledger (its factors, enough to rebuild or revert bitwise)

``advance(edit, phase)`` runs the phases still missing up to ``phase``, each once and in order, so the edit
stage's callbacks (apply, verify, record) may run in any order and none of them reads another's flag.
``edit(requests)`` is the plain loop (no Lightning): the Python API, the eval protocols and the benchmarks
use it; the edit stage drives ``step`` from a Lightning training loop instead (``modules/edit_loop.py``).

Adding a method: one file in ``pipeline/editors/`` with an ``@register("name")`` subclass of ``Editor`` and
its ``from_config``, plus ``configs/method/name.yaml`` (``class: name``); ``build_editor`` finds it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from rome.pipeline.config import plain
from rome.pipeline.core.arch import ArchSpec
from rome.pipeline.core.hooks import get_module
from rome.pipeline.core.requests import EditRequest
from rome.pipeline.core.timing import Clock
from rome.pipeline.editors.ledger import Ledger
from rome.pipeline.editors.verification import check_after, check_before, check_settings, unit_report
from rome.pipeline.errors import UserError
from rome.pipeline.stats.spectrum import describe_null_space

__all__ = ["Edit", "Editor", "BatchEditor", "PHASES", "REGISTRY", "register", "LayerStatistics"]

PHASES = ("begun", "optimised", "applied", "verified")
REGISTRY: dict[str, type[Editor]] = {}
# layers -> {layer: LayerStats}: C for the layers an editor needs (the caller computes what the cache lacks)
LayerStatistics = Callable[[Sequence[int]], dict]


def register(name: str) -> Callable[[type[Editor]], type[Editor]]:
    """Class decorator: ``name`` is the ``class:`` a configs/method/ file names (and ``edit.method``)."""

    def add(cls: type[Editor]) -> type[Editor]:
        REGISTRY[name] = cls
        cls.method = name
        return cls

    return add


@dataclasses.dataclass(kw_only=True)
class Edit:
    """One unit of an editor's work and where it stands. Method-specific results subclass it."""

    optimisation: Any = None  # .step() -> bool, .done, .steps, .losses[r], .p_target[r]; None: nothing to optimise
    phase: str = "begun"
    status: str = "pending"  # applied | rolled_back | failed_verification
    reason: str = ""
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    entry_id: int | None = None  # the ledger's id, once recorded
    clock: Clock | None = dataclasses.field(default=None, repr=False)  # started when the optimisation starts
    # per request, what verification found (``pipeline/editors/verification.py``): P(new) and P(true) on the
    # prompt before and after, whether the model knew the fact, what it says after, whether the edit took
    checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # a subclass also has ``requests``: the unit's requests

    @property
    def warnings(self) -> list[str]:
        """A line per request whose fact the model did not know before the edit."""
        return [c["warning"] for c in self.checks if c.get("warning")]

    def __str__(self) -> str:
        """The unit's report for a terminal (ROME's ``EditResult`` has its own table)."""
        return unit_report(self.entry_id, self.requests, self.checks, self.status, self.reason)


class Editor(abc.ABC):
    """One editing method bound to one model: its hyperparameters, layers, templates and statistics."""

    method: str = ""  # the registry name (set by ``register``)
    edits_weights: bool = True  # False: the unedited baseline ("none")
    recordable: bool = False  # its ``record`` writes what a ledger needs to rebuild and revert the edit bitwise
    per_case: bool = True  # edits one request at a time, so the per-case evaluation can measure it

    def __init__(self, name: str, model: nn.Module, tokenizer: Any, spec: ArchSpec, hp: Any, layers: Sequence[int]):
        self.name, self.model, self.tokenizer, self.spec, self.hp = name, model, tokenizer, spec, hp
        self.layers = list(layers)
        # methods that confine updates to C's null space: per layer P's rank and C's energy in its range
        self.null_space: dict[int, tuple[int, float]] = {}

    def null_space_report(self) -> list[str]:
        """What ``null_space`` holds, a line per layer and a note where it is not much of a null space."""
        return describe_null_space(self.null_space, f"edit.{self.method}.nullspace_threshold")

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_config(
        cls, name: str, cfg: Any, loaded: Any, conf: Any, statistics: LayerStatistics | None, measure_only: bool
    ) -> Editor:
        """Build from the run's config (``cfg``), the method's own file (``conf``: configs/method/<name>.yaml)
        and a statistics provider; ``measure_only``: the edit is measured as made (eval: no verification,
        no rollback, no generated text inside the edit)."""

    # -- what the loop needs ----------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """The most optimisation steps a unit takes (the Lightning loop's length per unit)."""
        return 1

    def units(self, requests: Sequence[EditRequest]) -> list[list[EditRequest]]:
        """How requests are grouped into units of work: one each, unless the method edits batches."""
        return [[r] for r in requests]

    def touched(self) -> list[str]:
        """Names of the parameters an edit may change (what an evaluator restores after each case)."""
        if not self.edits_weights:
            return []
        names = []
        for layer in self.layers:
            module = self.spec.down_proj_name(layer)
            names += [f"{module}.{n}" for n, _ in get_module(self.model, module).named_parameters(recurse=False)]
        return names

    # -- the phases -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def begin(self, requests: Sequence[EditRequest]) -> Edit:
        """Set up the unit on the model as it is now (earlier edits applied)."""

    def step(self, edit: Edit) -> bool:
        """One optimisation step; True once the optimisation has ended."""
        opt = edit.optimisation
        if opt is None or opt.done:
            return True
        if edit.clock is None:
            edit.clock = Clock(self.model, edit.timings)
        with torch.enable_grad():
            return opt.step()

    def conclude(self, edit: Edit) -> None:
        """Take the optimisation's result (called once it has ended)."""
        if edit.clock is not None:
            edit.clock.lap("v_star")

    @abc.abstractmethod
    def apply(self, edit: Edit) -> None:
        """Write the update into the weights, in place."""

    def verify(self, edit: Edit) -> None:  # noqa: B027  (a phase with a default, not an abstract one)
        """Check the applied edit; the default accepts it."""

    def state(self) -> dict[str, torch.Tensor]:
        """What the next unit depends on besides the weights, as named CPU tensors (a run stopped at a unit
        boundary saves it with the edited weights and resumes bit for bit): the NAS reference of the methods
        that optimise values; subclasses add theirs (AlphaEdit's preserved keys, UltraEdit's statistics)."""
        reference = getattr(self, "norm_reference", None)
        return {} if reference is None else reference.state()

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take up what ``state`` saved (the tensors of an editor of the same method and settings)."""
        reference = getattr(self, "norm_reference", None)
        if reference is not None:
            reference.load_state(tensors)

    @property
    def anchor_reference(self) -> float | None:
        """The NAS reference norm of a method that optimises values, once its first unit has set it."""
        reference = getattr(self, "norm_reference", None)
        return None if reference is None else reference.value

    def continue_from(self, ledger: Ledger) -> str | None:
        """Take up the state a ledger's earlier edits leave for this method (AlphaEdit: the keys to preserve);
        returns a line saying what was taken up, if anything."""
        return None

    def record(
        self, edit: Edit, ledger: Ledger, model_identity: dict[str, str], run: dict[str, Any] | None = None
    ) -> int | None:
        """Append the edit to ``ledger``; returns its id (None: this method writes nothing to a ledger)."""
        return None

    def info(self, edit: Edit) -> dict[str, Any]:
        """What the evaluation records about an edit (JSON-able)."""
        return {"timings": dict(edit.timings)}

    def config(self) -> dict[str, Any]:
        """What identifies this editor's results (a rerun with another config must not mix with them)."""
        hp = dataclasses.asdict(self.hp) if dataclasses.is_dataclass(self.hp) else plain(self.hp)
        return {"class": self.method, "layers": self.layers, "hparams": hp}

    # -- driving the phases -----------------------------------------------------------------------------
    def advance(self, edit: Edit, phase: str) -> None:
        """Run the phases ``edit`` still misses up to ``phase``, each once, in order (an optimisation not yet
        ended is run to its end first)."""
        want = PHASES.index(phase)
        while PHASES.index(edit.phase) < want:
            nxt = PHASES[PHASES.index(edit.phase) + 1]
            if nxt == "optimised":
                while not self.step(edit):
                    pass
                self.conclude(edit)
            elif nxt == "applied":
                self.apply(edit)
            else:
                self.verify(edit)
            edit.phase = nxt

    def edit(self, requests: Sequence[EditRequest], on_step: Callable[[Edit], None] | None = None) -> list[Edit]:
        """Every request, unit by unit, through every phase (the plain loop, no Lightning)."""
        out = []
        for unit in self.units(requests):
            edit = self.begin(unit)
            while not self.step(edit):
                if on_step is not None:
                    on_step(edit)
            self.advance(edit, "verified")
            out.append(edit)
        return out


class BatchEditor(Editor):
    """An editor that writes batches of ``batch_size`` requests across an increasing set of layers (MEMIT,
    AlphaEdit, UltraEdit): the layer set and the batch size checked once, the requests grouped into batches."""

    per_case = False  # batches across layers: eval.mode=sequential or batch measures it

    def __init__(
        self,
        name: str,
        model: nn.Module,
        tokenizer: Any,
        spec: ArchSpec,
        hp: Any,
        layers: Sequence[int],
        batch_size: int,
        layers_key: str = "edit.layers",
        verify: Any = None,
    ) -> None:
        """``verify``: the ``edit.verify`` group (None, or ``enabled: false``: no checks)."""
        layers = list(layers)
        if not layers or sorted(set(layers)) != layers:
            raise UserError(f"{layers_key}={layers} must be increasing layer indices (e.g. [2,3,4,5,6])")
        for layer in layers:
            spec.check_layer(model, layer, layers_key)
        if batch_size <= 0:
            raise UserError(f"edit.batch_size={batch_size} must be a positive number of requests")
        super().__init__(name, model, tokenizer, spec, hp, layers)
        self.batch_size = batch_size
        if verify is not None:
            from rome.pipeline.editors.hparams import VerifyHparams, typed

            verify = typed(VerifyHparams, verify, "edit.verify")
        self.verifying = verify if verify is not None and verify.enabled else None
        if self.verifying is not None:
            check_settings(self.verifying, tokenizer)

    def units(self, requests: Sequence[EditRequest]) -> list[list[EditRequest]]:
        return [list(requests[i : i + self.batch_size]) for i in range(0, len(requests), self.batch_size)]

    def check_before(self, edit: Edit) -> None:
        """The unedited model's side of verification, for every request of the batch (subclasses call it in
        ``begin``, before anything is written)."""
        if self.verifying is not None:
            clock = Clock(self.model, edit.timings)
            edit.checks = check_before(self.model, self.tokenizer, edit.requests, self.verifying)
            clock.lap("pre")

    def verify(self, edit: Edit) -> None:
        """Every request of the batch must take (``verification.check_after``); a batch is not rolled back: one
        that fails stays in the weights, ``failed_verification``, with the requests that did not take."""
        if self.verifying is None:
            return
        clock = Clock(self.model, edit.timings)
        problems = check_after(self.model, self.tokenizer, edit.requests, edit.checks, self.verifying)
        clock.lap("verify")
        if problems:
            edit.status = "failed_verification"
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            edit.reason = (
                f"{len(problems)} of {len(edit.requests)} request(s) did not take: {problems[0]}{more}; "
                "a batch is not rolled back"
            )
