"""Entry point: compose configs/ with key=value overrides and dispatch on ``stage``.

    python train.py stage=stats model.name=smollm2-135m stats.layers=[6] stats.tokens=200000
    python train.py stage=trace prompt="{} is located in the city of" subject="The Eiffel Tower"
"""

from __future__ import annotations

import importlib
import logging
import sys

STAGES = {"stats": "recipes.stats", "edit": "recipes.edit", "revert": "recipes.revert", "trace": "recipes.trace",
          "eval": "recipes.eval"}


def _quiet() -> None:
    """Keep the console for our own progress bars and results: no framework banners or tips."""
    import warnings

    import lightning.pytorch  # noqa: F401  (it sets its loggers to INFO on import: import first, then quiet)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*predict returned None.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")
    warnings.filterwarnings("ignore", message=".*`configure_optimizers` returned `None`.*")  # Adam is the pipeline's
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str]) -> int:
    from pipeline.config import compose
    from pipeline.errors import Interrupted, UserError
    from pipeline.signals import stop_on_signals

    _quiet()
    try:
        cfg = compose(argv)
        if cfg.stage not in STAGES:
            raise UserError(f"stage={cfg.stage} is not one of {', '.join(STAGES)}")
        recipe = STAGES[cfg.stage]
        if cfg.stage == "eval" and cfg.eval.mode != "case":  # many edits into one model: its own recipe
            recipe = "recipes.eval_scale"
        with stop_on_signals():
            importlib.import_module(recipe).run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"interrupted: {stop.hint}", file=sys.stderr)
        return 128 + stop.signum
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
