"""Feedback and stopping in the long stages. The case-mode eval names the case, method and phase and counts
only cases recorded in its case file; Ctrl+C abandons the case in flight at once (inside a v* optimisation, or
inside the scoring, at the next forward pass), and the resumed run's results equal an uninterrupted run's.
The edit stage announces each phase as it starts (a bar on a terminal) and abandons an edit still in its
optimisation. The stats stage says whether its token budget converged and where the plot is."""

from __future__ import annotations

import io
import json
import os
import signal
import time

import pytest
import torch
from conftest import DATA, run_main, tiny_args, tiny_edit_args

from rome.modules.callbacks import ApplyEdit, EditProgress, VerifyEdit
from rome.modules.edit_loop import EditLoop
from rome.modules.progress import CaseProgress, PhaseStatus
from rome.modules.trainer import single_device_trainer
from rome.pipeline.core.loading import configure, load_model
from rome.pipeline.core.requests import parse_requests
from rome.pipeline.editors.factory import build_editor
from rome.pipeline.stats.convergence import budget_verdict

EIFFEL = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}
BIG_BEN = {**EIFFEL, "subject": "Big Ben", "target_new": "Oslo"}


# -- the displays on their own ---------------------------------------------------------------------------------


def test_in_a_log_a_case_is_one_line_and_a_long_phase_a_heartbeat():
    log = io.StringIO()
    progress = CaseProgress(total=3, done=1, file=log, live=False, heartbeat_s=3600)
    progress.start()
    progress.phase("scoring the unedited model")
    for step in range(1, 21):
        progress.phase("rome: v*", f"step {step}/20")
    progress.finish({"unedited": 1.25, "rome": 2.5})
    progress.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval [case 2/3] done in ")
    assert lines[0].endswith("(unedited 1.2 s, rome 2.5 s)") and progress.done == 2

    chatty = io.StringIO()
    status = PhaseStatus(chatty, None, heartbeat_s=0.0)  # every change is due: the line says case, phase, detail
    status.set("eval [case 3/3]", "rome: v*", "step 7/20")
    status.close()
    assert chatty.getvalue().splitlines()[0] == "  eval [case 3/3] rome: v* step 7/20"


def _until(condition, limit_s: float = 60.0) -> bool:
    """Poll ``condition`` (the display's thread draws on its own) until it holds or ``limit_s`` passed."""
    deadline = time.monotonic() + limit_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_a_phase_inside_one_long_call_is_still_said():
    """No forward pass, no phase change (one long call): the log still gets its heartbeat, the bar its redraws."""
    log = io.StringIO()
    progress = CaseProgress(total=2, file=log, live=False, heartbeat_s=0.2)
    progress.start()
    progress.phase("rome: scoring the edited model")
    assert _until(lambda: "  eval [case 1/2] rome: scoring the edited model" in log.getvalue())
    progress.close()

    screen = io.StringIO()
    progress = CaseProgress(total=2, file=screen, live=True)
    progress.start()
    progress.phase("rome: editing")
    assert _until(lambda: "eval [case 1/2] rome: editing (2 s)" in screen.getvalue())
    progress.close()


def test_on_a_terminal_the_bar_counts_finished_cases_and_an_abandoned_one_is_not_counted():
    screen = io.StringIO()
    progress = CaseProgress(total=4, done=1, file=screen, live=True)
    progress.start()
    progress.phase("rome: v*", "step 7/20")
    assert "eval [case 2/4] rome: v* step 7/20" in screen.getvalue() and "1/4 cases done" in screen.getvalue()
    progress.finish({})
    progress.start()
    progress.phase("rome: scoring the edited model")
    assert "eval [case 3/4] rome: scoring the edited model" in screen.getvalue()
    progress.abandon()
    assert progress.done == 2 and "2/4 cases done" in screen.getvalue()
    assert "3/4 cases done" not in screen.getvalue()
    assert "eval [case 3/4] abandoned on the stop request" in screen.getvalue()


