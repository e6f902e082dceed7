"""Hostile inputs at the boundary: a path in a manifest that points outside its directory, a full disk (too
little free space before a write, and a library that reports ENOSPC its own way). Each gets one error line and
exit code 2, and leaves the user's files, the statistics and the ledger as they were."""

from __future__ import annotations

import json
import os
import shutil
from collections import namedtuple

import pytest
from conftest import OFFLINE, tiny_edit_args
from conftest import main_in_process as main

from rome.pipeline.core.paths import contained
from rome.pipeline.errors import UserError

EIFFEL = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}


@pytest.fixture(scope="module")
def env(tiny_model_dir, small_wiki, tmp_path_factory):
    shared = tmp_path_factory.mktemp("reliability")
    return shared, tiny_edit_args(tiny_model_dir("gpt2"), small_wiki, shared, v_steps=2)


def test_contained_refuses_every_way_out(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ok.safetensors").write_text("x")
    os.symlink(tmp_path / "victim.txt", tmp_path / "d" / "link")
    assert contained(tmp_path / "d", "ok.safetensors", "m.json") == (tmp_path / "d" / "ok.safetensors").resolve()
    for bad in ("../victim.txt", "../../etc/passwd", "/etc/passwd", "", ".", "sub/../../x", "link", None, 6, "a\x00b"):
        with pytest.raises(UserError, match="m.json names the file"):
            contained(tmp_path / "d", bad, "m.json")


def test_a_manifest_pointing_outside_its_directory_deletes_nothing(env, tmp_path):
    shared, args = env
    code, _, errors = main("stage=stats", *args, "stats.layers=[2]")
    assert code == 0, errors
    (manifest,) = (shared / "stats").glob("*/manifest.json")
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    data = json.loads(manifest.read_text())
    rel = os.path.relpath(victim, manifest.parent)
    data["layers"]["2"]["file"] = rel  # "../../.../victim.txt"
    manifest.write_text(json.dumps(data))
    code, _, errors = main("stage=edit", *args, f"request={json.dumps(EIFFEL)}", f"edit.out={tmp_path / 'l'}")
    assert code == 2 and len(errors) == 1 and "outside" in errors[0] and "nothing was read or removed" in errors[0]
    assert victim.read_text() == "the user's file"
    assert not (tmp_path / "l").exists()  # no ledger for an edit that never happened
    shutil.rmtree(manifest.parent)  # the other tests recompute


def test_too_little_free_space_for_the_model_is_refused_before_writing(env, tmp_path, monkeypatch):
    _, args = env
    ledger, saved = tmp_path / "ledger", tmp_path / "saved"
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage

    def small_disk(path):  # 1 MiB free where the model goes, the truth elsewhere
        return usage(2**30, 2**30 - 2**20, 2**20) if str(path).startswith(str(tmp_path)) else real(path)

    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    code, _, errors = main(
        "stage=edit", *args, f"request={json.dumps(EIFFEL)}", f"edit.out={ledger}", f"edit.save_to={saved}"
    )
    assert code == 2 and len(errors) == 1, errors
    assert "MiB free" in errors[0] and "nothing was edited" in errors[0]
    assert not saved.exists() and not ledger.exists()  # refused before any edit: no ledger either


def test_a_full_disk_reported_by_safetensors_is_one_line(env, tmp_path, monkeypatch):
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    _, args = env

    def full(self, *a, **k):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    ledger, saved = tmp_path / "ledger", tmp_path / "saved"
    code, _, errors = main(
        "stage=edit", *args, f"request={json.dumps(EIFFEL)}", f"edit.out={ledger}", f"edit.save_to={saved}"
    )
    assert code == 2 and len(errors) == 1 and "no space left on device" in errors[0], errors
    assert not saved.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".saved")]
    assert json.loads((ledger / "ledger.json").read_text())["entries"] == []  # not recorded: it was not saved


def test_a_full_disk_anywhere_else_is_one_line_at_the_boundary(env, tmp_path, monkeypatch):
    import errno

    import rome.recipes.stats

    _, args = env

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(rome.recipes.stats, "run", full)
    code, _, errors = main("stage=stats", *args)
    assert code == 2 and errors == [
        "error: no space left on device (No space left on device); free some space and run the same command "
        "(finished work is kept; nothing was left half-written)"
    ]


