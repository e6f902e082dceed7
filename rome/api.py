"""The Python API (``import rome``): ``rome.edit`` writes facts into a model, ``rome.ask`` asks it.

    import rome

    model, result = rome.edit(
        "smollm2-135m",
        {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
        data_files="../shared/data/wikipedia/wikipedia_en_sample.jsonl.gz",
    )
    print(result)                                    # the edit stage's before/after table
    print(rome.ask(model, "The Eiffel Tower is located in the city of"))

``edit`` does what ``python train.py stage=edit`` does, minus the ledger and saving: the configuration of
``configs/`` for the model (``overrides=["edit.v.steps=25", ...]`` changes it), the editor ``build_editor``
builds (``method=``: rome, memit, alphaedit, encore, ultraedit), C from the statistics cache or computed into
it, the same context templates, the editor's plain loop (``Editor.edit``: no Trainer for the edit itself), the same
verification and the same table. ``pipeline.editors.rome.edit(model, tokenizer, request, ...)`` stays the
one-page algorithm on any loaded Hugging Face model, with C passed in.

Why this module sits in ``rome/`` and not in ``pipeline/``: computing C when the cache lacks it is the stats
stage's Trainer pass (``modules/statistics.py``), and ``pipeline/`` imports nothing of ``modules/``
(``tests/test_layering.py``). So the API sits above both, beside the command line (``rome/cli.py``, whose
console settings it shares), and imports them; nothing below imports it, so every arrow still points down.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig

from rome.pipeline.config import model_file_for
from rome.pipeline.core.loading import LoadedModel, configure, load_configured, load_model
from rome.pipeline.core.requests import EditRequest, parse_requests
from rome.pipeline.editors.base import REGISTRY, Edit
from rome.pipeline.editors.factory import build_editor
from rome.pipeline.editors.progress import Step, StepProgress
from rome.pipeline.errors import UserError
from rome.pipeline.evaluation.ask import Answers, ask_settings, compare, open_models, read_prompts

__all__ = ["edit", "ask", "load_model", "EditReport", "Step", "Answers", "LoadedModel", "UserError"]


@dataclasses.dataclass
class EditReport:
    """What ``rome.edit`` did: one ``Edit`` per unit (a ROME ``EditResult`` per request, one batch for the batch
    methods), each with its probabilities, checks, timings and status. ``print(report)``: their tables."""

    method: str
    layers: list[int]
    edits: list[Edit]

    @property
    def status(self) -> str:
        """``applied`` when every unit was, else the first other status (rolled_back, failed_verification)."""
        return next((e.status for e in self.edits if e.status != "applied"), "applied")

    @property
    def warnings(self) -> list[str]:
        """A line per request whose fact the model did not know before the edit."""
        return [w for e in self.edits for w in e.warnings]

    def __str__(self) -> str:
        return "\n\n".join(str(e) for e in self.edits)

    def __iter__(self) -> Iterator[Edit]:
        return iter(self.edits)

    def __len__(self) -> int:
        return len(self.edits)

    def __getitem__(self, index: int) -> Edit:
        return self.edits[index]


def _quiet() -> None:
    """The command line's console: no framework banners or tips around our bars and tables (``rome.cli.quiet``)."""
    from rome.cli import quiet

    quiet()


def _requests(requests: Any) -> list[EditRequest]:
    """A request or a list of them: mappings (CounterFact records too), ``EditRequest``s, inline JSON/YAML or
    a file, as ``request=`` takes them."""
    if isinstance(requests, EditRequest):
        return [requests]
    if isinstance(requests, Sequence) and not isinstance(requests, str) and requests:
        if all(isinstance(r, EditRequest) for r in requests):
            return list(requests)
    return parse_requests(dict(requests) if isinstance(requests, Mapping) else requests)


def _configure(model: str | LoadedModel, overrides: Sequence[str]) -> tuple[DictConfig, LoadedModel | None]:
    """The configuration for ``model`` (its family's file in configs/model/) with ``overrides``; a loaded
    model's dtype and device are its own (the statistics are keyed by the dtype, and computed where it is)."""
    if isinstance(model, str):
        return configure([f"model.name={model}", *overrides]), None
    if not isinstance(model, LoadedModel):
        raise UserError(
            f"model must be a name (embedded key, directory, hub id) or load_model(...)'s result, not "
            f"{type(model).__name__}; for a bare Hugging Face model use "
            "rome.pipeline.editors.rome.edit(model, tokenizer, request)"
        )
    name = model.identity["name"]
    device = next(model.model.parameters()).device
    dtype = str(next(model.model.parameters()).dtype).removeprefix("torch.")
    placed = [f"model.dtype={dtype}", f"model.device={device}"]
    placed += ["trainer.accelerator=cpu"] if device.type == "cpu" else ["trainer.accelerator=gpu"]
    placed += [f"trainer.devices=[{device.index}]"] if device.type == "cuda" and device.index is not None else []
    found = model_file_for(name, model_type=getattr(model.model.config, "model_type", None))
    return configure([f"model.name={name}", *placed, *overrides], model_file=found), model