def test_the_budget_verdict_reads_the_last_doubling():
    points = [
        {"tokens": 16384, "c_change": None, "u_change": None},
        {"tokens": 32768, "c_change": 0.385, "u_change": 0.437},
        {"tokens": 65536, "c_change": 0.351, "u_change": 0.157},
    ]
    ok, text = budget_verdict({"points": points, "threshold": 0.2, "ranks": 1})
    assert ok is True and text == (
        "converged: u = C⁻¹k moved 15.7% from 32,768 to 65,536 tokens, under stats.convergence.threshold=0.2"
    )
    ok, text = budget_verdict({"points": points, "threshold": 0.1, "ranks": 2})
    assert ok is False and "moved 15.7% from 65,536 to 131,072 tokens" in text and "stats.tokens=262,144" in text
    assert budget_verdict({"points": points[:1], "threshold": 0.2})[0] is None
    assert budget_verdict({"points": [], "threshold": 0.2})[1].startswith("not judged: no readout")
    assert budget_verdict(None)[1].startswith("not measured")


# -- the eval: Ctrl+C inside a case, and the resume ----------------------------------------------------------


@pytest.fixture(scope="module")
def eval_args(tiny_model_dir, small_wiki, tmp_path_factory):
    shared = tmp_path_factory.mktemp("progress-eval")
    return shared, [
        "stage=eval",
        *tiny_args(tiny_model_dir("gpt2"), small_wiki, shared),
        f"eval.dataset={DATA / 'counterfact' / 'counterfact-edit.json'}",
        "eval.n=2",
        "eval.methods=[none,rome]",
        "eval.generation.tokens=4",
        "edit.v.steps=8",
        "edit.v.early_stop_loss=0",
    ]


def interrupt_at(monkeypatch, case: int, phase: str, detail: str = ""):
    """A real SIGINT to this process when the eval's progress enters ``phase`` (with ``detail``) in ``case``
    (from 1); returns the phases announced from then on (the signal's own included)."""
    after: list[tuple[str, str]] = []
    announce = CaseProgress.phase

    def spy(self, name, more=""):
        if after or (self.done + 1 == case and name == phase and more == detail):
            after.append((name, more))
            if len(after) == 1:
                os.kill(os.getpid(), signal.SIGINT)
        return announce(self, name, more)

    monkeypatch.setattr(CaseProgress, "phase", spy)
    return after


