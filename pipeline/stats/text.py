"""Streaming text for the statistics: hub datasets or local files, cut into windows of consecutive texts,
sharded by window, tokenised, sorted by length and packed into batches by tokens.

The windows, and so the batches, do not depend on how many processes and workers share the text, and
neither does where the token budget ends: it is the first ``stats.tokens`` tokens of the stream (the last
text cut), located once by counting the windows' tokens (``plan_stream``) when several shards share it, so
each shard's budget is exactly its windows' part of that prefix. A run on N processes sums the same
per-batch products as a run on one (``pipeline.stats.second_moment``).
Lightning-free: ``datamodules/`` wraps this for a Trainer, and later stages use ``TextSource.identity``
to look statistics up without touching the data.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rome.pipeline.core.digest import file_sha256, short
from rome.pipeline.core.padding import right_pad
from rome.pipeline.core.signals import check_stop, ignore_resource_sharer_resets, ignore_stop_signals
from rome.pipeline.errors import UserError

__all__ = [
    "TextSource",
    "TokenBatch",
    "StreamPlan",
    "plan_stream",
    "feeding_worker_init",
    "tokenize_window",
    "pack_window",
    "pack_batches",
]

TOKENIZE_TEXTS = 64  # texts per batched tokenizer call
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def _builder_for(path: str) -> str:
    stem = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(stem)[1].lower()
    if ext not in _BUILDERS:
        raise UserError(f"data file {path} has an unsupported type; use .json, .jsonl(.gz), .parquet or .txt")
    return _BUILDERS[ext]


@dataclasses.dataclass(frozen=True)
class TextSource:
    path: str = "wikimedia/wikipedia"
    name: str | None = "20231101.en"
    split: str = "train"
    revision: str | None = None
    files: str | None = None  # path or glob of local files; replaces the hub dataset
    text_field: str = "text"

    def local_files(self) -> list[str]:
        paths = sorted(glob.glob(os.path.expanduser(self.files))) if self.files else []
        if self.files and not paths:
            raise UserError(f"data.files={self.files} matches no file")
        for p in paths:
            if not os.access(p, os.R_OK):
                raise UserError(f"data file {p} is not readable")
            if os.path.getsize(p) == 0:
                raise UserError(f"data file {p} is empty; point data.files at files with text")
        return paths

    def identity(self) -> dict[str, Any]:
        """What statistics are keyed by: file names and content hashes, or the hub id and revision."""
        if self.files:
            return {
                "files": {os.path.basename(p): short(file_sha256(p)) for p in self.local_files()},
                "text_field": self.text_field,
            }
        return {
            "path": self.path,
            "name": self.name,
            "split": self.split,
            "revision": self.revision or "main",
            "text_field": self.text_field,
        }

    def _dataset(self):
        import datasets

        if self.files:
            files = self.local_files()
            builders = {_builder_for(p) for p in files}
            if len(builders) > 1:
                raise UserError(f"data.files={self.files} mixes file types {sorted(builders)}; use one type")
            return datasets.load_dataset(builders.pop(), data_files=files, split="train", streaming=True)
        return datasets.load_dataset(self.path, self.name, split=self.split, revision=self.revision, streaming=True)

    def _texts(self, part: Any) -> Iterator[str]:
        # .iter() rather than iter(ds): inside a DataLoader worker the latter would re-shard by worker.
        for batch in part.iter(batch_size=64):
            if self.text_field not in batch:
                raise UserError(
                    f"records have no field '{self.text_field}' (fields: {', '.join(batch)}); set data.text_field="
                )
            for text in batch[self.text_field]:
                yield text or ""

    def windows(self, size: int, shard: int = 0, num_shards: int = 1, skip: int = 0) -> Iterator[list[str]]:
        """This shard's windows, after skipping ``skip`` of them. A window is ``size`` consecutive records of
        one file (a file's last window may be shorter): the same windows whatever the number of shards, so
        that the batches made from them, and the per-batch products summed into C, are too. The windows go
        round-robin in stream order (window w to shard w % num_shards), so every shard has its share of any
        prefix of the stream (where the token budget ends) and reads past the others' windows."""
        if size < 1:
            raise UserError(f"data.sort_window={size} must be at least 1 text")
        ds = self._dataset()
        n_files = ds.n_shards
        seen = own = 0  # windows of every shard / of this one
        for f in range(n_files):
            part = ds.shard(num_shards=n_files, index=f) if n_files > 1 else ds
            texts = self._texts(part)
            while window := list(itertools.islice(texts, size)):
                if seen % num_shards == shard:
                    if own >= skip:
                        yield window
                    own += 1
                seen += 1

    def first_text(self) -> str | None:
        return next((w[0] for w in self.windows(1)), None)

    def validate(self) -> None:
        """Fail now, with one line, if the source cannot be read or holds no text."""
        try:
            first = self.first_text()
        except UserError:
            raise
        except Exception as err:  # network, gzip, JSON, parquet errors all surface here
            where = self.files or f"{self.path} ({self.name}) from the hub"
            hint = "" if self.files else "; offline? pass data.files=PATH_OR_GLOB of local json/jsonl/parquet/txt"
            first_line = str(err).splitlines()[0] if str(err) else ""
            raise UserError(f"cannot read {where}: {type(err).__name__}: {first_line}{hint}") from err
        if first is None:
            raise UserError(f"{self.files or self.path} holds no records")


@dataclasses.dataclass
class TokenBatch:
    """A right-padded batch of whole texts, built on the host (in a dataloader worker) with everything the
    step needs already computed: no host-device sync, no per-token Python work in the step."""

    input_ids: torch.Tensor  # [B, T], rows sorted by length, right-padded
    index: torch.Tensor | None  # flat positions of the real tokens in input_ids.view(-1); None: no row is padded
    tokens: int  # real tokens in the batch
    window: int  # the shard's window it came from (0-based, counting the windows of this shard)
    batch: int  # its position among the window's batches
    last: bool  # the window's last batch

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # asdict would deep-copy the tensors


def tokenize_window(tokenizer: Any, texts: list[str], max_length: int, chars_per_token: int) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_length``. Whole Wikipedia articles run to 100k characters:
    each text's first ``max_length x chars_per_token`` characters are tokenised (one batched call), and
    only a text whose prefix gives fewer than ``max_length`` tokens is tokenised whole (exact either way)."""
    limit = max_length * chars_per_token
    ids = tokenizer([t[:limit] for t in texts], truncation=True, max_length=max_length)["input_ids"]
    for i, text in enumerate(texts):
        if len(ids[i]) < max_length and len(text) > limit:
            ids[i] = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    return ids


def pack_window(
    rows: list[list[int]], batch_tokens: int, pad: int
) -> list[tuple[torch.Tensor, torch.Tensor | None, int]]:
    """A window's token rows sorted by length (longest first, ties in stream order) and packed greedily into
    right-padded batches of at most ``batch_tokens`` padded tokens: (input_ids, index, tokens) each. Sorting
    leaves almost no padding, and the many texts truncated to max_length fill whole, unpadded batches."""
    rows = sorted((r for r in rows if r), key=len, reverse=True)  # stable: ties keep their order
    out, start = [], 0
    while start < len(rows):
        width = len(rows[start])
        n = max(1, batch_tokens // width)
        group = rows[start : start + n]
        start += len(group)
        ids, mask = right_pad(group, pad)
        index = None if len(group[-1]) == width else mask.view(-1).nonzero().view(-1)
        out.append((ids, index, sum(map(len, group))))
    return out


def pack_batches(
    windows: Iterator[list[str]],
    tokenizer: Any,
    *,
    max_length: int,
    chars_per_token: int,
    batch_tokens: int,
    budget: int,
    window: int = 0,
    skip_batches: int = 0,
) -> Iterator[TokenBatch]:
    """Each window's texts tokenised (truncated to ``max_length``), cut in stream order once ``budget`` tokens
    are reached (the last text is cut), then sorted and packed (``pack_window``). Stops after exactly
    ``budget`` tokens or when the windows run out. ``window`` is the ordinal of the first window given
    (a resumed shard skips the windows it has done) and ``skip_batches`` the batches of that first window
    already counted: with the budget left at that window's start, the rest is reproduced exactly."""
    if batch_tokens < max_length:
        raise UserError(f"data.batch_tokens={batch_tokens} must be at least data.max_length={max_length}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for w, texts in enumerate(windows, start=window):
        if budget <= 0:
            break
        rows: list[list[int]] = []
        for start in range(0, len(texts), TOKENIZE_TEXTS):  # in chunks: a budget that ends early tokenises no more
            for ids in tokenize_window(tokenizer, texts[start : start + TOKENIZE_TEXTS], max_length, chars_per_token):
                rows.append(ids[:budget])
                budget -= len(rows[-1])
                if budget <= 0:
                    break
            if budget <= 0:
                break
        batches = pack_window(rows, batch_tokens, pad)
        for b, (ids, index, tokens) in enumerate(batches):
            if w == window and b < skip_batches:
                continue
            yield TokenBatch(ids, index, tokens, w, b, b == len(batches) - 1)


def feeding_worker_init(worker_id: int) -> None:
    """A dataloader worker feeding the statistics ignores the stop signals: the main process stops at a batch
    boundary and its workers go with it; and it prints nothing when a main process stopped at once leaves a
    batch's transfer half done (``pipeline.core.signals``)."""
    ignore_stop_signals()
    ignore_resource_sharer_resets()


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """Where a token budget ends in the stream: the tokens each window gives, in stream order, up to the
    window in which the budget is reached (its count cut to the budget). Shard s of N owns windows s, s + N,
    ... (``TextSource.windows``), so its budget is their sum, and the shards together read exactly the
    stream's first ``tokens`` tokens, the texts one shard alone would read."""

    window_tokens: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return sum(self.window_tokens)

    def budget(self, shard: int, num_shards: int) -> int:
        return sum(self.window_tokens[shard::num_shards])


def _window_tokens(tokenizer: Any, texts: list[str], max_length: int, chars_per_token: int) -> int:
    """The tokens a window gives (each text truncated to ``max_length``): what ``pack_batches`` counts."""
    return sum(
        len(ids)
        for start in range(0, len(texts), TOKENIZE_TEXTS)
        for ids in tokenize_window(tokenizer, texts[start : start + TOKENIZE_TEXTS], max_length, chars_per_token)
    )


class _WindowTokens(IterableDataset):
    """(window's index in the stream, its tokens) for the windows of this dataloader worker."""

    def __init__(
        self, source: TextSource, tokenizer: Any, sort_window: int, max_length: int, chars_per_token: int
    ) -> None:
        self.source, self.tokenizer = source, tokenizer
        self.sort_window, self.max_length, self.chars_per_token = sort_window, max_length, chars_per_token

    def __iter__(self) -> Iterator[tuple[int, int]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        for i, texts in enumerate(self.source.windows(self.sort_window, worker, workers)):
            yield worker + i * workers, _window_tokens(self.tokenizer, texts, self.max_length, self.chars_per_token)


def plan_stream(
    source: TextSource,
    tokenizer: Any,
    *,
    sort_window: int,
    max_length: int,
    chars_per_token: int,
    budget: int,
    workers: int = 0,
) -> StreamPlan:
    """Count the windows' tokens in stream order until ``budget`` (``workers`` dataloader workers tokenise
    the windows in turn; 0: in this process): the ``StreamPlan`` every shard of a run takes its budget from.
    A tokenising pass over the budget's texts, run once per run when several shards share the text (one
    shard needs none: its budget is the whole one). A stop request ends it with nothing to save."""
    counts: list[int] = []
    found: dict[int, int] = {}  # windows counted ahead of the next one in stream order
    left = budget
    loader = DataLoader(
        _WindowTokens(source, tokenizer, sort_window, max_length, chars_per_token),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        worker_init_fn=feeding_worker_init if workers else None,
    )
    for index, tokens in loader:
        check_stop("stopped while locating the token budget in the stream, before any batch; run the same command")
        found[index] = tokens
        while left > 0 and len(counts) in found:
            counts.append(min(found.pop(len(counts)), left))
            left -= counts[-1]
        if left <= 0:
            break
    return StreamPlan(tuple(counts))
