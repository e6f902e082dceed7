"""eval.mode=sequential / batch on a tiny model: cumulative edits of every method, the curve, held-out
perplexity, known facts, resuming, and bad input."""

import json

import pytest
import torch
from conftest import DATA, run_main

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def scale_args(model_dir, data, tmp, *extra) -> list[str]:
    """The sequential protocol on a tiny model, small enough for a test; later ``extra`` overrides win."""
    return [
        "stage=eval",
        "eval.mode=sequential",
        f"model.name={model_dir}",
        "model.device=cpu",
        f"data.files={data}",
        f"stats.dir={tmp / 'stats'}",
        f"model.cache_dir={tmp / 'cache'}",
        "stats.tokens=1000",
        "data.max_length=64",
        "data.batch_tokens=256",
        "trainer.accelerator=cpu",
        f"eval.dataset={DATA / 'counterfact' / 'counterfact-edit.json'}",
        "eval.n=4",
        "eval.batch_size=2",
        "eval.generation.tokens=3",
        "eval.heldout.articles=5",
        "eval.heldout.max_length=32",
        "eval.known.n=30",
        "edit.layer=2",
        "edit.layers=[1,2]",
        "edit.v.steps=2",
        "edit.memit.v.steps=2",
        f"eval.out={tmp / 'out'}",
        *extra,
    ]


def scale_cli(model_dir, data, tmp, *extra):
    return run_main(*scale_args(model_dir, data, tmp, *extra), env=OFFLINE)


def test_sequential_protocol_end_to_end_and_resume(tiny_model_dir, small_wiki, tmp_path):
    base = tiny_model_dir("llama")
    r = scale_cli(base, small_wiki, tmp_path, "eval.methods=[none,rome,memit,alphaedit]")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["order"] == ["none", "rome", "memit", "alphaedit"]
    pre = summary["unedited"]
    for name in ("rome", "memit", "alphaedit"):
        m = summary["methods"][name]
        assert m["edits"] == 4 and m["metrics"]["es"]["n"] == 4 and "ge" in m["metrics"]
        assert [p["edits"] for p in m["curve"]] == [2, 4]  # after batch 1 (2 cases) and at the end (4)
        assert m["perplexity"] > 1 and 0 <= m["known_accuracy"] <= 1 and m["edits_per_second"] > 0
        assert m["environment"]["torch"] == torch.__version__ and m["environment"]["threads"] >= 1  # what made it
    assert summary["methods"]["memit"]["layers"] == [1, 2] and summary["methods"]["rome"]["layers"] == [2]
    null_space = summary["methods"]["alphaedit"]["null_space"]  # P's rank and C's energy in its range, per layer
    assert set(null_space) == {"1", "2"} and all(0 <= v["energy"] < 1 and v["rank"] > 0 for v in null_space.values())
    assert summary["methods"]["memit"]["null_space"] == {}
    for name in ("rome", "memit", "alphaedit"):  # the collapse monitor at every checkpoint
        m = summary["methods"][name]
        for p in m["curve"]:
            assert set(p["weight_change"]) == {str(layer) for layer in m["layers"]}
            assert all(v > 0 for v in p["weight_change"].values()) and p["cases"] == p["edits"]
            assert p["perplexity"] > 1 and 0 <= p["known_accuracy"] <= 1
            assert 0 <= p["es_gen_em"] <= p["es_gen_contains"] <= 100 and 0 <= p["es"] <= 100
        last = m["curve"][-1]
        assert last["perplexity"] == m["perplexity"] and last["weight_change"] == m["weight_change"]
        assert m["collapse_point"] == "none within 4 edits" and m["collapse_edits"] is None
        assert m["checkpoint_seconds"] > 0 and m["final_seconds"] > 0
        assert {"es_gen_em", "ns_gen_contains"} <= set(m["generative"])
    assert set(pre["generative"]) == {f"{s}_gen_{k}" for s in ("es", "ps", "ns") for k in ("em", "contains")}
    none = summary["methods"]["none"]  # the clean weights came back after every method
    assert none["perplexity"] == pre["perplexity"] and none["metrics"]["es"] == pre["metrics"]["es"]
    assert (tmp_path / "out" / "curve.png").stat().st_size > 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| unedited |" in table and "| memit |" in table and "ppl" in table
    assert "| ES (tf) |" in table and "| collapse point |" in table and "| none within 4 edits |" in table
    assert "| Method | edits | ES (gen EM) | ES (gen contains) |" in table and "GREEDILY" in table
    # a rerun skips what is there; another batch size is another run
    again = scale_cli(base, small_wiki, tmp_path, "eval.methods=[none,rome,memit,alphaedit]")
    assert again.returncode == 0 and again.stdout.count("already in") == 4
    other = scale_cli(base, small_wiki, tmp_path, "eval.methods=[rome]", "eval.batch_size=1")
    assert other.returncode == 2 and "other settings (batch_size differ)" in other.stderr
    # a run made before known facts about edited subjects were set aside continues with the rule off
    run_json = tmp_path / "out" / "run.json"
    earlier = json.loads(run_json.read_text())
    before = {k: v for k, v in earlier["known"].items() if k != "exclude_edited"}
    run_json.write_text(json.dumps({**earlier, "known": before}))
    old = scale_cli(base, small_wiki, tmp_path, "eval.methods=[none,rome,memit,alphaedit]")
    assert old.returncode == 2 and "continue it with eval.known.exclude_edited=false" in old.stderr
    resumed = scale_cli(base, small_wiki, tmp_path, "eval.methods=[rome]", "eval.known.exclude_edited=false")
    assert resumed.returncode == 0 and "already in" in resumed.stdout


