"""The command line: compose configs/ with key=value overrides and dispatch on ``stage`` to its recipe.

``python train.py`` (the repository's entry point) and the installed ``rome`` command both run this module.

python train.py stage=stats model.name=smollm2-135m stats.layers=[6] stats.tokens=200000
python train.py stage=trace prompt="{} is located in the city of" subject="The Eiffel Tower"
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys

STAGES = {  # stage: (recipe, what it does)
    "stats": (
        "rome.recipes.stats",
        "C = E[k kT] of the keys entering the edited MLP down-projection, over streamed text",
    ),
    "edit": (
        "rome.recipes.edit",
        "ROME (or MEMIT / AlphaEdit) edits from request=..., verified, recorded in a ledger, saved",
    ),
    "revert": ("rome.recipes.revert", "undo edits of a ledger (ledger=DIR edit_id=N|all), bitwise"),
    "export": ("rome.recipes.export", "a ledger's edits as a PEFT LoRA adapter (ledger=DIR; kilobytes, not the model)"),
    "ask": ("rome.recipes.ask", 'prompt="..." answered with a ledger\'s edits (ledger=DIR) beside the unedited model'),
    "trace": ("rome.recipes.trace", "causal tracing: where the model recalls a fact; heatmaps and the edit layer"),
    "eval": (
        "rome.recipes.eval",
        "CounterFact / zsRE evaluation of methods side by side (eval.mode=sequential|batch: many edits)",
    ),
    "report": ("rome.recipes.report", "one HTML page of an eval.out, trace.out or edit ledger (rome report DIR)"),
}
HELP_WORDS = ("--help", "-h", "help")


def usage() -> str:
    """The stages, the config groups (from configs/config.yaml and its comments) and where keys are documented."""
    import re

    from rome.pipeline.config import CONFIG_DIR

    lines = ["usage: python train.py stage=STAGE [key=value ...]", "       rome STAGE [key=value ...]"]
    lines += ["       rome report DIR [report.out=PATH]", "", "stages:"]
    lines += [f"  {name:<8} {what}" for name, (_, what) in STAGES.items()]
    lines += ["", "config keys (dotted, YAML values: stats.layers=[4,5,6]):"]
    text = (CONFIG_DIR / "config.yaml").read_text()
    for m in re.finditer(r"^([A-Za-z_]+):([^\n#]*)(?:#\s*(.*))?$", text, re.M):
        key, value, comment = m.group(1), m.group(2).strip(), (m.group(3) or "").strip()
        if key == "method":
            continue
        lines.append(f"  {key + ('.*' if not value else ''):<14} {comment}")
    lines.append(f"  {'method.*':<14} eval methods, one file each in configs/method/ (method.ft_l.lr=1e-4)")
    lines += [
        "",
        f"Every key and its default, with a comment: {CONFIG_DIR / 'config.yaml'}; per-model defaults in "
        "configs/model/; docs/ explains each stage.",
        "print_config=true prints the composed configuration and exits.",
    ]
    return "\n".join(lines)


def quiet() -> None:
    """Keep the console for our own progress bars and results: no framework banners or tips. Lightning is not
    imported here: the stages that do not train (revert, ask, export, report, trace) start seconds sooner without
    it; ``quiet_lightning`` quiets it once a recipe has imported it."""
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*predict returned None.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*`past_key_values` is deprecated.*")  # the prefix KV cache we pass
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def quiet_lightning() -> None:
    """Lightning sets its loggers to INFO when it is imported (banners: "GPU available", "TPU available", ...):
    back to warnings, after the recipe's imports (the recipes that train import it at their top)."""
    if "lightning" in sys.modules:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str], *, exits_after: bool = False) -> int:
    """Run one stage; ``exits_after``: the process ends when this returns (the console command), so a
    stopping signal that comes after the stage is ignored rather than raised into the interpreter's exit."""
    from rome.pipeline.config import compose, nearest
    from rome.pipeline.errors import Interrupted, UserError

    if not argv or any(a in HELP_WORDS for a in argv):
        print(usage())
        return 0
    try:
        # the keys, types and stage judged first, before torch and Lightning are imported (seconds on a busy
        # machine): a config error answers at once. configure() below composes again with the model's family
        # file and checks the devices; a model file sets values, never keys, so it judges the same keys.
        fast = compose(argv)
        if fast.stage not in STAGES:
            raise UserError(
                f"stage={fast.stage} is not one of {', '.join(STAGES)}{nearest(str(fast.stage), list(STAGES))}"
            )
        if not fast.print_config and sys.stderr.isatty():  # at a terminal, a first line at once: the imports
            # below take seconds on a busy machine (logs and pipes keep one error line for bad input)
            print(f"{fast.stage}: {fast.model.name}: loading torch, transformers and the model", file=sys.stderr)
        quiet()
        from rome.pipeline.core.loading import configure
        from rome.pipeline.core.signals import stop_on_signals

        cfg = configure(argv)
        if cfg.print_config:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        recipe = STAGES[cfg.stage][0]
        if cfg.stage == "eval" and cfg.eval.mode != "case":  # many edits into one model: its own recipe
            recipe = "rome.recipes.eval_scale"
        stage = importlib.import_module(recipe)
        quiet_lightning()
        with stop_on_signals(then_ignore=exits_after):
            stage.run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"interrupted: {stop.hint}", file=sys.stderr)
        return 128 + stop.signum
    except OSError as err:
        from rome.pipeline.core.atomic import no_space

        if not no_space(err):
            raise
        print(
            f"error: no space left on device ({err.strerror or err}); free some space and run the same command "
            "(finished work is kept; nothing was left half-written)",
            file=sys.stderr,
        )
        return 2
    return 0


def cli() -> int:
    """The ``rome`` command: ``rome STAGE key=value ...`` (``rome edit request=...``) is
    ``python train.py stage=STAGE key=value ...``; ``rome report DIR`` is ``stage=report report.dir=DIR``;
    bare ``rome`` prints the help."""
    argv = sys.argv[1:]
    if argv and "=" not in argv[0] and argv[0] not in HELP_WORDS:
        argv = [f"stage={argv[0]}", *argv[1:]]
        if argv[0] == "stage=report" and len(argv) > 1 and "=" not in argv[1] and argv[1] not in HELP_WORDS:
            argv[1] = f"report.dir={json.dumps(argv[1])}"  # the directory, positional (quoted: 2026-12-04 is text)
    return run(argv)


def run(argv: list[str]) -> int:
    """``main`` for a console: a reader that leaves the pipe early (``rome --help | head``) ends it quietly."""
    try:
        return main(argv, exits_after=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE, as a shell reports it
