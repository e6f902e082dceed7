import json

import pytest
import torch

from pipeline.errors import UserError
from pipeline.second_moment import StatsCache, StatsKey, accumulate_second_moment


def key(**kw):
    base = dict(model={"name": "m", "revision": "r"}, model_dtype="float32", dataset={"files": {"a": "1"}},
                max_length=16, tokens=100, dtype="float64")
    return StatsKey(**{**base, **kw})


def test_accumulate_is_sum_of_outer_products():
    torch.manual_seed(0)
    k = torch.randn(50, 8)
    total = torch.zeros(8, 8, dtype=torch.float64)
    accumulate_second_moment(total, k[:20])
    accumulate_second_moment(total, k[20:])
    expect = sum(torch.outer(r.double(), r.double()) for r in k)
    torch.testing.assert_close(total, expect)


def test_cache_round_trip_and_keys(tmp_path):
    cache = StatsCache(tmp_path)
    total = torch.eye(4, dtype=torch.float64) * 10
    path = cache.save(key(), 3, "blocks.3.mlp", total, 5)
    got = cache.load(key(), 3, "blocks.3.mlp")
    assert got.count == 5 and torch.equal(got.second_moment, total / 5) and got.path == path
    assert cache.load(key(), 4, "blocks.4.mlp") is None  # another layer: absent
    assert cache.load(key(tokens=200), 3, "blocks.3.mlp") is None  # another budget: another entry
    assert cache.entry_dir(key()) != cache.entry_dir(key(model={"name": "m", "revision": "s"}))
    with pytest.raises(UserError, match="module"):
        cache.load(key(), 3, "other.module")
    manifest = json.loads((cache.entry_dir(key()) / "manifest.json").read_text())
    assert manifest["key"]["dataset"] == {"files": {"a": "1"}} and manifest["layers"]["3"]["tokens"] == 5


def test_corrupt_file_is_reported_and_removed(tmp_path):
    cache = StatsCache(tmp_path)
    path = cache.save(key(), 3, "m3", torch.eye(4, dtype=torch.float64), 5)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt.*removed"):
        cache.load(key(), 3, "m3")
    assert not path.exists() and cache.load(key(), 3, "m3") is None
    assert not list(tmp_path.rglob("*.tmp"))


def test_manifest_for_other_key_is_refused(tmp_path):
    cache = StatsCache(tmp_path)
    cache.save(key(), 3, "m3", torch.eye(4, dtype=torch.float64), 5)
    manifest = cache.entry_dir(key()) / "manifest.json"
    m = json.loads(manifest.read_text())
    m["key"]["tokens"] = 7
    manifest.write_text(json.dumps(m))
    with pytest.raises(UserError, match="another model"):
        cache.load(key(), 3, "m3")