def test_batch_mode_and_bad_input(tiny_model_dir, small_wiki, tmp_path):
    base = tiny_model_dir("gpt2")
    # known facts about a subject the run edits (CounterFact record 1: Edwin of Northumbria) are set aside
    facts = json.loads((DATA / "known_1000.json").read_text())[:3]
    facts[1] = {**facts[1], "subject": "edwin of  Northumbria", "prompt": "edwin of  Northumbria was a"}
    (tmp_path / "known.json").write_text(json.dumps(facts))
    known = f"eval.known.dataset={tmp_path / 'known.json'}"
    r = scale_cli(base, small_wiki, tmp_path, "eval.methods=[memit]", "eval.mode=batch", known)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["known_set_aside"] == [1] and 1 not in summary["known_facts"]
    note = next(n for n in summary["notes"] if n.startswith("known facts:"))
    assert note.startswith("known facts: of the first 30 records of known.json, less the 1 about a subject this run")
    m = summary["methods"]["memit"]
    assert [p["edits"] for p in m["curve"]] == [4]  # one batch
    # the table names the edit settings the command line changed (a run with others measured another method)
    changed = "edit settings other than configs/ sets for this model: "
    assert summary["notes"][0].startswith(changed) and changed in (tmp_path / "out" / "table.md").read_text()
    assert {"edit.layer=2", "edit.layers=[1, 2]", "edit.memit.v.steps=2"} <= set(
        summary["notes"][0].removeprefix(changed).split("; ")
    )
    for extra, expect in (
        (["eval.methods=[memit]", "eval.mode=parallel"], "not one of case, sequential, batch"),
        (["eval.methods=[ft_l]", f"eval.out={tmp_path / 'o2'}"], "runs none, rome, memit, alphaedit"),
        (["eval.methods=[memit]", "stats.tokens=100000", f"eval.out={tmp_path / 'o3'}"], "held out"),
    ):
        bad = scale_cli(base, small_wiki, tmp_path, *extra)
        errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
        assert bad.returncode == 2 and len(errors) == 1 and expect in errors[0], (extra, bad.stderr[-1500:])
    case_mode = run_main(
        "stage=eval",
        f"model.name={base}",
        "eval.methods=[memit]",
        "trainer.accelerator=cpu",
        "edit.layer=2",
        f"eval.out={tmp_path / 'o4'}",
        env=OFFLINE,
    )
    assert case_mode.returncode == 2 and "eval.mode=sequential" in case_mode.stderr