def _statistics(cfg: DictConfig, loaded: LoadedModel) -> Callable[[Sequence[int]], dict]:
    """The edit stage's statistics provider (``edit.stats``, else the cache under the configured data, computed
    into it when missing, with its progress bar). Without data (no ``data_files=`` and no ``data.files``), the
    cache's own statistics for this model, the ones with the most tokens, are used; none: one line naming the
    command that makes them."""
    from rome.modules.statistics import layer_statistics
    from rome.pipeline.stats.store import StatsStore, largest_cached

    provide = layer_statistics(cfg, loaded)
    if cfg.edit.stats or cfg.data.files:
        return provide

    def cached(layers: Sequence[int]) -> dict:
        missing = [layer for layer, s in StatsStore.configured(cfg, loaded).lookup(layers).items() if s is None]
        found = {layer: largest_cached(cfg, loaded, layer) for layer in missing}
        absent = [layer for layer, s in found.items() if s is None]
        if absent:
            raise UserError(
                f"C of layer(s) {absent} of {loaded.identity['name']} is not in the statistics cache and no text is "
                f"named to compute it: run `python train.py stage=stats model.name={cfg.model.name} "
                f"stats.layers={absent} data.files=...` once, or pass data_files=PATH"
            )
        for layer, s in found.items():
            print(f"C of layer {layer}: {s.path.parent} ({s.count:,} tokens)", file=sys.stderr)
        return {**provide([layer for layer in layers if layer not in found]), **found}

    return cached


def edit(
    model: str | LoadedModel,
    requests: Any,
    *,
    method: str = "rome",
    data_files: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    progress: Callable[[Step], None] | bool | None = None,
) -> tuple[LoadedModel, EditReport]:
    """Edit ``model`` with ``requests``, in place, as the edit stage does; returns (the edited model, the report).

    ``model``: a name (embedded key such as ``smollm2-135m``, local directory, hub id), loaded on the default
    device, or ``load_model(...)``'s result, edited where it is. ``requests``: one request or a list (mappings
    with ``prompt`` (``{}`` for the subject), ``subject``, ``target_new``, optional ``target_true``,
    ``paraphrases``, ``neighbours``; CounterFact records; a .json/.jsonl/.yaml file). ``method``: rome (one
    edit per request) | memit | alphaedit | encore | ultraedit (batches of ``edit.batch_size``). ``data_files``: the
    text C is computed over when the cache lacks it (``data.files``); without it, the cache's statistics for this
    model. ``overrides``: ``key=value`` strings as on the command line (``"edit.layer=5"``). ``progress``: a
    callable given a ``Step`` after every optimisation step; None: a bar on a terminal; False: nothing.

    Every edit is verified (``edit.verify``): ROME rolls back an edit the model does not now say; a warning is
    printed (and kept in ``report.warnings``) for a fact the model did not know before the edit."""
    argv = [f"edit.method={method}", *([f"data.files={data_files}"] if data_files is not None else []), *overrides]
    todo = _requests(requests)  # every request checked before the model is loaded
    _quiet()
    cfg, loaded = _configure(model, argv)
    methods = sorted({*REGISTRY, *cfg.method})  # the editors and the configs/method/ files (encore: MEMIT's)
    if method not in methods:
        raise UserError(f"method={method} is not one of {', '.join(methods)}")
    loaded = loaded or load_configured(cfg.model)
    editor = build_editor(cfg, loaded, statistics=_statistics(cfg, loaded))
    steps = (
        None
        if progress is False
        else StepProgress(
            len(editor.units(todo)),
            editor.name,
            progress if callable(progress) else None,
            bar=True if progress is True else None,
        )
    )
    try:
        edits = editor.edit(todo, steps)
    finally:
        if steps is not None:
            steps.close()
    report = EditReport(editor.name, list(editor.layers), edits)
    for line in report.warnings:
        print(line, file=sys.stderr)
    return loaded, report


def ask(
    model: str | LoadedModel,
    prompts: str | Sequence[str],
    *,
    ledger: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    **settings: Any,
) -> Answers:
    """What ``model`` says after each prompt, beside the unedited model's answer where there is one: with
    ``ledger=`` (an edit stage's ``edit.out``) the model before and after its edits (restored afterwards);
    ``model`` a directory ``edit.save_to`` wrote: beside its base model; else its own answers.
    ``settings``: the ``ask`` group's keys (``chat``, ``max_tokens``, ``do_sample``, ``temperature``,
    ``top_k``, ``batch_size``, configs/config.yaml) and ``seed``. ``print(answers)``: before / after lines."""
    argv = [*(f"{'seed' if k == 'seed' else 'ask.' + k}={_yaml(v)}" for k, v in settings.items()), *overrides]
    argv += [f"ledger={ledger}"] if ledger is not None else []
    asked = read_prompts(None, [prompts] if isinstance(prompts, str) else list(prompts), None)
    _quiet()
    cfg, loaded = _configure(model, ["stage=ask", *argv])
    loaded, opened, base = open_models(cfg, loaded)
    return compare(loaded, asked, ask_settings(cfg.ask, loaded.tokenizer, int(cfg.seed)), ledger=opened, base=base)


def _yaml(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else ("null" if value is None else str(value))
