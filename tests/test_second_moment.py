import json

import pytest
import torch

from rome.pipeline.errors import UserError
from rome.pipeline.stats.second_moment import accumulate_second_moment
from rome.pipeline.stats.store import StatsCache, StatsKey


def key(**kw):
    base = dict(
        model={"name": "m", "revision": "r"},
        model_dtype="float32",
        dataset={"files": {"a": "1"}},
        max_length=16,
        tokens=100,
        dtype="float64",
    )
    return StatsKey(**{**base, **kw})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulate_is_sum_of_outer_products_within_the_precision_budget(dtype):
    torch.manual_seed(0)
    k = (torch.randn(20000, 48) * torch.rand(48) * 3).to(dtype)  # uneven scales, as real keys have
    expect = sum(torch.outer(r.double(), r.double()) for r in k[:300])
    exact, fast = (torch.zeros(48, 48, dtype=torch.float64) for _ in range(2))
    for part in (k[:120], k[120:300]):
        accumulate_second_moment(exact, part, "exact")
        accumulate_second_moment(fast, part, "fp32")
    torch.testing.assert_close(exact, expect, rtol=1e-13, atol=0)  # float64 products of float32 keys: exact
    assert float((fast - exact).norm() / exact.norm()) < 1e-6
    # a long batch is split into float32 products of PRODUCT_TOKENS keys: the budget holds at any length
    exact.zero_(), fast.zero_()
    accumulate_second_moment(exact, k, "exact")
    accumulate_second_moment(fast, k, "fp32")
    assert float((fast - exact).norm() / exact.norm()) < 1e-6


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


def test_saving_in_place_writes_the_same_bytes_without_a_second_buffer(tmp_path):
    """The stats stage hands its sums over (``in_place=True``): C is divided in them, bit for bit the C and the
    file of the copying path, and no second d x d tensor is made (the saved C is the caller's storage)."""
    from rome.pipeline.stats.store import StatsEntry

    torch.manual_seed(0)
    keys = torch.randn(300, 6, dtype=torch.float64)
    total = keys.T @ keys
    copied = StatsEntry(tmp_path / "copy", key()).save(2, "m2", total, 300)
    assert torch.equal(total, keys.T @ keys)  # the copying path leaves the sums alone
    kept = total.data_ptr()
    in_place = StatsEntry(tmp_path / "in-place", key()).save(2, "m2", total, 300, in_place=True)
    assert in_place.second_moment.data_ptr() == kept and torch.equal(total, copied.second_moment)
    assert torch.equal(in_place.second_moment, copied.second_moment)
    assert in_place.path.read_bytes() == copied.path.read_bytes()
    with torch.inference_mode():
        made_in_inference = keys.T @ keys
    fallback = StatsEntry(tmp_path / "inference", key()).save(2, "m2", made_in_inference, 300, in_place=True)
    assert torch.equal(fallback.second_moment, copied.second_moment)  # such a tensor cannot change: copied


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


def test_convergence_readout_changes_and_hint():
    from rome.pipeline.stats.convergence import converged_hint, pick_probes, take_readout

    torch.manual_seed(0)
    keys = torch.randn(4096, 16) * torch.linspace(0.5, 2, 16)
    probes = pick_probes(keys, 4096, 4, seed=0)
    assert probes.shape == (4, 16) and torch.equal(probes, pick_probes(keys, 4096, 4, seed=0))
    total = torch.zeros(16, 16, dtype=torch.float64)
    accumulate_second_moment(total, keys[:8], "exact")
    first, point = take_readout(total, 8, probes, None)  # 8 keys: C is singular, u undefined
    assert first.solutions is None and point == {"tokens": 8, "c_change": None, "u_change": None}
    previous, points = first, [point]
    for n in (64, 128, 256, 512, 1024, 2048, 4096):
        total.zero_()
        accumulate_second_moment(total, keys[:n], "exact")
        c_before = previous.second_moment.double()  # the previous C as kept (float32)
        previous, point = take_readout(total, n, probes, previous)
        points.append(point)
        c = total / n
        assert point["c_change"] == pytest.approx(float((c - c_before).norm() / c.norm()), rel=1e-9)
    u_changes = [p["u_change"] for p in points[2:]]
    assert all(u is not None for u in u_changes) and u_changes[-1] < u_changes[0] / 4  # shrinks as tokens double
    assert (
        converged_hint({6: points}, threshold=1.0) is not None and converged_hint({6: points}, threshold=1e-9) is None
    )
    assert converged_hint({4: points, 6: points[:1]}, threshold=1.0) is None  # every layer must have converged
    assert "from 2,048 to 4,096 tokens" in converged_hint({6: points}, threshold=1.0)
