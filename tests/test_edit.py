"""ROME's update on tiny random models: the algebra, the fast loss, the CLI, revert and bad input; the
user's files never touched, checksummed ledgers, per-run ledger directories, and stopping on signals."""

import json
import os
import signal
import stat

import pytest
import torch
from conftest import FAMILIES, OFFLINE, check_fast_value_loss, run_main, signal_run, tiny_edit_args
from conftest import main_in_process as main
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rome.pipeline.core.hooks import get_module
from rome.pipeline.core.loading import configure, load_model
from rome.pipeline.core.requests import parse_requests
from rome.pipeline.editors import rome

TEMPLATES = ["{}", "The cat sat on the mat. {}", "Therefore we went home. {}"]
EIFFEL = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}


def random_spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 4 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (4 * d)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_update_writes_v_star_is_rank_one_and_spares_orthogonal_keys(tiny_model_dir, family):
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    spec, layer = loaded.spec, 2
    c = random_spd(spec.key_size(loaded.model, layer))
    module = get_module(loaded.model, spec.down_proj_name(layer))
    w_before = spec.down_proj_matrix(loaded.model, layer).detach().clone()
    hp = configure(["edit.generate_tokens=0"]).edit
    job = rome.edit(
        loaded.model, loaded.tokenizer, EIFFEL, layer=layer, second_moment=c, hparams=hp, templates=TEMPLATES
    )
    assert job.status in ("applied", "rolled_back")
    if job.status == "rolled_back":  # a random model may fail verification; redo without checks
        hp = configure(["edit.generate_tokens=0", "edit.verify.enabled=false"]).edit
        job = rome.edit(
            loaded.model,
            loaded.tokenizer,
            parse_requests(EIFFEL)[0],
            layer=layer,
            second_moment=c,
            hparams=hp,
            templates=TEMPLATES,
        )
    w_after = spec.down_proj_matrix(loaded.model, layer).detach()
    delta_w = (w_after - w_before).double()
    # W' k* = v* (bias excluded), to 1e-5 relative
    bias = module.bias.detach().double() if getattr(module, "bias", None) is not None else 0
    v_star = job.v0.double() + job.delta.double() - bias
    got = w_after.double() @ job.k_star.double()
    assert float((got - v_star).norm() / v_star.norm()) < 1e-5
    # rank one: one singular value carries everything
    s = torch.linalg.svdvals(delta_w)
    assert s[0] > 0 and float(s[1] / s[0]) < 1e-5
    # a key k with kᵀ C⁻¹ k* = 0 gives the same output as before
    u = torch.linalg.solve(c, job.k_star.double())
    k = torch.randn(u.shape[0], dtype=torch.float64)
    k = k - (k @ u) / (u @ u) * u
    assert abs(float(k @ u)) < 1e-9
    out_before = w_before.double() @ k
    out_after = w_after.double() @ k
    assert float((out_after - out_before).norm() / out_before.norm()) < 1e-5
    # and through the module itself (in its own orientation, Conv1D or Linear)
    with torch.no_grad():
        y = module(k.float()[None])[0].double() - bias
    torch.testing.assert_close(y, out_after, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_value_loss_equals_full_forward_reference(tiny_model_dir, family):
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    fast0, fast = check_fast_value_loss(loaded, layer=1, delta_scale=0.5, v0_norm=3.0, atol=1e-6)
    assert float(fast.kl) > 0 and abs(float(fast.nll - fast0.nll)) > 1e-3
    model, spec = loaded.model, loaded.spec
    if getattr(model.config, "final_logit_softcapping", None):  # the soft-cap matters: the bare head is off
        h = torch.randn(4, model.config.hidden_size)
        bare = torch.log_softmax(get_module(model, spec.lm_head)(h), -1)
        assert float((bare - torch.log_softmax(spec.logits(model, h), -1)).abs().max()) > 0.1


def edit_args(model_dir, data, tmp, *extra):
    return [
        "stage=edit",
        f"model.name={model_dir}",
        f"data.files={data}",
        f"stats.dir={tmp / 'stats'}",
        f"model.cache_dir={tmp / 'cache'}",
        "stats.tokens=2000",
        "data.max_length=64",
        "data.batch_tokens=256",
        "edit.layer=2",
        "edit.verify.enabled=false",
        "trainer.accelerator=cpu",
        "model.device=cpu",
        "edit.generate_tokens=4",
        *extra,
    ]


def edit_cli(model_dir, data, tmp, *extra):
    return run_main(*edit_args(model_dir, data, tmp, *extra), env=OFFLINE)


def weights(d):
    return load_file(next(d.glob("*.safetensors")))


def test_sequential_edits_ledger_and_bitwise_revert(tiny_model_dir, small_wiki, tmp_path):
    base = tiny_model_dir("gpt2")
    out, m1, m2 = tmp_path / "ledger", tmp_path / "m1", tmp_path / "m2"
    r1 = edit_cli(base, small_wiki, tmp_path, f"request={json.dumps(EIFFEL)}", f"edit.out={out}", f"edit.save_to={m1}")
    assert r1.returncode == 0, r1.stderr
    assert "P(new) after" in r1.stdout and "before:" in r1.stdout and "keys" in r1.stdout
    second = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}
    r2 = edit_cli(base, small_wiki, tmp_path, f"request={json.dumps(second)}", f"edit.out={out}", f"edit.save_to={m2}")
    assert r2.returncode == 0, r2.stderr
    assert "re-applying 1 earlier edit" in r2.stdout
    ledger = json.loads((out / "ledger.json").read_text())
    assert [e["status"] for e in ledger["entries"]] == ["applied", "applied"]
    e = ledger["entries"][0]
    assert e["module"] == "transformer.h.2.mlp.c_proj" and e["conv1d"] is True and e["stats"]["tokens"] == 2000
    assert {"pre", "keys", "v_star", "solve", "apply", "verify", "ledger"} <= set(e["timings"])
    assert set(load_file(out / e["file"])) == {"u", "lam"}
    w0, w1, w2 = weights(base), weights(m1), weights(m2)
    name = "transformer.h.2.mlp.c_proj.weight"
    assert not torch.equal(w0[name], w1[name]) and not torch.equal(w1[name], w2[name])
    # the edited model loads with plain transformers, no code of ours
    AutoModelForCausalLM.from_pretrained(m2)

    r = run_main("stage=revert", f"ledger={out}", "edit_id=2", f"edit.save_to={tmp_path / 'rev2'}", env=OFFLINE)
    assert r.returncode == 0, r.stderr
    rev2 = weights(tmp_path / "rev2")
    assert all(torch.equal(rev2[k], w1[k]) for k in w1)  # bitwise: the model after edit 1 only
    r = run_main("stage=revert", f"ledger={out}", "edit_id=all", f"edit.save_to={tmp_path / 'rev'}", env=OFFLINE)
    assert r.returncode == 0, r.stderr
    rev = weights(tmp_path / "rev")
    assert all(torch.equal(rev[k], w0[k]) for k in w0)  # bitwise the original
    assert [e["status"] for e in json.loads((out / "ledger.json").read_text())["entries"]] == ["reverted", "reverted"]


