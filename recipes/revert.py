"""Recipe: ``python train.py stage=revert ledger=DIR edit_id=N`` (or ``edit_id=all``).

The model is rebuilt from its base weights plus the ledger's remaining edits, in order, with the same
update code the edits used: a reverted model is bitwise equal to one that never had the edit. The
destination (``edit.save_to``, else where the ledger last saved) is checked before any work and is only
ever a new or empty directory or a model this project saved; every edit file is checked against its
checksum before a weight changes; the ledger records the revert only once the model is saved. A SIGTERM /
SIGINT before the save stops with nothing changed.
"""

from __future__ import annotations

from omegaconf import DictConfig

from rome.pipeline.core.loading import load_model
from rome.pipeline.core.locks import DirectoryLock
from rome.pipeline.core.saving import check_destination, save_model
from rome.pipeline.core.signals import check_stop
from rome.pipeline.editors.ledger import Ledger
from rome.pipeline.errors import UserError


def run(cfg: DictConfig) -> None:
    if not cfg.ledger:
        raise UserError("pass ledger=DIR (the edit.out of the edits to revert) and edit_id=N or edit_id=all")
    if cfg.edit_id is None:
        raise UserError("pass edit_id=N (an id from the ledger) or edit_id=all")
    Ledger.open(cfg.ledger, create=False)  # a ledger of ours, before the lock file goes into it
    with DirectoryLock(cfg.ledger, "ledger"):  # one run writes a ledger at a time
        _revert(cfg)


def _revert(cfg: DictConfig) -> None:
    ledger = Ledger.open(cfg.ledger, create=False)
    reverted = ledger.revert(cfg.edit_id)
    target = cfg.edit.save_to or ledger.data.get("saved_to")
    if not target:
        raise UserError("the ledger records no saved model; pass edit.save_to=DIR for the rebuilt model")
    what = "edit.save_to" if cfg.edit.save_to else f"the ledger's saved_to ({ledger.dir / 'ledger.json'})"
    base = ledger.data["model"]["name"]
    target = check_destination(target, what, protect=(ledger.dir, base))
    loaded = load_model(
        base, dtype=ledger.data.get("model_dtype") or cfg.model.dtype, device="cpu", cache_dir=cfg.model.cache_dir
    )
    if loaded.identity != ledger.data["model"]:
        raise UserError(f"the base model {base} no longer matches the ledger's identity {ledger.data['model']}")
    n = ledger.rebuild(loaded.model, loaded.spec)
    check_stop(f"nothing was changed (edit(s) {reverted} not reverted yet); to revert, run the same command")
    save_model(loaded, target, what, {"ledger": str(ledger.dir.resolve()), "edits": [e["id"] for e in ledger.active()]})
    ledger.data["saved_to"] = str(target.resolve())
    ledger.save()  # the model first, the ledger after: a crash leaves the old pair intact
    print(f"reverted edit(s) {reverted}; rebuilt {base} with {n} remaining edit(s) -> {target}")
    later = ledger.solved_after(reverted)
    if later:
        print(
            f"note: edit(s) {later} were solved on weights that contained edit(s) {reverted}; they are re-applied as "
            "recorded, not re-solved. To re-solve one, revert it too and edit again with its request "
            "(ledger.json has it)"
        )