def _stats_stopped_by_two_ctrl_c(model_dir, tmp_path, second_after: str) -> tuple[int, list[str]]:
    """A statistics pass given Ctrl+C at its first checkpoint and again once a line starting with
    ``second_after`` is printed; returns the exit code and the lines printed."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    from conftest import ROOT, WIKI

    args = [
        "stage=stats",
        f"model.name={model_dir}",
        f"data.files={WIKI}",
        f"stats.dir={tmp_path}",
        "data.max_length=24",
        "data.batch_tokens=48",
        "data.sort_window=16",
        "trainer.accelerator=cpu",
        "stats.layers=[2]",
        "stats.tokens=200000",
        "stats.checkpoint_every_batches=20",
    ]
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **OFFLINE},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in p.stdout), daemon=True)
    reader.start()
    deadline, sent = time.monotonic() + 300, 0
    while p.poll() is None and time.monotonic() < deadline:
        if sent == 0 and list(tmp_path.glob("*/partial/rank0.pt")):
            os.killpg(p.pid, signal.SIGINT)
            sent = 1
        elif sent == 1 and any(line.startswith(second_after) for line in lines):
            try:
                os.killpg(p.pid, signal.SIGINT)
            except ProcessLookupError:  # it had already exited
                pass
            sent = 2
        time.sleep(0.002)
    p.wait(timeout=60)
    reader.join(timeout=10)
    return p.returncode, lines


@pytest.mark.slow
@pytest.mark.parametrize("second_after", ["received SIGINT", "interrupted:"])
def test_a_second_ctrl_c_stops_at_once_with_one_line_and_exit_130(tiny_model_dir, tmp_path, second_after):
    """Ctrl+C twice during a statistics pass: the first asks for a stop after the batch, the second stops at once
    (Lightning turns it into its own exit); the user gets one `interrupted:` line and 130, no traceback. A second
    Ctrl+C that comes while the stopped process is already on its way out (after its `interrupted:` line) is
    ignored: no traceback from a finaliser that the interrupt would otherwise land in."""
    code, lines = _stats_stopped_by_two_ctrl_c(tiny_model_dir("gpt2"), tmp_path, second_after)
    interrupted = [line for line in lines if line.startswith("interrupted:")]
    # the first stop may have finished its batch before the second Ctrl+C came: then it is the ordinary stop
    assert code == 130 and len(interrupted) == 1, lines[-20:]
    assert not any("Traceback" in line for line in lines), lines[-30:]


def test_inputs_that_can_be_judged_before_work_are(env):
    from conftest import DATA

    _, args = env
    code, _, errors = main("stage=trace", *args, "trace.kinds=[hidden]", f"trace.dataset={DATA / 'known_1000.json'}")
    assert code == 2 and len(errors) == 1 and "trace.dataset needs the mlp kind" in errors[0]
    code, _, errors = main("stage=stats", *args, "stats.layers=[]")
    assert code == 2 and errors == [
        "error: stats.layers is empty: name the layers to collect, e.g. stats.layers=[6] (the default is the "
        "model's edit layer)"
    ]


def test_a_directory_lock_refuses_a_second_writer_and_takes_over_from_a_dead_one(tmp_path, capsys):
    from rome.pipeline.core.locks import LOCK_FILE, DirectoryLock

    target = tmp_path / "ledger"
    with DirectoryLock(target, "edit.out"):
        with pytest.raises(UserError, match=rf"edit.out={target} is in use by another run \(pid {os.getpid()} on "):
            DirectoryLock(target, "edit.out").acquire()
    assert not target.exists()  # it made the directory and nothing else was written: it leaves none
    target.mkdir()
    (target / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename, "since": "then"}))
    with DirectoryLock(target, "edit.out") as lock:
        assert lock.owner()["pid"] == os.getpid()
    assert "taking over the lock of a run that ended without releasing it (pid 4206649" in capsys.readouterr().err
    assert (target / LOCK_FILE).read_text() == ""  # released: no owner left


def test_two_runs_on_one_ledger_or_one_statistics_entry_one_is_refused(env, tmp_path):
    from rome.pipeline.core.locks import DirectoryLock

    shared, args = env
    ledger = tmp_path / "ledger"
    code, _, errors = main("stage=edit", *args, f"request={json.dumps(EIFFEL)}", f"edit.out={ledger}")
    assert code == 0, errors
    before = (ledger / "ledger.json").read_text()
    with DirectoryLock(ledger, "edit.out"):  # another run is writing this ledger
        code, _, errors = main("stage=edit", *args, f"request={json.dumps(EIFFEL)}", f"edit.out={ledger}")
        assert code == 2 and len(errors) == 1 and "is in use by another run" in errors[0], errors
        code, _, errors = main("stage=revert", f"ledger={ledger}", "edit_id=1", f"edit.save_to={tmp_path / 's'}")
        assert code == 2 and "is in use by another run" in errors[0], errors
    assert (ledger / "ledger.json").read_text() == before  # nothing lost, nothing added
    stats = tmp_path / "stats"
    code, _, errors = main("stage=stats", *args, f"stats.dir={stats}", "stats.layers=[1]")
    assert code == 0, errors
    (entry,) = [p.parent for p in stats.glob("*/manifest.json")]
    with DirectoryLock(entry, "stats.dir entry"):  # a run computing layer 2 into the same entry
        code, _, errors = main("stage=stats", *args, f"stats.dir={stats}", "stats.layers=[2]")
    assert code == 2 and "stats.dir entry=" in errors[0] and "is in use by another run" in errors[0], errors


def test_output_directories_of_the_users_are_refused_before_any_work(env, tmp_path):
    from rome.pipeline.core.outputs import OUTPUT_MARKER

    _, args = env
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text('{"my": "results"}')
    (mine / "table.md").write_text("| mine |")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    fact = ["prompt={} is located in the city of", "subject=The Eiffel Tower", "trace.samples=2", "trace.plots=false"]
    for stage, key in (("trace", "trace.out"), ("stats", "stats.dir")):
        extra = fact if stage == "trace" else ["stats.layers=[1]"]
        code, _, errors = main(f"stage={stage}", *args, *extra, f"{key}={mine}")
        assert code == 2 and len(errors) == 1, errors
        assert f"{key}={mine} is not empty and was not written by this project" in errors[0]
        assert "summary.json, table.md" in errors[0] and "Nothing was touched" in errors[0]
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    # a new directory is made and marked; the same command then writes into it again
    out = tmp_path / "trace"
    for _ in range(2):
        code, _, errors = main("stage=trace", *args, *fact, f"trace.out={out}")
        assert code == 0, errors
    assert json.loads((out / OUTPUT_MARKER).read_text())["what"] == "trace.out"


def test_damaged_partial_statistics_are_never_resumed(tmp_path, capsys):
    import torch

    from rome.modules.second_moment import PartialStats

    run = {"format": 2, "key": "k", "layers": [2]}
    partial = PartialStats(tmp_path / "partial", run)
    state = {"count": 10, "sums": {2: torch.eye(3, dtype=torch.float64)}, "shards": {0: {"texts": 3}}}
    partial.save(0, state)
    assert PartialStats(tmp_path / "partial", run).load(0)["count"] == 10  # intact: resumed
    data = bytearray(partial.path(0).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4] = bytes(4 * [0xFF])  # 4 bytes flipped inside the tensor data
    partial.path(0).write_bytes(bytes(data))
    assert PartialStats(tmp_path / "partial", run).load(0) is None  # from zero, never from damaged sums
    assert "fails its checksum (damaged): removed; this rank starts again from zero" in capsys.readouterr().err
    assert not partial.path(0).exists() and not partial.checksum_path(0).exists()
    partial.save(0, state)
    partial.checksum_path(0).unlink()  # a state whose checksum never got written (a crash between the two)
    assert PartialStats(tmp_path / "partial", run).load(0) is None
    assert "has no checksum" in capsys.readouterr().err


def test_a_damaged_templates_cache_is_sampled_again(tiny_model_dir, tmp_path, capsys):
    from rome.pipeline.core.loading import configure, load_model
    from rome.pipeline.editors.templates import context_templates

    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    hp = configure([]).edit.templates
    capsys.readouterr()
    first = context_templates(loaded.model, loaded.tokenizer, loaded.identity, hp, tmp_path, seed=0)
    (path,) = (tmp_path / "templates").glob("*.json")
    capsys.readouterr()
    assert context_templates(loaded.model, loaded.tokenizer, loaded.identity, hp, tmp_path, seed=0) == first
    assert "damaged" not in capsys.readouterr().err  # read from the cache
    for damage in (path.read_bytes()[:40], b"\xff\xfe not utf-8", b'{"templates": ["no placeholder"]}'):
        path.write_bytes(damage)
        assert context_templates(loaded.model, loaded.tokenizer, loaded.identity, hp, tmp_path, seed=0) == first
        assert "is damaged" in capsys.readouterr().err
        assert json.loads(path.read_text())["templates"] == first  # rewritten whole


def test_eval_out_of_the_user_is_refused_and_eval_n_past_the_data_is_said(env, tmp_path, capsys):
    from conftest import DATA

    _, args = env
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("mine")
    cf = DATA / "counterfact" / "counterfact-edit.json"
    for mode in ("case", "sequential"):
        code, _, errors = main(
            "stage=eval",
            *args,
            f"eval.mode={mode}",
            f"eval.dataset={cf}",
            f"eval.out={mine}",
            "eval.methods=[none]",
            "eval.n=2",
        )
        assert code == 2 and len(errors) == 1 and f"eval.out={mine} is not empty and was not written" in errors[0]
    assert [p.name for p in mine.iterdir()] == ["notes.md"]
    two = tmp_path / "two.json"
    two.write_text(json.dumps(json.loads(cf.read_text())[:2]))
    from rome import cli

    capsys.readouterr()
    argv = ["stage=eval", *args, f"eval.dataset={two}", f"eval.out={tmp_path / 'e'}", "eval.methods=[none]"]
    assert cli.main([*argv, "eval.n=50", "eval.generation.tokens=0"]) == 0
    assert "note: eval.n=50 from record 0 asks for more than" in capsys.readouterr().err  # said before any work
    code, _, errors = main(
        "stage=eval",
        *args,
        f"eval.dataset={two}",
        f"eval.out={tmp_path / 'e2'}",
        "eval.methods=[none]",
        "eval.n=50",
        "eval.start=5",
    )
    assert code == 2 and "eval.start=5 is past the end" in errors[0]