def _comparable(out_dir):
    """The run's records without their timings (everything else is deterministic on the CPU)."""
    records = [json.loads(line) for line in (out_dir / "cases.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("timings", None), r.pop("pre_timings", None)
        r.get("info", {}).pop("timings", None)
    return records


def test_ctrl_c_abandons_the_case_in_flight_and_the_resumed_run_equals_an_uninterrupted_one(
    eval_args, tmp_path, monkeypatch
):
    shared, args = eval_args
    out = tmp_path / "eval"
    log = out / "cases.rank0.jsonl"

    # 1. Ctrl+C at v* step 3 of 8 in the second case: no further step, nothing of the case recorded
    after = interrupt_at(monkeypatch, 2, "rome: v*", "step 3/8")
    run = run_main(*args, f"eval.out={out}")
    assert run.returncode == 130, run.stderr[-3000:]
    assert after == [("rome: v*", "step 3/8")]  # the stop acted before the next step
    assert [(r["index"], r["method"]) for r in map(json.loads, log.read_text().splitlines())] == [
        (0, "none"),
        (0, "rome"),
    ]
    assert "eval [case 1/2] done in " in run.stderr and "eval [case 2/2] abandoned on the stop request" in run.stderr
    (hint,) = [line for line in run.stderr.splitlines() if line.startswith("interrupted:")]
    assert "2 of 4 (case, method) results are recorded" in hint and hint.endswith("run the same command")

    # 2. the resumed run, stopped again while it scores the edited model: at the next forward pass
    monkeypatch.undo()
    after = interrupt_at(monkeypatch, 2, "rome: scoring the edited model")
    run = run_main(*args, f"eval.out={out}")
    assert run.returncode == 130 and "1 to run, 1 already done" in run.stdout, run.stderr[-3000:]
    assert after == [("rome: scoring the edited model", "")] and len(log.read_text().splitlines()) == 2
    assert "eval [case 2/2] abandoned on the stop request" in run.stderr

    # 3. resumed to the end: every (case, method) once, as an uninterrupted run gives them
    monkeypatch.undo()
    run = run_main(*args, f"eval.out={out}")
    assert run.returncode == 0 and "1 to run, 1 already done" in run.stdout, run.stderr[-3000:]
    assert len(log.read_text().splitlines()) == 4
    run = run_main(*args, f"eval.out={tmp_path / 'whole'}")
    assert run.returncode == 0, run.stderr[-3000:]
    resumed, whole = _comparable(out), _comparable(tmp_path / "whole")
    assert [(r["index"], r["method"]) for r in whole] == [(0, "none"), (0, "rome"), (1, "none"), (1, "rome")]
    assert resumed == whole


# -- the edit stage: its phases, and Ctrl+C inside an optimisation -------------------------------------------


def test_the_edit_shows_each_phase_as_it_starts(tiny_model_dir, tmp_path):
    path = str(tiny_model_dir("gpt2"))
    cfg = configure(
        [
            f"model.name={path}",
            f"model.cache_dir={tmp_path / 'cache'}",
            "edit.layer=2",
            "edit.mom2_adjustment=false",
            "edit.v.steps=3",
            "edit.v.early_stop_loss=0",
            "edit.generate_tokens=0",
            "trainer.accelerator=cpu",
        ]
    )
    loaded = load_model(path, device="cpu")
    screen = io.StringIO()
    module = EditLoop(build_editor(cfg, loaded), parse_requests([EIFFEL, BIG_BEN]))
    torch.manual_seed(0)
    progress = EditProgress(live=True, file=screen)
    single_device_trainer(cfg, loaded.model, [ApplyEdit(), VerifyEdit(), progress]).fit(module)
    text = screen.getvalue()
    said = [
        "v* [1/2] the unedited model's probabilities and answers, the keys",
        "v* [1/2] optimising",
        "v* [1/2] optimising loss",
        "v* [1/2] solving and applying the update",
        "v* [1/2] verifying the edited model",
        "v* [1/2] 3 steps, loss",
        "v* [2/2] the unedited model's probabilities and answers, the keys",
        "v* [2/2] 3 steps, loss",
    ]
    positions = [text.find(s) for s in said]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), list(zip(said, positions))
    assert len(module.finished()) == 2


def test_ctrl_c_abandons_an_edit_still_in_its_optimisation_and_the_same_command_resumes(
    tiny_model_dir, small_wiki, tmp_path_factory, tmp_path, monkeypatch
):
    shared = tmp_path_factory.mktemp("progress-edit")
    ledger = tmp_path / "ledger"
    args = [
        "stage=edit",
        *tiny_edit_args(tiny_model_dir("gpt2"), small_wiki, shared, v_steps=6),
        "edit.v.early_stop_loss=0",
        f"request={json.dumps([EIFFEL, BIG_BEN])}",
        f"edit.out={ledger}",
    ]
    phases: list[tuple[int, str]] = []
    announce = EditProgress.phase

    def spy(self, loop, index, phase, detail=""):
        phases.append((index, phase))
        if (index, phase) == (1, "optimising"):  # the second edit has begun its v*
            os.kill(os.getpid(), signal.SIGINT)
        return announce(self, loop, index, phase, detail)

    monkeypatch.setattr(EditProgress, "phase", spy)
    run = run_main(*args)
    assert run.returncode == 130, run.stderr[-3000:]
    assert phases == [
        (0, "begin"),
        (0, "optimising"),
        (0, "optimised"),
        (0, "applied"),
        (0, "verified"),
        (0, "record"),
        (1, "begin"),
        (1, "optimising"),
        (1, "abandoned"),
    ]
    assert "stopped: v* [2/2] abandoned before anything was written to the model" in run.stderr
    (hint,) = [line for line in run.stderr.splitlines() if line.startswith("interrupted:")]
    assert "1 of 2 request(s) edited and recorded" in hint
    entries = json.loads((ledger / "ledger.json").read_text())["entries"]
    assert [e["run"]["index"] for e in entries] == [0]

    monkeypatch.undo()
    run = run_main(*args)
    assert run.returncode == 0 and "resuming: 1 of 2 request(s)" in run.stdout, run.stderr[-3000:]
    entries = json.loads((ledger / "ledger.json").read_text())["entries"]
    assert [e["run"]["index"] for e in entries] == [0, 1]


# -- the stats stage: its last lines -------------------------------------------------------------------------


def test_the_stats_stage_ends_with_the_budget_verdict_and_the_plot(tiny_model_dir, small_wiki, tmp_path):
    args = [
        "stage=stats",
        f"model.name={tiny_model_dir('gpt2')}",
        f"data.files={small_wiki}",
        f"stats.dir={tmp_path}",
        "stats.tokens=2000",
        "data.max_length=64",
        "data.batch_tokens=256",
        "stats.layers=[2]",
        "trainer.accelerator=cpu",
        "stats.convergence.first_tokens=256",
        "stats.convergence.threshold=0.5",
    ]
    run = run_main(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    (entry,) = [p.parent for p in tmp_path.glob("*/manifest.json")]
    record = json.loads((entry / "manifest.json").read_text())["layers"]["2"]["convergence"]
    converged, verdict = budget_verdict(record)
    points = record["points"]
    assert len(points) >= 2 and converged is (points[-1]["u_change"] < 0.5)
    assert f"  token budget: {verdict}" in run.stdout.splitlines()
    plot = entry / "convergence.png"
    said = f"convergence plot (change of C and of u per doubling of the tokens): {plot}"
    assert plot.is_file() and said in run.stdout

    run = run_main(*args)  # from the cache: the same verdict, no pass
    assert run.returncode == 0 and f"  token budget: {verdict}" in run.stdout.splitlines()
    assert "tokens/s" not in run.stdout


def test_the_plain_loops_bar_counts_steps_and_its_rate_leaves_out_the_step_taken_before_it_opened(capsys):
    from types import SimpleNamespace

    from rome.pipeline.editors.progress import StepProgress

    progress = StepProgress(units=2, label="memit: batch 1/10", bar=True)
    unit = SimpleNamespace(optimisation=SimpleNamespace(losses=[[5.0], [4.0]], steps=4, p_target=[0.1, 0.3]))
    progress(unit)  # the bar opens after the unit's first step
    shown = capsys.readouterr().err.rstrip().split("\r")[-1]  # the bar as it stands
    assert "memit: batch 1/10 [1/2]" in shown and "1/4" in shown and "loss 4.500, P(target) 0.200" in shown
    assert "?it/s" in shown  # the step taken before the bar opened is no rate (it read thousands a second)
    time.sleep(0.05)
    unit.optimisation.losses = [[5.0, 3.0], [4.0, 2.0]]
    progress(unit)
    shown = capsys.readouterr().err.rstrip().split("\r")[-1]
    assert "2/4" in shown and "loss 2.500" in shown and "?it/s" not in shown
    progress.close()


def test_in_a_log_the_plain_loop_writes_a_line_at_most_every_heartbeat(capsys, monkeypatch):
    """stderr not a terminal (pytest's capture): no bar, but a line once ``heartbeat_s`` has passed, none in
    between; ``bar=False`` writes nothing."""
    from types import SimpleNamespace

    from rome.pipeline.editors import progress as module
    from rome.pipeline.editors.progress import StepProgress

    clock = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    unit = SimpleNamespace(optimisation=SimpleNamespace(losses=[[5.0], [4.0]], steps=25, p_target=[0.1, 0.3]))
    progress = StepProgress(units=10, label="alphaedit: batch 3/10", heartbeat_s=60)
    clock[0] += 59
    progress(unit)  # before the first heartbeat has passed: nothing
    assert capsys.readouterr().err == ""
    clock[0] += 1
    progress(unit)
    assert capsys.readouterr().err == "alphaedit: batch 3/10 [1/10]: step 1/25, loss 4.500, P(target) 0.200\n"
    progress(unit)  # right after a line: nothing
    assert capsys.readouterr().err == ""
    quiet = StepProgress(units=10, label="x", bar=False, heartbeat_s=0.0)
    quiet(unit)
    assert capsys.readouterr().err == ""