def test_bad_edit_input_leaves_model_on_disk_untouched(tiny_model_dir, small_wiki, tmp_path):
    base = tiny_model_dir("gpt2")
    saved = tmp_path / "saved"
    ok = edit_cli(
        base,
        small_wiki,
        tmp_path,
        f"request={json.dumps(EIFFEL)}",
        f"edit.out={tmp_path / 'l'}",
        f"edit.save_to={saved}",
    )
    assert ok.returncode == 0, ok.stderr
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    other = tiny_model_dir("llama")
    stats_other = run_main(
        "stage=stats",
        f"model.name={other}",
        f"data.files={small_wiki}",
        f"stats.dir={tmp_path / 'so'}",
        "stats.layers=[2]",
        "stats.tokens=500",
        "trainer.accelerator=cpu",
        env=OFFLINE,
    )
    assert stats_other.returncode == 0, stats_other.stderr
    other_entry = next(p for p in (tmp_path / "so").iterdir() if p.is_dir())  # the entry, not the output marker
    cases = {
        "not in the prompt": [f"request={json.dumps({**EIFFEL, 'prompt': 'The Louvre is in', 'subject': 'X'})}"],
        "target_new": [f"request={json.dumps({**EIFFEL, 'target_new': ''})}"],
        "equals the true object": [f"request={json.dumps({**EIFFEL, 'target_new': 'Paris'})}"],
        "not valid JSON": ['request={"prompt": "{} is", "subject"'],
        "out of range": [f"request={json.dumps(EIFFEL)}", "edit.layer=7"],
        "are for model": [f"request={json.dumps(EIFFEL)}", f"edit.stats={other_entry}"],
    }
    for expect, extra in cases.items():  # in this process: the same rome.cli.main, without a start-up each
        code, _, errors = main(
            *edit_args(base, small_wiki, tmp_path, *extra, f"edit.out={tmp_path / 'l'}", f"edit.save_to={saved}"),
        )
        assert code == 2 and len(errors) == 1 and expect in errors[0], (expect, errors)
        assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert len(json.loads((tmp_path / "l" / "ledger.json").read_text())["entries"]) == 1


