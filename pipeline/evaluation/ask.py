"""Asking a model what it now says: prompts answered by the edited model beside the unedited one, as plain
functions (no Lightning). ``stage=ask`` (``recipes/ask.py``, ``rome ask ...``) and the Python ``rome.ask``
both run ``open_models`` and ``compare``.

Where the two models come from (``open_models``):
- ``ledger=DIR`` (an ``edit.out`` directory): ``model.name`` as loaded is the unedited model; the ledger's
  active edits applied to it (``Ledger.rebuild``: the factors the edit stage recorded, so these are the
  answers of the model the edit stage saved) give the edited one; afterwards the weights are restored;
- ``model.name=DIR`` of a model the edit stage saved (``rome_saved_model.json``): that model is the edited
  one, the base model its marker names is the unedited one;
- otherwise the model's own answers, one column.

Decoding (``ask.*`` in configs/config.yaml): greedy by default, so the answers are what the model says;
``ask.do_sample=true`` samples at ``ask.temperature`` from the ``ask.top_k`` likeliest tokens, seeded by
``seed`` (both models draw with the same seed). ``ask.chat``: each prompt is asked through the tokenizer's
chat template as the user's message, in the form the generative evaluation uses (``eval.generative.chat_prompt``;
a question as it is); ``auto`` does so when the tokenizer has a template (instruct models).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from rome.pipeline.core.generation import generate_tokens
from rome.pipeline.core.loading import EMBEDDED, LoadedModel, load_configured, load_model
from rome.pipeline.core.saving import MARKER
from rome.pipeline.editors.ledger import Ledger
from rome.pipeline.errors import UserError
from rome.pipeline.evaluation.generative import chat_text, resolve_chat

__all__ = [
    "AskSettings",
    "Answers",
    "ask_settings",
    "read_prompts",
    "answer",
    "ledger_applied",
    "open_models",
    "compare",
]


@dataclasses.dataclass(frozen=True)
class AskSettings:
    """``ask`` in configs/config.yaml, with ``chat`` resolved against the tokenizer, and the run's seed."""

    chat: bool
    chat_prompt: str  # the user message, {prompt} where the prompt goes (a question ending in ? as it is)
    max_tokens: int  # new tokens at most per answer
    do_sample: bool  # false: greedy
    temperature: float  # sampling only
    top_k: int  # sampling only: from the top_k likeliest tokens
    batch_size: int  # prompts per generate call
    seed: int

    def describe(self) -> str:
        how = (
            f"sampled (temperature {self.temperature}, top {self.top_k}, seed {self.seed})"
            if self.do_sample
            else "greedy"
        )
        form = "through the chat template" if self.chat else "as plain text (no chat template)"
        return f"{how}, {self.max_tokens} new tokens at most, prompts {form}"


def ask_settings(node: Any, tokenizer: Any, seed: int) -> AskSettings:
    """The settings from the ``ask`` node (checked: each names its key)."""
    for key in ("max_tokens", "top_k", "batch_size"):
        value = node[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"ask.{key}={value} must be a positive integer")
    if not float(node.temperature) > 0:
        raise UserError(f"ask.temperature={node.temperature} must be positive (ask.do_sample=false for greedy answers)")
    if "{prompt}" not in str(node.chat_prompt):
        raise UserError(f"ask.chat_prompt={node.chat_prompt!r} must hold {{prompt}}")
    return AskSettings(
        chat=resolve_chat(node.chat, tokenizer, "ask.chat"),
        chat_prompt=str(node.chat_prompt),
        max_tokens=int(node.max_tokens),
        do_sample=bool(node.do_sample),
        temperature=float(node.temperature),
        top_k=int(node.top_k),
        batch_size=int(node.batch_size),
        seed=int(seed),
    )


def read_prompts(
    prompt: str | None, prompts: Any, file: str | os.PathLike | None, subject: str | None = None
) -> list[str]:
    """The prompts asked: ``prompt`` (with {} filled by ``subject`` when it holds one), ``prompts`` (a list,
    or one text), and ``file`` (a JSON list, of texts or of records with prompt and subject, or a text file
    with one prompt per line), in that order; at least one."""
    out: list[str] = []
    if prompt is not None:
        out.append(_filled(str(prompt), subject, "prompt"))
    if prompts is not None:
        items = [prompts] if isinstance(prompts, str) else list(prompts)
        out += [_filled(str(p), subject, "prompts") for p in items]
    if file:
        out += _prompts_from_file(Path(file).expanduser())
    out = [p for p in (p.strip() for p in out) if p]
    if not out:
        raise UserError('no prompt: pass prompt="...", prompts=["...", "..."] or ask.file=PATH (one prompt a line)')
    return out


def _filled(text: str, subject: str | None, key: str) -> str:
    if "{}" not in text:
        return text
    if not subject:
        raise UserError(f"{key} '{text}' holds {{}} for a subject: pass subject=... or write the subject in")
    return text.replace("{}", subject, 1)


