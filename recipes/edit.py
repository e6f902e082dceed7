"""Recipe: ``python train.py stage=edit request=...`` -- edits with ``edit.method`` (ROME: one request after
another; MEMIT / AlphaEdit: batches of ``edit.batch_size``).

1. parse and check every request, ``edit.save_to`` and ``edit.out`` before touching the model;
2. load the model, open the ledger in ``edit.out`` (default: a fresh ``edit.runs_dir/<date>_<time>``; an
   earlier ledger's edits are re-applied first, and units of this same request list already recorded there
   are skipped: the same command resumes an interrupted run);
3. the editor (``build_editor``): C for its layers from the statistics cache (computed now when missing),
   factorised once; context templates (sampled once per model, cached);
4. one Trainer, one ``fit`` (``modules/edit_loop.py``): per unit, ``begin`` on the model as it is, the
   optimisation steps; the callbacks apply, verify (or roll back) and record each unit;
6. print the before/after table of every edit; save the edited model when ``edit.save_to`` is set (if that
   fails, this run's edits are taken out of the ledger again: it never records what was not saved).
A SIGTERM / SIGINT abandons an edit still measuring or optimising (nothing of it is in the weights yet) and
finishes one already applied (verified and recorded whole); the model is saved with the edits made so far and
the command to resume is printed.
"""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

from rome.modules.edit_loop import fit_edits
from rome.modules.statistics import layer_statistics
from rome.pipeline.core.adapters import export_adapter
from rome.pipeline.core.atomic import ensure_free_space
from rome.pipeline.core.digest import json_digest
from rome.pipeline.core.loading import LoadedModel, load_configured
from rome.pipeline.core.locks import DirectoryLock
from rome.pipeline.core.requests import parse_requests
from rome.pipeline.core.saving import check_destination, check_writable, save_model
from rome.pipeline.core.signals import check_stop
from rome.pipeline.core.timing import Clock
from rome.pipeline.editors import rome
from rome.pipeline.editors.base import REGISTRY
from rome.pipeline.editors.factory import build_editor, method_class
from rome.pipeline.editors.ledger import Ledger
from rome.pipeline.editors.verification import prompt_wins
from rome.pipeline.errors import UserError

SAVE_FORMATS = ("model", "adapter")  # edit.save_format


class Run:
    """Where this run writes: the ledger directory (given, or fresh for this run) and ``edit.save_to``, both
    checked before any work; the request list's digest and which of its requests are still to do."""

    def __init__(self, cfg: DictConfig, requests: list) -> None:
        self.fresh = not cfg.edit.out
        self.out = Path(cfg.edit.out) if cfg.edit.out else fresh_dir(Path(cfg.edit.runs_dir))
        check_writable(self.out, "edit.out")
        Ledger.open(self.out)  # an existing directory must be a ledger of ours (checked before the model loads)
        model_dir = cfg.model.name if os.path.isdir(str(cfg.model.name)) else None
        if cfg.edit.save_format not in SAVE_FORMATS:
            raise UserError(f"edit.save_format={cfg.edit.save_format} is not one of {', '.join(SAVE_FORMATS)}")
        self.save_format = str(cfg.edit.save_format)
        self.save_to = (
            check_destination(cfg.edit.save_to, "edit.save_to", protect=(model_dir, self.out))
            if cfg.edit.save_to
            else None
        )
        one_each = method_class(cfg, None)[0] == "rome"  # the units of work: one request each, or batches
        batching = {} if one_each else {"batch_size": int(cfg.edit.batch_size)}
        self.digest = json_digest(
            {"requests": [r.as_dict() for r in requests], "method": str(cfg.edit.method), **batching}
        )
        self.total, self.done, self.unit, self.recorded_before = 0, 0, "edit(s)", 0

    def resume_hint(self) -> str:
        where = f"; the model saved to {self.save_to} holds them" if self.save_to and self.done else ""
        how = f"run the same command with edit.out={self.out}" if self.fresh else "run the same command"
        return f"{self.done} of {self.total} {self.unit} edited and recorded in {self.out}{where}; to resume, {how}"

    def save_and_report(self, loaded: LoadedModel, ledger: Ledger) -> None:
        if self.save_to is not None and self.save_format == "adapter" and not ledger.active():
            print(f"no edit of {ledger.dir} is applied (all rolled back or reverted): no adapter written")
        elif self.save_to is not None:
            try:
                if self.save_format == "adapter":  # the ledger's edits alone, in the model's dtype
                    export_adapter(ledger, self.save_to, "edit.save_to", loaded.model.dtype)
                else:
                    save_model(
                        loaded,
                        self.save_to,
                        "edit.save_to",
                        {"ledger": str(ledger.dir.resolve()), "edits": [e["id"] for e in ledger.active()]},
                    )
            except (OSError, UserError) as err:
                dropped = ledger.discard_since(self.recorded_before)
                if self.fresh and not ledger.entries:
                    shutil.rmtree(ledger.dir, ignore_errors=True)  # made by this run, for this run only
                reason = err if isinstance(err, UserError) else f"{err.strerror or err}"
                raise UserError(
                    f"could not save the model to {self.save_to} ({reason}); the {len(dropped)} edit(s) of "
                    f"this run were taken out of the ledger again, which is as before the run"
                ) from None
            if self.save_format == "adapter":  # saved_to names a model (what revert rebuilds into): not this
                print(f"the ledger's edits saved as a PEFT LoRA adapter to {self.save_to}")
            else:
                ledger.data["saved_to"] = str(self.save_to.resolve())
                ledger.save()
                print(f"edited model saved to {self.save_to}")
        if ledger.entries:
            print(
                f"ledger: {ledger.dir / 'ledger.json'} ({len(ledger.active())} active edit(s)); "
                f"to add edits to it: edit.out={ledger.dir}"
            )