def test_sigterm_abandons_the_method_in_progress_and_the_same_command_resumes(
    tiny_model_dir, small_wiki, tmp_path, capsys, monkeypatch
):
    import os
    import signal

    from rome import cli
    from rome.pipeline.editors.base import Editor

    args = scale_args(
        tiny_model_dir("gpt2"), small_wiki, tmp_path, "eval.generation.tokens=0", "eval.methods=[rome,memit]"
    )
    edit = Editor.edit
    calls, progress, steps = [], [], []

    def edit_then_signal(self, requests, on_step=None):  # a real SIGTERM to this process during memit's first batch
        calls.append(self.name)
        progress.append((on_step.label, on_step.units))  # the optimisation inside a batch is reported

        def counting(edit_in_progress):
            steps.append(self.name)
            on_step(edit_in_progress)

        edits = edit(self, requests, counting)
        if self.name == "memit":
            os.kill(os.getpid(), signal.SIGTERM)
        return edits

    monkeypatch.setattr(Editor, "edit", edit_then_signal)
    assert cli.main(args) == 143
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("interrupted:")] == [
        f"interrupted: finished method(s) in {tmp_path / 'out' / 'methods'}: rome; "
        f"memit stopped after 1 of 2 batch(es), its edits and state saved in {tmp_path / 'out' / 'progress'} "
        "(it resumes there); to resume, run the same command"
    ]
    # ROME's units are its requests (2 a batch), MEMIT's its batch; every optimisation step reaches the bar
    assert progress == [("rome: batch 1/2", 2), ("rome: batch 2/2", 2), ("memit: batch 1/2", 1)]
    assert steps.count("rome") > 0 and steps.count("memit") > 0
    assert calls == ["rome", "rome", "memit"] and sorted(p.name for p in (tmp_path / "out" / "methods").iterdir()) == [
        "rome.json"
    ]
    monkeypatch.undo()
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "rome: already in" in out
    assert set(json.loads((tmp_path / "out" / "summary.json").read_text())["methods"]) == {"rome", "memit"}


def test_a_stopped_method_resumes_at_its_batch_boundary_bit_for_bit(
    tiny_model_dir, small_wiki, tmp_path, capsys, monkeypatch
):
    """Stopped after batch 2 of 3 (each method), resumed by the same command: every method's scores, curve and
    weight changes equal an uninterrupted run's exactly (the edited matrices and the editors' state —
    UltraEdit's lifelong statistics, AlphaEdit's preserved keys, the NAS reference and the norms it is being taken
    over — are saved and restored)."""
    import os
    import signal

    from rome import cli
    from rome.pipeline.editors.base import Editor

    base = tiny_model_dir("llama")

    def args(out):
        return scale_args(
            base,
            small_wiki,
            tmp_path,
            "eval.n=6",
            "eval.eval_every=1",
            "eval.generation.tokens=0",
            "edit.v.norm_anchor=true",
            "edit.alphaedit.norm_anchor=true",
            "edit.nas.reference_values=6",  # still being taken over the edits when the run stops
            "edit.ultraedit.lr=0.01",
            f"eval.out={out}",
            "eval.methods=[ultraedit,alphaedit,rome]",
        )

    assert cli.main(args(tmp_path / "whole")) == 0
    edit = Editor.edit
    batches = {}

    def edit_then_signal(self, requests, on_step=None):  # a real SIGTERM during each method's second batch
        batches[self.name] = batches.get(self.name, 0) + len(self.units(requests))
        edits = edit(self, requests, on_step)
        if batches[self.name] == (2 if self.name != "rome" else 4):
            os.kill(os.getpid(), signal.SIGTERM)
        return edits

    monkeypatch.setattr(Editor, "edit", edit_then_signal)
    out = tmp_path / "stopped"
    for name in ("ultraedit", "alphaedit", "rome"):  # each run stops one method after its batch 2 of 3
        assert cli.main(args(out)) == 143
        err = capsys.readouterr().err
        assert f"{name} stopped after 2 of 3 batch(es)" in err
        assert (out / "progress" / f"{name}.safetensors").exists()
        batches.clear()
    monkeypatch.undo()
    assert cli.main(args(out)) == 0
    printed = capsys.readouterr()
    assert "rome: resuming after batch 2 of 3 (4 edits)" in printed.out + printed.err
    assert not list((out / "progress").glob("*")), "a finished method leaves no saved progress"

    def outcome(path):
        row = json.loads(path.read_text())
        return {
            k: v
            for k, v in row.items()
            if k not in ("edit_seconds", "checkpoint_seconds", "final_seconds", "edits_per_second", "timings")
        }

    for name in ("ultraedit", "alphaedit", "rome"):
        whole = outcome(tmp_path / "whole" / "methods" / f"{name}.json")
        resumed = outcome(out / "methods" / f"{name}.json")
        assert [p["edits"] for p in whole["curve"]] == [2, 4, 6]
        assert resumed == whole, name
        assert all(v > 0 for v in whole["weight_change"].values())
        assert (whole["anchor_reference"] is None) == (name == "ultraedit")  # NAS's ρ, recorded with the method


