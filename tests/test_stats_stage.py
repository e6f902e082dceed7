"""The stats stage through its command line: correctness, DDP merge, bad input, the cache (stops and resumes:
tests/test_stats_signals.py)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, run_main
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rome.pipeline.core.atomic import write_tensors
from rome.pipeline.core.digest import file_sha256
from rome.pipeline.core.hooks import Trace, get_module

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def stats_args(model_dir, data, stats_dir, *extra):
    return (
        "stage=stats",
        f"model.name={model_dir}",
        f"data.files={data}",
        f"stats.dir={stats_dir}",
        "data.max_length=48",
        "data.batch_tokens=192",
        "trainer.accelerator=cpu",
        *extra,
    )


def layer_file(stats_dir: Path, layer: int) -> Path:
    (f,) = stats_dir.glob(f"*/layer_{layer}.safetensors")
    return f


def naive_second_moment(model_dir, texts, layer, max_length):
    """What the stage must equal: one text at a time, full forward, keys read by a hook."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    module = get_module(model, f"model.layers.{layer}.mlp.down_proj")
    total, n = 0, 0
    for text in texts:
        ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt").input_ids
        with torch.no_grad(), Trace(module, retain_input=True) as t:
            model(ids)
        k = t.input[0].double()
        total, n = total + k.T @ k, n + k.shape[0]
    return total / n, n


def test_stats_equal_naive_hook_reference(tiny_model_dir, small_wiki, tmp_path):
    model_dir = tiny_model_dir("llama")
    r = run_main(*stats_args(model_dir, small_wiki, tmp_path, "stats.layers=[1,2]", "stats.tokens=100000"), env=OFFLINE)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout and str(layer_file(tmp_path, 2)) in r.stdout
    texts = [json.loads(line)["text"] for line in open(small_wiki)]
    for layer in (1, 2):
        expect, n = naive_second_moment(model_dir, texts, layer, 48)
        got = load_file(layer_file(tmp_path, layer))
        assert int(got["count"]) == n  # the data ran out before the budget: every token counted once
        torch.testing.assert_close(got["second_moment"], expect, rtol=1e-5, atol=1e-7)
    manifest = json.loads(next(tmp_path.glob("*/manifest.json")).read_text())
    assert manifest["key"]["max_length"] == 48 and set(manifest["layers"]) == {"1", "2"}
    assert manifest["layers"]["1"]["module"] == "model.layers.1.mlp.down_proj"
    environment = manifest["layers"]["1"]["environment"]  # what computed C: versions, CPU, threads, processes
    assert environment["torch"] == torch.__version__ and environment["processes"] == 1 and environment["threads"] >= 1
    assert not list(tmp_path.rglob("partial")) and not list(tmp_path.rglob("*.tmp"))
    # the same command again finds everything in the cache
    again = run_main(
        *stats_args(model_dir, small_wiki, tmp_path, "stats.layers=[1,2]", "stats.tokens=100000"), env=OFFLINE
    )
    assert again.returncode == 0 and "tokens/s" not in again.stdout


def test_budget_is_exact(tiny_model_dir, small_wiki, tmp_path):
    r = run_main(
        *stats_args(
            tiny_model_dir("gpt2"),
            small_wiki,
            tmp_path,
            "stats.layers=[3]",
            "stats.tokens=777",
            "data.num_workers=2",
            "data.sort_window=8",
        ),
        env=OFFLINE,
    )  # 5 windows: both workers get some
    assert r.returncode == 0, r.stderr
    assert int(load_file(layer_file(tmp_path, 3))["count"]) == 777


