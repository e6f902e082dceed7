"""Streaming text for the statistics: hub datasets or local files, sharded, tokenised, packed by tokens.

Lightning-free: ``datamodules/`` wraps this for a Trainer, and later stages use ``TextSource.identity``
to look statistics up without touching the data.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Iterator

import torch

from .digest import file_sha256, short
from .errors import UserError
from .padding import right_pad

__all__ = ["TextSource", "TokenBatch", "pack_batches", "shard_budget"]

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
            return {"files": {os.path.basename(p): short(file_sha256(p)) for p in self.local_files()}, "text_field": self.text_field}
        return {"path": self.path, "name": self.name, "split": self.split, "revision": self.revision or "main",
                "text_field": self.text_field}

    def _dataset(self):
        import datasets

        if self.files:
            files = self.local_files()
            builders = {_builder_for(p) for p in files}
            if len(builders) > 1:
                raise UserError(f"data.files={self.files} mixes file types {sorted(builders)}; use one type")
            return datasets.load_dataset(builders.pop(), data_files=files, split="train", streaming=True)
        return datasets.load_dataset(self.path, self.name, split=self.split, revision=self.revision, streaming=True)

    def open(self, shard: int = 0, num_shards: int = 1, skip: int = 0) -> Iterator[str]:
        """The texts of one shard, after skipping ``skip`` of them. Every text is in exactly one shard:
        whole files per shard when the file count allows it, else every ``num_shards``-th record."""
        from datasets.distributed import split_dataset_by_node

        ds = self._dataset()
        if num_shards > 1:
            ds = split_dataset_by_node(ds, rank=shard, world_size=num_shards)
        # .iter() rather than iter(ds): inside a DataLoader worker the latter would re-shard by worker.
        seen = 0
        for batch in ds.iter(batch_size=64):
            if self.text_field not in batch:
                raise UserError(f"records have no field '{self.text_field}' (fields: {', '.join(batch)}); set data.text_field=")
            for text in batch[self.text_field]:
                seen += 1
                if seen > skip:
                    yield text or ""

    def validate(self) -> None:
        """Fail now, with one line, if the source cannot be read or holds no text."""
        try:
            first = next(self.open(), None)
        except UserError:
            raise
        except Exception as err:  # network, gzip, JSON, parquet errors all surface here
            where = self.files or f"{self.path} ({self.name}) from the hub"
            hint = "" if self.files else "; offline? pass data.files=PATH_OR_GLOB of local json/jsonl/parquet/txt"
            raise UserError(f"cannot read {where}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{hint}") from err
        if first is None:
            raise UserError(f"{self.files or self.path} holds no records")


def shard_budget(total: int, shard: int, num_shards: int) -> int:
    """Token budget of one shard; the shards' budgets add up to ``total`` exactly."""
    return total // num_shards + (1 if shard < total % num_shards else 0)


@dataclasses.dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    position: int  # texts of this shard consumed once this batch is done
    tokens: int  # non-padding tokens in the batch

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _tokenize(tokenizer, text: str, max_length: int, chars_per_token: int) -> list[int]:
    # Whole Wikipedia articles run to 100k characters; tokenising only a generous prefix is exact as
    # long as that prefix already yields max_length tokens (else retokenise the whole text).
    prefix = text[: max_length * chars_per_token]
    ids = tokenizer(prefix, truncation=True, max_length=max_length)["input_ids"]
    if len(ids) < max_length and len(prefix) < len(text):
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    return ids


def pack_batches(
    texts: Iterator[str],
    tokenizer,
    *,
    max_length: int,
    chars_per_token: int,
    batch_tokens: int,
    budget: int,
    position: int = 0,
) -> Iterator[TokenBatch]:
    """Greedy packing of tokenised texts into right-padded batches of at most ``batch_tokens`` padded
    tokens; stops after exactly ``budget`` tokens (the last text is cut) or when the texts run out.
    ``position`` is the number of texts already consumed before ``texts`` starts; each text is tokenised
    from its first ``max_length x chars_per_token`` characters when they suffice (exact either way)."""
    if batch_tokens < max_length:
        raise UserError(f"data.batch_tokens={batch_tokens} must be at least data.max_length={max_length}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[list[int]] = []
    for text in texts:
        if budget <= 0:
            break
        ids = _tokenize(tokenizer, text, max_length, chars_per_token)[:budget]
        if rows and (len(rows) + 1) * max(len(ids), max(map(len, rows))) > batch_tokens:
            yield _collate(rows, pad, position)
            rows = []
        position += 1
        budget -= len(ids)
        if ids:
            rows.append(ids)
    if rows:
        yield _collate(rows, pad, position)


def _collate(rows: list[list[int]], pad: int, position: int) -> TokenBatch:
    ids, mask = right_pad(rows, pad)
    return TokenBatch(ids, mask, position, sum(map(len, rows)))
