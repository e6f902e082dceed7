"""Recipe: ``rome report DIR`` (``python train.py stage=report report.dir=DIR``) -- one HTML page of an output
directory: an eval.out (either protocol), a trace.out (single facts or a dataset) or an edit ledger (also as
``ledger=DIR``, the key of the other stages that read one), its kind read from its files (``pipeline/report``).
Written to ``DIR/report.html`` or ``report.out``, atomically; a file there that is not a report this project
wrote is never replaced."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from rome.pipeline.errors import UserError
from rome.pipeline.report import write_report


def run(cfg: DictConfig) -> Path:
    directory = cfg.report.dir or cfg.ledger  # ledger=DIR, as revert, export and ask name an edit.out, works too
    if not directory:
        raise UserError(
            "nothing to report: name an output directory, rome report DIR (python train.py stage=report report.dir=DIR)"
        )
    path = write_report(str(directory), str(cfg.report.out) if cfg.report.out else None)
    print(f"report: {path}")
    return path
