"""Digests and readable names: one hash (sha256), one short length, one slug rule for every cache key,
identity and checksum in the project.

Checksums of files we verify before use keep the full hex digest; names and cache keys use the short
form, ``DIGEST_CHARS`` hex characters (64 bits: collisions are not a concern at cache scale).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

__all__ = ["DIGEST_CHARS", "file_sha256", "short", "json_digest", "text_digest", "slug"]

DIGEST_CHARS = 16


def file_sha256(*paths: str | os.PathLike) -> str:
    """Full hex sha256 over the contents of ``paths``, read in order (checksums)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def short(hexdigest: str) -> str:
    """The short form of a hex digest used in names and identities."""
    return hexdigest[:DIGEST_CHARS]


def text_digest(text: str) -> str:
    return short(hashlib.sha256(text.encode()).hexdigest())


def json_digest(obj: Any) -> str:
    """A short, stable digest of a JSON-able object (cache keys)."""
    return text_digest(json.dumps(obj, sort_keys=True))


def slug(text: str, max_chars: int = 60) -> str:
    """A file-name-safe form of ``text`` (letters, digits, '.', '_', '-'), its last ``max_chars``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-max_chars:] or "x"