def test_a_tensor_file_is_the_same_bytes_each_time(tmp_path):
    """The statistics, spectrum, ledger and progress files are checksummed, and the same C must give the same
    checksum: safetensors writes its metadata in a per-process random order (two keys: half the files differ),
    which write_tensors puts back in sorted order without moving a tensor."""
    c = torch.randn(6, 6, dtype=torch.float64)
    tensors = {"second_moment": c, "count": torch.tensor([12])}
    digests = set()
    for i in range(12):  # the metadata given in both orders
        metadata = {"module": "model.layers.4.mlp.down_proj", "layer": "4"}
        digest = write_tensors(
            tmp_path / f"{i}.safetensors", tensors, dict(reversed(metadata.items())) if i % 2 else metadata
        )
        assert digest == file_sha256(tmp_path / f"{i}.safetensors")
        digests.add(digest)
    assert len(digests) == 1
    with safe_open(tmp_path / "5.safetensors", "pt") as f:
        assert f.metadata() == {"layer": "4", "module": "model.layers.4.mlp.down_proj"}
        assert torch.equal(f.get_tensor("second_moment"), c) and int(f.get_tensor("count")) == 12
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tiny_model_dir, small_wiki, tmp_path):
    model_dir = tiny_model_dir("gpt2")
    common = ("stats.layers=[1,3]", "stats.tokens=1000000", "data.sort_window=6")  # 7 windows: both ranks get some
    one = run_cli(*stats_args(model_dir, small_wiki, tmp_path / "one", *common), env=OFFLINE)
    two = run_cli(
        *stats_args(model_dir, small_wiki, tmp_path / "two", *common, "trainer.devices=2", "trainer.strategy=ddp"),
        env=OFFLINE,
    )
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    for run in (one, two):  # Lightning quieted once the recipe imported it: no banners ("GPU available: False")
        assert "available:" not in run.stdout + run.stderr and "LOCAL_RANK" not in run.stdout + run.stderr
    for layer in (1, 3):
        a, b = load_file(layer_file(tmp_path / "one", layer)), load_file(layer_file(tmp_path / "two", layer))
        assert int(a["count"]) == int(b["count"]) > 0
        torch.testing.assert_close(a["second_moment"], b["second_moment"], rtol=1e-12, atol=1e-14)


def test_bad_input_one_line_error_exit_2_nothing_left(tiny_model_dir, small_wiki, tmp_path):
    model_dir = tiny_model_dir("gpt2")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = {
        "out of range": stats_args(model_dir, small_wiki, tmp_path / "s", "stats.layers=[9]"),
        "stats.tokens=0 must be positive": stats_args(
            model_dir, small_wiki, tmp_path / "s", "stats.layers=[1]", "stats.tokens=0"
        ),
        "is empty": stats_args(model_dir, empty, tmp_path / "s", "stats.layers=[1]"),
        "neither a local directory": stats_args("nobody/no-such-model", small_wiki, tmp_path / "s", "stats.layers=[1]"),
    }
    for expect, args in cases.items():
        r = run_main(*args, env=OFFLINE)
        assert r.returncode == 2, (expect, r.stderr)
        lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expect in lines[0], (expect, r.stderr)
        assert not (tmp_path / "s").exists() or not list((tmp_path / "s").rglob("*.safetensors"))


def test_corrupt_cache_file_errors_and_is_removed(tiny_model_dir, small_wiki, tmp_path):
    args = stats_args(tiny_model_dir("gpt2"), small_wiki, tmp_path, "stats.layers=[1]", "stats.tokens=500")
    assert run_main(*args, env=OFFLINE).returncode == 0
    f = layer_file(tmp_path, 1)
    f.write_bytes(f.read_bytes()[:-100])
    r = run_main(*args, env=OFFLINE)
    assert r.returncode == 2 and "corrupt" in r.stderr and "removed" in r.stderr
    assert not f.exists()
    assert run_main(*args, env=OFFLINE).returncode == 0 and f.exists()  # the same command recomputes


def test_clearing_partial_state_removes_a_save_cut_by_a_kill(tmp_path):
    from rome.modules.second_moment import PartialStats

    partial = PartialStats(tmp_path / "partial", {"run": 1})
    partial.save(0, {"count": 3})
    (tmp_path / "partial" / ".rank0.pt.abc123.tmp").write_bytes(b"half a save")  # what SIGKILL mid-save leaves
    partial.clear()
    assert not (tmp_path / "partial").exists()
