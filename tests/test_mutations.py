"""Seeded mutations of everything the project reads back: ledgers and their edit files, statistics manifests and
files, partial statistics, request files (flipped bytes, truncation, changed fields, paths with ``..``). Each read
either refuses with a ``UserError`` (one line at the CLI, exit 2) or gives exactly what the untouched file gives
(the same weights bitwise, the same statistics) — never a third outcome. 220 mutations, seconds."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from rome.pipeline.core.loading import configure, load_model
from rome.pipeline.core.requests import parse_requests
from rome.pipeline.editors.ledger import Ledger
from rome.pipeline.editors.rank_one import KeySolver
from rome.pipeline.editors.rome import RomeEditor
from rome.pipeline.errors import UserError

SEED = 20261204
REQUESTS = [
    {
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
        "target_true": "Paris",
    },
    {
        "prompt": "{} plays the sport of",
        "subject": "Michael Jordan",
        "target_new": "tennis",
        "target_true": "basketball",
    },
]


def byte_mutations(data: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(["flip", "truncate", "insert", "zero"])
    b = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        b = b[: rng.randrange(len(b))]
    elif kind == "insert":
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    else:
        i = rng.randrange(len(b))
        b[i : i + rng.randint(1, 16)] = bytes(16)
    return bytes(b)


def json_mutation(obj, rng: random.Random):
    """One field of a JSON document changed: a number, a string (a path with ``..`` among them), a removal."""
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append((*path, k))
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                paths.append((*path, i))
                walk(v, (*path, i))

    walk(obj, ())
    path = rng.choice(paths)
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    key, value = path[-1], parent[path[-1]]
    choice = rng.random()
    if choice < 0.2 and isinstance(parent, dict):
        del parent[key]
    elif isinstance(value, bool) or value is None:
        parent[key] = not value if isinstance(value, bool) else 0
    elif isinstance(value, (int, float)):
        parent[key] = value + rng.choice([-1, 1, 0.5, 1e-6])
    elif isinstance(value, str):
        parent[key] = rng.choice(
            ["../../victim.txt", "/etc/passwd", value + "x", value[:-1], "", "edits/000002.safetensors"]
        )
    else:
        parent[key] = rng.choice([[], {}, 7, "x"])
    return obj


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    """A ledger of two ROME edits on the tiny GPT-2 and the weights its rebuild gives."""
    root = tmp_path_factory.mktemp("mutations")
    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    cfg = configure(["edit.v.steps=2", "edit.generate_tokens=0", "edit.verify.enabled=false"])
    clean = loaded.spec.down_proj_weight(loaded.model, 2).detach().clone()
    editor = RomeEditor("rome", loaded.model, loaded.tokenizer, loaded.spec, cfg.edit, 2, ["{}"], KeySolver(None))
    ledger = Ledger.open(root / "ledger", loaded.identity, "float32")
    torch.manual_seed(0)
    for edit in editor.edit(parse_requests(REQUESTS)):
        editor.record(edit, ledger, loaded.identity)
    with torch.no_grad():
        loaded.spec.down_proj_weight(loaded.model, 2).copy_(clean)
    return root, loaded, clean


def rebuilt(directory: Path, loaded, clean) -> torch.Tensor:
    weight = loaded.spec.down_proj_weight(loaded.model, 2)
    with torch.no_grad():
        weight.copy_(clean)
    try:
        Ledger.open(directory, create=False).rebuild(loaded.model, loaded.spec)
        return weight.detach().clone()
    finally:
        with torch.no_grad():
            weight.copy_(clean)


def test_mutated_ledgers_refuse_or_rebuild_the_same_weights(world, tmp_path):
    root, loaded, clean = world
    expected = rebuilt(root / "ledger", loaded, clean)
    assert not torch.equal(expected, clean)
    rng = random.Random(SEED)
    outcomes = {"refused": 0, "same": 0}
    for i in range(120):
        work = tmp_path / f"m{i}"
        shutil.copytree(root / "ledger", work)
        target = rng.choice(
            ["ledger.json", "ledger.json", "ledger.json", "edits/000001.safetensors", "edits/000002.safetensors"]
        )
        path = work / target
        if target == "ledger.json" and rng.random() < 0.6:
            path.write_text(json.dumps(json_mutation(json.loads(path.read_text()), rng)))
        else:
            path.write_bytes(byte_mutations(path.read_bytes(), rng))
        try:
            got = rebuilt(work, loaded, clean)
        except UserError:
            outcomes["refused"] += 1
            continue
        assert torch.equal(got, expected), f"mutation {i} of {target} changed the weights without an error"
        outcomes["same"] += 1
        shutil.rmtree(work)
    assert outcomes["refused"] >= 60 and sum(outcomes.values()) == 120, outcomes
    assert torch.equal(loaded.spec.down_proj_weight(loaded.model, 2), clean)


def test_mutated_statistics_refuse_or_load_the_same(tmp_path):
    from rome.pipeline.stats.store import StatsEntry, StatsKey

    key = StatsKey(
        model={"name": "m", "revision": "r"},
        model_dtype="float32",
        dataset={"files": {"a": "1"}},
        max_length=64,
        tokens=100,
        dtype="float64",
        product="fp32",
    )
    entry = StatsEntry(tmp_path / "entry", key)
    c = torch.randn(8, 8, dtype=torch.float64)
    entry.save(2, "m.layer.2", c @ c.T * 100, 100)
    want = StatsEntry(tmp_path / "entry", owned=False).load(2, "m.layer.2").second_moment
    (tmp_path / "victim.txt").write_text("keep")
    rng = random.Random(SEED + 1)
    refused = 0
    for i in range(50):
        work = tmp_path / f"s{i}"
        shutil.copytree(tmp_path / "entry", work)
        target = work / rng.choice(["manifest.json", "manifest.json", "layer_2.safetensors"])
        if target.name == "manifest.json" and rng.random() < 0.7:
            target.write_text(json.dumps(json_mutation(json.loads(target.read_text()), rng)))
        else:
            target.write_bytes(byte_mutations(target.read_bytes(), rng))
        try:
            got = StatsEntry(work, owned=False).load(2, "m.layer.2")
        except UserError:
            refused += 1
            continue
        assert got is None or torch.equal(got.second_moment, want), f"statistics mutation {i} loaded other values"
    assert refused >= 25 and (tmp_path / "victim.txt").read_text() == "keep"


def test_mutated_partial_statistics_restart_or_resume_the_same(tmp_path):
    from rome.modules.second_moment import PartialStats

    run = {"format": 2, "key": "k", "layers": [2]}
    state = {"count": 10, "sums": {2: torch.eye(4, dtype=torch.float64)}, "shards": {0: {"texts": 3}}}
    rng = random.Random(SEED + 2)
    for i in range(30):
        partial = PartialStats(tmp_path / f"p{i}", run)
        partial.save(0, state)
        target = rng.choice([partial.path(0), partial.checksum_path(0)])
        target.write_bytes(byte_mutations(target.read_bytes(), rng))
        try:
            got = PartialStats(tmp_path / f"p{i}", run).load(0)
        except UserError:
            continue
        assert got is None or (got["count"] == 10 and torch.equal(got["sums"][2], state["sums"][2])), i


def test_mutated_request_files_refuse_or_parse(tmp_path):
    text = json.dumps(REQUESTS)
    rng = random.Random(SEED + 3)
    for i in range(20):
        path = tmp_path / f"r{i}.json"
        if rng.random() < 0.5:
            path.write_text(json.dumps(json_mutation(json.loads(text), rng)))
        else:
            path.write_bytes(byte_mutations(text.encode(), rng))
        try:
            requests = parse_requests(str(path))
        except UserError:
            continue
        assert requests and all(r.subject and r.target_new and "{}" in r.prompt for r in requests), i