# ------------------------------------------------------------------ the user's files, ledgers, signals

RIVIERA = {"prompt": "{} is located in the city of", "subject": "The Louvre", "target_new": "Berlin"}


@pytest.fixture(scope="module")
def edit_env(tiny_model_dir, small_wiki, tmp_path_factory):
    """Arguments of an in-process edit on the tiny GPT-2, with statistics and templates shared by the tests."""
    shared = tmp_path_factory.mktemp("edit-shared")
    return tiny_edit_args(tiny_model_dir("gpt2"), small_wiki, shared, v_steps=4)


def tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_save_to_never_touches_what_this_project_did_not_write(edit_env, tiny_model_dir, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.txt").write_text("four years of work")
    (mine / "sub" / "data.csv").write_text("a,b\n1,2\n")
    theirs = tree(mine)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    ledger = tmp_path / "ledger"
    req = f"request={json.dumps(EIFFEL)}"
    refused = {  # checked before any work: nothing loaded, nothing edited, nothing recorded
        str(mine): "is not empty and is not a model saved by this project",
        str(a_file / "model"): f"is under the file {a_file}",
        str(a_file): "is a file",
        "/proc/rome-model": "cannot be written",
        ".": "is the current directory",
        str(tiny_model_dir("gpt2")): "would replace",
    }
    for target, expect in refused.items():
        code, _, errors = main("stage=edit", *edit_env, req, f"edit.out={ledger}", f"edit.save_to={target}")
        assert code == 2 and len(errors) == 1 and expect in errors[0], (target, errors)
    assert tree(mine) == theirs and a_file.read_text() == "x" and not ledger.exists()

    saved = tmp_path / "saved"
    code, out, errors = main("stage=edit", *edit_env, req, f"edit.out={ledger}", f"edit.save_to={saved}")
    assert code == 0, errors
    marker = json.loads((saved / "rome_saved_model.json").read_text())
    assert (
        marker["written_by"] == "rome-lightning" and marker["edits"] == [1] and "model.safetensors" in marker["files"]
    )
    first = (saved / "model.safetensors").read_bytes()
    # our own saved model is replaced whole; once the user puts a file of theirs into it, it is refused
    code, _, errors = main(
        "stage=edit", *edit_env, f"request={json.dumps(RIVIERA)}", f"edit.out={ledger}", f"edit.save_to={saved}"
    )
    assert code == 0, errors
    assert (saved / "model.safetensors").read_bytes() != first and json.loads(
        (saved / "rome_saved_model.json").read_text()
    )["edits"] == [1, 2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saved")]  # no temporary left beside it
    (saved / "my-notes.md").write_text("mine")
    code, _, errors = main("stage=revert", f"ledger={ledger}", "edit_id=2")
    assert code == 2 and "also holds files it did not write (my-notes.md)" in errors[0]
    assert (saved / "my-notes.md").read_text() == "mine"
    (saved / "my-notes.md").unlink()

    # a ledger whose saved_to names the user's directory cannot make revert replace it: a changed ledger fails
    # its checksum; one whose checksum was recomputed too still meets the destination rule
    from rome.pipeline.editors.ledger import content_checksum

    data = json.loads((ledger / "ledger.json").read_text())
    (ledger / "ledger.json").write_text(json.dumps({**data, "saved_to": str(mine)}))
    code, _, errors = main("stage=revert", f"ledger={ledger}", "edit_id=1")
    assert code == 2 and "was changed outside this project" in errors[0]
    forged = {**data, "saved_to": str(mine)}
    (ledger / "ledger.json").write_text(json.dumps({**forged, "checksum": content_checksum(forged)}))
    code, _, errors = main("stage=revert", f"ledger={ledger}", "edit_id=1")
    assert code == 2 and "the ledger's saved_to" in errors[0] and "not a model saved by this project" in errors[0]
    assert tree(mine) == theirs
    assert json.loads((ledger / "ledger.json").read_text())["entries"][0]["status"] == "applied"

    # a save that fails after the edit records nothing: the same command then edits once, not twice
    from transformers import PreTrainedModel

    def disk_full(self, *a, **k):
        raise OSError(28, "No space left on device")

    ledger2 = tmp_path / "ledger2"
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    code, _, errors = main("stage=edit", *edit_env, req, f"edit.out={ledger2}", f"edit.save_to={tmp_path / 'm2'}")
    assert code == 2 and "No space left on device" in errors[0] and "taken out of the ledger" in errors[0]
    assert json.loads((ledger2 / "ledger.json").read_text())["entries"] == [] and not list(
        (ledger2 / "edits").iterdir()
    )
    assert not (tmp_path / "m2").exists()
    monkeypatch.undo()
    code, _, errors = main("stage=edit", *edit_env, req, f"edit.out={ledger2}", f"edit.save_to={tmp_path / 'm2'}")
    assert code == 0 and len(json.loads((ledger2 / "ledger.json").read_text())["entries"]) == 1


def test_ledger_files_are_checksummed_and_revert_says_what_it_re_applies(edit_env, tmp_path):
    ledger, saved = tmp_path / "ledger", tmp_path / "saved"
    code, _, errors = main(
        "stage=edit",
        *edit_env,
        f"request={json.dumps([EIFFEL, RIVIERA])}",
        f"edit.out={ledger}",
        f"edit.save_to={saved}",
    )
    assert code == 0, errors
    entries = json.loads((ledger / "ledger.json").read_text())["entries"]
    assert [len(e["sha256"]) for e in entries] == [64, 64]
    before_saved, before_ledger = tree(saved), (ledger / "ledger.json").read_text()
    f = ledger / entries[0]["file"]
    good = f.read_bytes()
    flipped = bytearray(good)
    for i in (-8, -16, -24, -32):  # four bytes inside the float64 data
        flipped[i] ^= 0xFF
    for damaged, expect in ((bytes(flipped), "fails its checksum"), (good[: len(good) // 2], "fails its checksum")):
        f.write_bytes(damaged)
        code, _, errors = main("stage=revert", f"ledger={ledger}", "edit_id=2")
        assert code == 2 and len(errors) == 1 and expect in errors[0] and "edit 1" in errors[0], errors
        assert tree(saved) == before_saved and (ledger / "ledger.json").read_text() == before_ledger
    f.write_bytes(good)
    code, out, errors = main("stage=revert", f"ledger={ledger}", "edit_id=1")
    assert code == 0, errors
    assert "edit(s) [2] were solved on weights that contained edit(s) [1]" in out and "not re-solved" in out


def test_each_run_gets_its_own_ledger_and_files_follow_the_umask(edit_env, tmp_path):
    runs = tmp_path / "runs"
    old = os.umask(0o022)
    try:
        outs = []
        for request in (EIFFEL, RIVIERA):
            code, out, errors = main(
                "stage=edit",
                *edit_env,
                f"request={json.dumps(request)}",
                f"edit.runs_dir={runs}",
                f"edit.save_to={tmp_path / 'saved'}",
            )
            assert code == 0 and "continuing" not in out, errors
            outs.append(out)
    finally:
        os.umask(old)
    first, second = sorted(runs.iterdir())  # two fresh directories, one edit each: no edit leaked into the next run
    assert [len(json.loads((d / "ledger.json").read_text())["entries"]) for d in (first, second)] == [1, 1]
    assert f"edit.out={second}" in outs[1]
    for p in [*first.rglob("*"), *(tmp_path / "saved").rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p


def test_a_rolled_back_edit_reports_the_restored_model(edit_env, tiny_model_dir, tmp_path):
    # the new object is less likely than the given true one, and one small v* step cannot change that.
    # steps=2: the last iteration only measures the loss, so steps=1 takes no Adam step at all (dW ~ 1e-9 of W,
    # float noise); with 2 the rejected edit is a real one, whose probabilities differ from the restored model's.
    request = {**EIFFEL, "target_new": "Zanzibar", "target_true": "Rome"}
    ledger, saved = tmp_path / "ledger", tmp_path / "saved"
    code, out, errors = main(
        "stage=edit",
        *edit_env,
        f"request={json.dumps(request)}",
        "edit.verify.enabled=true",
        "edit.v.steps=2",
        "edit.v.lr=0.01",
        f"edit.out={ledger}",
        f"edit.save_to={saved}",
    )
    assert code == 2 and "failed verification" in errors[0]
    (entry,) = json.loads((ledger / "ledger.json").read_text())["entries"]
    assert entry["status"] == "rolled_back" and not entry["verified"]
    assert entry["norms"]["relative_update"] > 1e-4  # an update far above float noise was made, then rolled back
    assert entry["probs"]["post"] == entry["probs"]["pre"]
    rejected, pre = entry["probs"]["rejected"]["prompt"], entry["probs"]["pre"]["prompt"]
    assert abs(rejected["new"][0] - pre["new"][0]) > 1e-3 * pre["new"][0]  # the rejected model answered otherwise
    assert "P(new) rolled back" in out and "the model above is the restored one" in out
    pre = entry["probs"]["pre"]["prompt"]
    row = next(line for line in out.splitlines() if line.strip().startswith("prompt "))
    assert row.split()[1:] == [f"{pre['true'][0]:.4f}"] * 2 + [f"{pre['new'][0]:.4f}"] * 2
    base, after = weights(tiny_model_dir("gpt2")), weights(saved)
    assert all(torch.equal(after[k], base[k]) for k in base)  # saved as rolled back: the base weights


def test_sigterm_stops_after_the_edit_in_progress_and_the_same_command_resumes(edit_env, tmp_path):
    requests = [EIFFEL, RIVIERA, {**EIFFEL, "subject": "Big Ben", "target_new": "Oslo"}]
    runs, saved = tmp_path / "runs", tmp_path / "saved"
    args = [
        "stage=edit",
        *edit_env,
        "edit.v.steps=25",
        "edit.v.early_stop_loss=0",
        f"request={json.dumps(requests)}",
        f"edit.runs_dir={runs}",
        f"edit.save_to={saved}",
    ]
    started = lambda out: any(line.startswith("v* [1/3]") for line in out)  # noqa: E731
    code, lines = signal_run(args, signal.SIGTERM, started, env=OFFLINE)
    assert code == 143, "\n".join(lines[-30:])
    (hint,) = [line for line in lines if line.startswith("interrupted:")]
    (out,) = runs.iterdir()
    entries = json.loads((out / "ledger.json").read_text())["entries"]
    done = len(entries)  # the edit running when the signal came is finished whole (or none had begun)
    assert done in (1, 2) and f"{done} of 3 request(s) edited and recorded in {out}" in hint
    assert f"run the same command with edit.out={out}" in hint
    assert [e["run"]["index"] for e in entries] == list(range(done)) and len(list((out / "edits").iterdir())) == done
    assert json.loads((saved / "rome_saved_model.json").read_text())["edits"] == list(range(1, done + 1))
    progress = [line for line in lines if line.startswith("v* [")]
    assert len(progress) == done and all(
        "25 steps" in line and "P(target)" in line for line in progress
    )  # one per edit
    assert not any("Epoch" in line or "configure_optimizers" in line for line in lines)

    resumed = run_main(*args, f"edit.out={out}", env=OFFLINE)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {done} of 3 request(s) of this request list are already in {out}" in resumed.stdout
    entries = json.loads((out / "ledger.json").read_text())["entries"]
    assert [e["run"]["index"] for e in entries] == [0, 1, 2]  # each request edited exactly once
    assert json.loads((saved / "rome_saved_model.json").read_text())["edits"] == [1, 2, 3]


def test_sigint_stops_a_memit_run_between_batches(edit_env, tmp_path):
    requests = [EIFFEL, RIVIERA, {**EIFFEL, "subject": "Big Ben", "target_new": "Oslo"}]
    out = tmp_path / "ledger"
    args = [
        "stage=edit",
        *edit_env,
        "edit.method=memit",
        "edit.layers=[1,2]",
        "edit.batch_size=1",
        "edit.memit.v.steps=25",
        "edit.memit.v.early_stop_loss=0",
        f"request={json.dumps(requests)}",
        f"edit.out={out}",
    ]
    code, lines = signal_run(
        args, signal.SIGINT, lambda out: any(line.startswith("memit batch [1/3]") for line in out), env=OFFLINE
    )
    assert code == 130, "\n".join(lines[-30:])
    (hint,) = [line for line in lines if line.startswith("interrupted:")]
    entries = json.loads((out / "ledger.json").read_text())["entries"]
    assert len(entries) in (1, 2) and f"{len(entries)} of 3 batch(es) edited and recorded" in hint
    assert hint.endswith("to resume, run the same command")
    assert [e["run"]["index"] for e in entries] == list(range(len(entries)))
    assert all(e["kind"] == "batch" and e["sha256"] for e in entries)


def test_a_signal_before_the_save_leaves_revert_undone(edit_env, tmp_path, monkeypatch):
    from rome.pipeline.editors.ledger import Ledger

    ledger, saved = tmp_path / "ledger", tmp_path / "saved"
    code, _, errors = main(
        "stage=edit", *edit_env, f"request={json.dumps(EIFFEL)}", f"edit.out={ledger}", f"edit.save_to={saved}"
    )
    assert code == 0, errors
    before_saved, before_ledger = tree(saved), (ledger / "ledger.json").read_text()
    rebuild = Ledger.rebuild

    def rebuild_then_signal(self, *args):  # a real SIGTERM to this process while the model is rebuilt
        n = rebuild(self, *args)
        os.kill(os.getpid(), signal.SIGTERM)
        return n

    monkeypatch.setattr(Ledger, "rebuild", rebuild_then_signal)
    code, _, lines = main("stage=revert", f"ledger={ledger}", "edit_id=1")
    assert code == 143 and lines == [
        "interrupted: nothing was changed (edit(s) [1] not reverted yet); to revert, run the same command"
    ]
    assert tree(saved) == before_saved and (ledger / "ledger.json").read_text() == before_ledger
    monkeypatch.undo()
    code, out, _ = main("stage=revert", f"ledger={ledger}", "edit_id=1")
    assert code == 0 and "reverted edit(s) [1]" in out and tree(saved) != before_saved
