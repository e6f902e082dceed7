"""Recipe: ``python train.py stage=export ledger=DIR`` (``rome export ledger=DIR``) -- the ledger's remaining
edits as a PEFT LoRA adapter (``export.format=peft``) in ``export.out`` (default ``DIR/adapter``).

No model is loaded: the adapter is the ledger's stored factors, each file checked against its checksum, summed
per edited module (``pipeline/core/adapters.py``). ``peft.PeftModel.from_pretrained(base, OUT)`` then gives
the edited model and ``merge_and_unload()`` the edited weights. After a revert, run it again: the adapter
holds the edits applied when it was written.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from rome.pipeline.core.adapters import FORMATS, export_adapter
from rome.pipeline.core.locks import DirectoryLock
from rome.pipeline.editors.ledger import Ledger
from rome.pipeline.errors import UserError


def run(cfg: DictConfig) -> Path:
    if not cfg.ledger:
        raise UserError("pass ledger=DIR (the edit.out of the edits to export)")
    if cfg.export.format not in FORMATS:
        raise UserError(f"export.format={cfg.export.format} is not one of {', '.join(FORMATS)}")
    Ledger.open(cfg.ledger, create=False)  # a ledger of ours, before the lock file goes into it
    with DirectoryLock(cfg.ledger, "ledger"):  # its files read while no run changes them
        ledger = Ledger.open(cfg.ledger, create=False)
        out = cfg.export.out or ledger.dir / "adapter"
        path = export_adapter(ledger, out, "export.out", cfg.export.dtype)
    size = sum(p.stat().st_size for p in path.iterdir())
    print(
        f"exported {len(ledger.active())} edit(s) of {ledger.dir} as a PEFT LoRA adapter -> {path} "
        f"({size / 1024:.1f} KiB); load it with peft.PeftModel.from_pretrained(base, '{path}') on the base "
        f"model {ledger.data['model']['name']}"
    )
    return path
