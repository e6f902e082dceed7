"""Recipe: ``python train.py stage=revert ledger=DIR edit_id=N`` (or ``edit_id=all``).

The model is rebuilt from its base weights plus the ledger's remaining edits, in order, with the same
update code the edits used: a reverted model is bitwise equal to one that never had the edit.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from pipeline.errors import UserError
from pipeline.ledger import Ledger
from pipeline.loading import load_model
from pipeline.saving import save_model


def run(cfg: DictConfig) -> None:
    if not cfg.ledger:
        raise UserError("pass ledger=DIR (the edit.out of the edits to revert) and edit_id=N or edit_id=all")
    if cfg.edit_id is None:
        raise UserError("pass edit_id=N (an id from the ledger) or edit_id=all")
    ledger = Ledger.open(cfg.ledger, create=False)
    reverted = ledger.revert(cfg.edit_id)
    target = cfg.edit.save_to or ledger.data.get("saved_to")
    if not target:
        raise UserError("the ledger records no saved model; pass edit.save_to=DIR for the rebuilt model")
    base = ledger.data["model"]["name"]
    loaded = load_model(base, dtype=ledger.data.get("model_dtype") or cfg.model.dtype, device="cpu",
                        cache_dir=cfg.model.cache_dir)
    if loaded.identity != ledger.data["model"]:
        raise UserError(f"the base model {base} no longer matches the ledger's identity {ledger.data['model']}")
    n = ledger.rebuild(loaded.model, loaded.spec)
    save_model(loaded, target)  # the model first, the ledger after: a crash leaves the old pair intact
    ledger.data["saved_to"] = str(Path(target).resolve())
    ledger.save()
    print(f"reverted edit(s) {reverted}; rebuilt {base} with {n} remaining edit(s) -> {target}")