def _prompts_from_file(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"ask.file={path} is not a file (a JSON list of prompts, or one prompt a line)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"ask.file={path} cannot be read as text ({err})") from None
    if path.suffix.lower() != ".json":
        return [line for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"ask.file={path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, list):
        raise UserError(f"ask.file={path} must hold a JSON list of prompts")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            out.append(_filled(item["prompt"], item.get("subject"), f"ask.file={path} item {i}"))
        else:
            raise UserError(f"ask.file={path} item {i} is neither a prompt nor a record with a prompt")
    return out


@torch.no_grad()
def answer(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], settings: AskSettings) -> list[str]:
    """What the model says after each prompt (its new text, whitespace runs made one space), batched."""
    texts = [chat_text(tokenizer, p, settings.chat_prompt) if settings.chat else p for p in prompts]
    out = []
    for n, start in enumerate(range(0, len(texts), settings.batch_size)):
        new = generate_tokens(
            model,
            tokenizer,
            texts[start : start + settings.batch_size],
            settings.max_tokens,
            top_k=settings.top_k if settings.do_sample else None,
            temperature=settings.temperature,
            seed=settings.seed + n if settings.do_sample else None,
            exact_length=False,
            add_special_tokens=not settings.chat,  # the chat text holds its special tokens already
        )
        out += [" ".join(tokenizer.decode(row, skip_special_tokens=True).split()) for row in new]
    return out


@dataclasses.dataclass
class Answers:
    """The prompts with the edited (or only) model's answers and, when there is one, the unedited model's."""

    prompts: list[str]
    after: list[str]
    before: list[str] | None
    title: str  # which models answered
    settings: AskSettings

    def __str__(self) -> str:
        lines = [self.title, f"answers: {self.settings.describe()}"]
        for i, prompt in enumerate(self.prompts):
            lines += ["", prompt]
            if self.before is None:
                lines.append(f"  answer: {self.after[i]}")
            else:
                lines += [f"  before: {self.before[i]}", f"  after:  {self.after[i]}"]
        return "\n".join(lines)


@contextlib.contextmanager
def ledger_applied(loaded: LoadedModel, ledger: Ledger) -> Iterator[int]:
    """``loaded`` with the ledger's active edits applied (it must hold the base weights), restored bitwise on
    exit; yields how many edits were applied."""
    weights = ledger.edited_weights(loaded.model)
    kept = {name: w.detach().clone() for name, w in weights.items()}
    try:
        yield ledger.rebuild(loaded.model, loaded.spec)
    finally:
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(kept[name])


def open_ledger(directory: str | os.PathLike, model_name: str | None = None) -> Ledger:
    """The ledger in ``directory`` (checked before any model is loaded: it exists, is ours, and, when
    ``model_name`` is given, was made on that model)."""
    ledger = Ledger.open(directory, create=False)
    recorded = (ledger.data.get("model") or {}).get("name")
    if model_name is not None and recorded and not _same_model(recorded, model_name):
        raise UserError(
            f"ledger={directory} holds edits of model {recorded}, not {model_name}: pass model.name={recorded}"
        )
    return ledger


def _same_model(a: str, b: str) -> bool:
    return a == b or (os.path.isdir(a) and os.path.isdir(b) and os.path.realpath(a) == os.path.realpath(b))


def saved_base(name: str) -> dict[str, str] | None:
    """The base model (``{"name", "revision"}``) of a model the edit stage saved in directory ``name``; None
    for any other model."""
    marker = Path(name) / MARKER
    if not marker.is_file():
        return None
    try:
        base = json.loads(marker.read_text()).get("base_model")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, dict) and isinstance(base.get("name"), str) else None


def open_models(cfg: Any, loaded: LoadedModel | None = None) -> tuple[LoadedModel, Ledger | None, LoadedModel | None]:
    """(the model asked, the ledger to apply to it, the unedited model to ask beside it) for ``cfg``
    (``ledger``, ``model.*``); ``loaded``: the model already loaded (the Python API), else ``model.name``'s."""
    ledger = open_ledger(cfg.ledger, None if loaded is not None else str(cfg.model.name)) if cfg.ledger else None
    base_id = saved_base(str(cfg.model.name)) if loaded is None and not ledger else None
    loaded = loaded or load_configured(cfg.model)
    if ledger is not None and ledger.data.get("model") != loaded.identity:
        m = ledger.data.get("model") or {}
        raise UserError(
            f"ledger={cfg.ledger} holds edits of model {m.get('name')} ({m.get('revision')}), not "
            f"{loaded.identity['name']} ({loaded.identity['revision']}): pass model.name={m.get('name')}"
        )
    base = None
    if base_id is not None:
        name = base_id["name"]
        hub = name not in EMBEDDED and not os.path.isdir(name)
        base = load_model(
            name,
            dtype=str(cfg.model.dtype),
            device=str(loaded.model.device),
            revision=base_id.get("revision") if hub else None,
            cache_dir=cfg.model.cache_dir,
        )
        if base.identity != base_id:
            print(
                f"note: the base model {name} is now {base.identity['revision']}, not {base_id.get('revision')} "
                "the edits were made on: its answers are not quite the model before the edits"
            )
    return loaded, ledger, base


def compare(
    loaded: LoadedModel,
    prompts: Sequence[str],
    settings: AskSettings,
    *,
    ledger: Ledger | None = None,
    base: LoadedModel | None = None,
    name: str | None = None,
) -> Answers:
    """The prompts answered by the edited model beside the unedited one: ``loaded`` before and after the
    ledger's edits (restored afterwards), or ``base`` beside ``loaded``; neither: ``loaded``'s answers alone."""
    prompts, name = list(prompts), name or loaded.identity["name"]
    if ledger is not None:
        before = answer(loaded.model, loaded.tokenizer, prompts, settings)
        with ledger_applied(loaded, ledger) as n:
            after = answer(loaded.model, loaded.tokenizer, prompts, settings)
        title = f"before: {name}, unedited | after: with the {n} active edit(s) of the ledger {ledger.dir}"
        return Answers(prompts, after, before, title, settings)
    after = answer(loaded.model, loaded.tokenizer, prompts, settings)
    if base is not None:
        before = answer(base.model, base.tokenizer, prompts, settings)
        title = f"before: {base.identity['name']}, the base model | after: {name}, the edited model saved there"
        return Answers(prompts, after, before, title, settings)
    return Answers(prompts, after, None, f"{name}: its answers as it is now", settings)