def test_a_resumed_methods_saved_batches_do_not_enter_the_eta():
    """The run's bar after a resume: 4 of 10 batches restored, one batch of method none (no edits), then one
    batch of 100 s. The ETA is the 4 batches left at that pace (``update`` timed the restored and the no-op
    batches as instant: an ETA of 00:00)."""
    import io

    from tqdm.auto import tqdm

    from rome.recipes.eval_scale import count_without_timing

    clock = [0.0]
    bar = tqdm(total=10, file=io.StringIO(), mininterval=0)
    bar._time = lambda: clock[0]  # tqdm's own clock, made a test's
    bar.start_t = bar.last_print_t = 0.0
    clock[0] = 0.01
    count_without_timing(bar, 4)
    clock[0] = 50.01
    count_without_timing(bar, 1)  # the interval timed next starts here
    assert bar.n == 5 and bar.format_dict["rate"] is None
    clock[0] = 150.01
    bar.update(1)
    rate = bar.format_dict["rate"]
    assert bar.n == 6 and rate == pytest.approx(0.01, rel=1e-3)
    assert (bar.total - bar.n) / rate == pytest.approx(400, rel=1e-3)


def test_sequential_protocol_on_zsre(tiny_model_dir, small_wiki, tmp_path):
    """zsRE (UltraEdit's own dataset) in the sequential protocol: its teacher-forced token accuracies
    (efficacy, paraphrase, specificity) and generative efficacy at every checkpoint, its table, curve and
    report, and the run naming what the edits write and which records it read (one skipped: its alt is its answer)."""
    base = tiny_model_dir("llama")
    r = scale_cli(
        base,
        small_wiki,
        tmp_path,
        f"eval.dataset={DATA / 'zsre' / 'zsre_mend_train-1k.json'}",
        "eval.zsre_target=alt",
        "eval.start=98",  # records 98-101: 101's alt is its answer, so it is skipped
        "eval.methods=[none,ultraedit]",
        "edit.ultraedit.lr=0.01",
        "eval.generation.tokens=0",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "zsre" and summary["identity"]["zsre_target"] == "alt"
    assert summary["title"].startswith("zsRE (edits write alt (MEND's and EasyEdit's convention)), 3 edits into one")
    assert "records 98-101 of zsre_mend_train-1k.json, 1 skipped" in summary["title"]
    pre, m = summary["unedited"], summary["methods"]["ultraedit"]
    assert set(m["metrics"]) == set(pre["metrics"]) == {"efficacy", "paraphrase", "specificity"}
    assert m["metrics"]["efficacy"]["n"] == 3 and "s" not in m
    sets = ("efficacy", "paraphrase", "specificity")
    assert {f"{s}_gen_{k}" for s in sets for k in ("em", "contains")} <= set(pre["generative"])
    assert [p["edits"] for p in m["curve"]] == [2, 3] and all(v > 0 for v in m["weight_change"].values())
    for p in m["curve"]:
        assert {"efficacy", "paraphrase", "specificity"} <= set(p) and not {"es", "s"} & set(p)
        assert 0 <= p["efficacy_gen_em"] <= p["efficacy_gen_contains"] <= 100 and 0 <= p["efficacy"] <= 100
    assert summary["methods"]["none"]["metrics"] == pre["metrics"]  # the clean weights came back
    table = (out / "table.md").read_text()
    assert "| Method | edits | Efficacy (tf) | Paraphrase (tf) | Specificity (tf) | ppl |" in table
    assert "S (tf)" not in table and "Efficacy (gen EM)" in table and "top-1 accuracy of the answer's tokens" in table
    assert (out / "curve.png").stat().st_size > 0
    assert "Efficacy (gen EM)" in (out / "report.html").read_text()