def fresh_dir(parent: Path) -> Path:
    """``parent/<date>_<time>`` (with a suffix when taken): one new ledger directory per run, made on the
    first recorded edit."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path, n = parent / stamp, 1
    while path.exists():
        path, n = parent / f"{stamp}-{n}", n + 1
    return path


def print_table(result: rome.EditResult) -> None:
    """The before/after table of one ROME edit (``EditResult.table``: the Python API prints the same)."""
    print(f"\n{result.table()}")


def _todo(ledger: Ledger, run: Run, total: int, unit: str) -> list[int]:
    """Positions of this request list not yet in the ledger (all of them unless resuming)."""
    done = ledger.done_in_run(run.digest)
    run.total, run.done, run.unit = total, len(done), unit
    if done:
        print(
            f"resuming: {len(done)} of {total} {unit} of this request list are already in {ledger.dir}; "
            f"{total - len(done)} to do"
        )
    return [i for i in range(total) if i not in done]


def run(cfg: DictConfig) -> list:
    requests = parse_requests(cfg.request)  # every request checked before the model is touched
    recordable = sorted(name for name, cls in REGISTRY.items() if cls.recordable)
    files = sorted(m for m in cfg.method if m not in REGISTRY and cfg.method[m].get("class") in recordable)
    if str(cfg.edit.method) not in recordable + files:  # the ledger records, rebuilds and reverts these
        raise UserError(f"edit.method={cfg.edit.method} is not one of {', '.join(recordable + files)}")
    run_ = Run(cfg, requests)  # edit.out and edit.save_to checked before any work
    loaded = load_configured(cfg.model)
    if run_.save_to is not None and run_.save_format == "model":  # room for the model before any edit (its size
        # is known once it is loaded); an adapter is kilobytes
        weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        try:
            ensure_free_space(run_.save_to.parent, weights, f"edit.save_to={run_.save_to} (the model in its own dtype)")
        except OSError as err:
            raise UserError(
                f"{err.strerror}; nothing was edited: free some space or name another edit.save_to"
            ) from None
    with DirectoryLock(run_.out, "edit.out"):  # one run writes a ledger at a time
        ledger = Ledger.open(run_.out, loaded.identity, cfg.model.dtype)
        run_.recorded_before = len(ledger.entries)
        if ledger.entries:
            print(
                f"continuing the ledger in {ledger.dir}: re-applying {ledger.rebuild(loaded.model, loaded.spec)} "
                "earlier edit(s)"
            )
        elif not run_.fresh:
            print(f"ledger: {ledger.dir} (new)")
        clock = Clock(loaded.model)
        editor = build_editor(cfg, loaded, statistics=layer_statistics(cfg, loaded))
        print(f"{editor.method}: layer(s) {', '.join(map(str, editor.layers))} ({clock.lap('setup'):.2f} s)")
        for line in editor.null_space_report():
            print(line)
        taken_up = editor.continue_from(ledger)
        if taken_up:
            print(taken_up)
        units = editor.units(requests)
        todo = _todo(ledger, run_, len(units), "request(s)" if editor.per_case else "batch(es)")
        check_stop(run_.resume_hint())
        edits = fit_edits(
            editor, [r for i in todo for r in units[i]], cfg, ledger, loaded.identity, run=(run_.digest, todo)
        )
        run_.done += len(edits)
        for edit in edits:
            if isinstance(edit, rome.EditResult):
                print_table(edit)
            elif edit.checks:  # a verified batch: per request, whether it took (``verification.unit_report``)
                print(f"\n{edit}")
        if editor.method != "rome" and not any(e.checks for e in edits):
            known = [r for e in edits for r in e.requests if r.target_true]
            if known:
                print(f"after the edits: scoring P(new) against P(true) on {len(known)} requests' prompts", flush=True)
                batch_size = int(cfg.edit.verify.batch_size)
                won = prompt_wins(loaded.model, loaded.tokenizer, known, batch_size, desc="after the edits")
                print(f"after the edits: P(new) > P(true) on {won} of {len(known)} requests' prompts")
        run_.save_and_report(loaded, ledger)
        check_stop(run_.resume_hint())
        failed = [e for e in edits if e.status != "applied"]
        if failed:
            raise UserError(f"{len(failed)} of {len(edits)} edit(s) failed verification: {failed[0].reason}")
        return edits
