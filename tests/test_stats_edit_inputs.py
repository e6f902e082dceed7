"""Statistics as an edit finds them: any directory with a valid manifest and checksums (copied, read-only),
one-line errors for the wrong directory, the shortfall of data that ran out (recorded and warned about),
and a one-line error naming the fixes when C cannot be factorised."""

import json
import shutil

import pytest
import torch

from rome.modules.statistics import collect, second_moment
from rome.pipeline.core.loading import configure, load_model
from rome.pipeline.editors.rank_one import KeySolver
from rome.pipeline.errors import UserError
from rome.pipeline.stats.store import load_explicit


@pytest.fixture(scope="module")
def made(tiny_model_dir, small_wiki, tmp_path_factory):
    """Statistics of layers 1 and 2 of the tiny gpt2, computed in-process by the stage's own code; the
    40 articles hold fewer tokens than the budget asked for."""
    root = tmp_path_factory.mktemp("stats")
    cfg = configure(
        [
            f"model.name={tiny_model_dir('gpt2')}",
            f"data.files={small_wiki}",
            f"stats.dir={root}",
            "data.max_length=48",
            "data.batch_tokens=192",
            "trainer.accelerator=cpu",
            "stats.tokens=100000",
            "stats.convergence.first_tokens=256",
        ]
    )
    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    stats = collect(cfg, loaded, [1, 2])
    (entry,) = root.glob("*/manifest.json")
    return cfg, loaded, stats, entry.parent


def test_shortfall_is_recorded_and_warned_at_edit_time(made, capsys):
    cfg, loaded, stats, entry = made
    manifest = json.loads((entry / "manifest.json").read_text())
    count = stats[1].count
    for layer in ("1", "2"):
        assert manifest["layers"][layer]["data_ran_out"] is True
        assert manifest["layers"][layer]["shortfall"] == 100000 - count > 0
    # the convergence readout: one point per doubling, plotted beside the statistics
    points = manifest["layers"]["1"]["convergence"]["points"]
    assert [p["tokens"] for p in points][:2] == sorted(p["tokens"] for p in points)[:2] and len(points) >= 3
    assert points[0]["c_change"] is None and all(p["c_change"] > 0 for p in points[1:])
    assert (entry / "convergence.png").stat().st_size > 1000
    capsys.readouterr()
    c, identity = second_moment(cfg, loaded, 1)  # what the edit stage calls
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and f"hold {count:,} tokens" in warning[0] and "stats.tokens=100,000" in warning[0]
    assert "data.files" in warning[0] and identity["tokens"] == count
    # the pass's sums became C in place (no second buffer): normal tensors, equal to the file read back
    assert not stats[1].second_moment.is_inference() and torch.equal(stats[1].second_moment, c)


def test_any_directory_with_a_valid_manifest_is_accepted(made, tmp_path):
    cfg, loaded, stats, entry = made
    copy = tmp_path / "shared copy"
    shutil.copytree(entry, copy)
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in copy.iterdir()}
    for p in [copy, *copy.iterdir()]:  # a read-only archive: nothing may be written there
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        got = load_explicit(copy, loaded, 2)
        assert torch.equal(got.second_moment, stats[2].second_moment) and got.count == stats[2].count
        c, _ = second_moment(configure([*_overrides(cfg), f"edit.stats={copy}"]), loaded, 2)
        assert torch.equal(c, stats[2].second_moment)
        assert {
            p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in copy.iterdir()
        } == before  # (root could write)
    finally:
        for p in [copy, *copy.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def _overrides(cfg):
    return [f"model.name={cfg.model.name}", f"data.files={cfg.data.files}", f"stats.dir={cfg.stats.dir}"]


def test_wrong_directories_get_one_line_that_says_what_is_wrong(made, tmp_path, tiny_model_dir):
    cfg, loaded, stats, entry = made
    cases = {
        tmp_path / "nowhere": "is not a directory",
        tmp_path: "has no manifest.json",
        entry.parent: "it holds statistics directories",  # the cache root, one level too high
    }
    for directory, message in cases.items():
        with pytest.raises(UserError, match=message):
            load_explicit(directory, loaded, 1)
    with pytest.raises(UserError, match=r"no statistics for layer 3 \(it has layers: 1, 2\)"):
        load_explicit(entry, loaded, 3)
    other = load_model(str(tiny_model_dir("llama")), device="cpu")
    with pytest.raises(UserError, match="are for model .*tiny-gpt2.*run stage=stats for this model"):
        load_explicit(entry, other, 1)
    # a damaged file in the user's directory is reported, never removed
    copy = tmp_path / "copy"
    shutil.copytree(entry, copy)
    data = bytearray((copy / "layer_1.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (copy / "layer_1.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt .*copy it again"):
        load_explicit(copy, loaded, 1)
    assert (copy / "layer_1.safetensors").exists()
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="is not a statistics manifest"):
        load_explicit(copy, loaded, 1)
    assert (copy / "manifest.json").exists()


def test_a_singular_c_says_to_raise_the_tokens_or_set_a_ridge():
    k = torch.randn(5, 16, dtype=torch.float64)
    c = k.T @ k / 5  # rank 5 of 16: fewer keys than dimensions
    with pytest.raises(UserError, match=r"stats\.tokens.*edit\.ridge"):
        KeySolver(c)
    KeySolver(c, ridge=1e-4)  # the ridge makes it solvable


@pytest.mark.parametrize(
    "override,message",
    [
        ("stats.dtype=int8", "stats.dtype=int8 is not one of float64, float32"),
        ("stats.product=tf32", "stats.product=tf32 is not one of fp32, exact"),
    ],
)
def test_bad_stats_settings_name_their_key(override, message):
    from types import SimpleNamespace

    from rome.pipeline.stats.store import stats_key

    with pytest.raises(UserError, match=message):  # when the configuration is composed, or at the latest here
        stats_key(configure([override]), SimpleNamespace(identity={"name": "m", "revision": "r"}))


def test_batch_tokens_by_device():
    from rome.pipeline.stats.store import batch_tokens

    assert batch_tokens(configure([]), "cpu") == 4096 and batch_tokens(configure([]), "cuda") == 32768
    assert batch_tokens(configure(["data.batch_tokens=256"]), "cuda") == 256
    with pytest.raises(UserError, match="data.batch_tokens=lots"):
        batch_tokens(configure(["data.batch_tokens=lots"]), "cpu")
