"""The HTML report (pipeline/report, stage=report): real outputs of every kind the stages write, made on tiny
models (a traced fact, a traced dataset, an edit ledger of ROME and of MEMIT, a per-case eval and a sequential
eval), each reported and opened in headless Chromium: the page renders (a screenshot that is not blank), every
section's heading is in the rendered DOM, and the browser logs nothing on its console (the page's
Content-Security-Policy turns any script or outside request into a console message, so none means none)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA, tiny_edit_args

from rome.pipeline.core.loading import load_model
from rome.pipeline.core.probability import greedy_tokens
from rome.pipeline.errors import UserError
from rome.pipeline.report import detect_kind, render_report, write_report
from rome.pipeline.report import html as report_html
from rome.pipeline.report.page import MARKER, markdown

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
COUNTERFACT = DATA / "counterfact" / "counterfact-edit.json"
REQUEST = '{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}'


def _main(*argv: object) -> tuple[int, str]:
    """``python train.py argv`` in this process: (exit code, stdout and stderr)."""
    from rome import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = cli.main([str(a) for a in argv])
    return code, buf.getvalue()


def _known_facts(model_dir: Path, path: Path) -> None:
    """Two facts the tiny model 'knows': its own greedy answer is the attribute (the trace stage keeps only
    facts the model predicts)."""
    lm = load_model(str(model_dir), device="cpu")
    records = []
    for i, (template, subject) in enumerate(
        [("{} is located in the city of", "The Eiffel Tower"), ("The capital of {} is", "France")]
    ):
        text = template.replace("{}", subject)
        answer = lm.tokenizer.decode(greedy_tokens(lm.model, torch.tensor([lm.tokenizer(text)["input_ids"]]), 2))
        records.append(
            {"known_id": i, "subject": subject, "template": template, "prompt": text, "attribute": answer.strip()}
        )
    path.write_text(json.dumps(records))


@pytest.fixture(scope="module")
def outputs(tiny_model_dir, small_wiki, tmp_path_factory) -> dict[str, Path]:
    """One output directory of each kind, written by the stages themselves (eval and trace write their
    report.html at the end; the ledgers get theirs from stage=report in the tests)."""
    root = tmp_path_factory.mktemp("report")
    model = tiny_model_dir("llama")
    shared = root / "shared"
    common = [f"model.name={model}", "model.device=cpu", f"model.cache_dir={shared / 'cache'}"]
    trace = [*common, "trace.samples=2", "trace.window=2"]
    out = {kind: root / kind for kind in ("trace", "trace_dataset", "edit", "edit_memit", "eval", "eval_scale")}
    code, log = _main(
        "stage=trace", *trace, f"trace.out={out['trace']}", "prompt={} is in", "subject=Paris", "answer=Paris"
    )
    assert code == 0, log
    _known_facts(model, root / "facts.json")
    code, log = _main(
        "stage=trace", *trace, f"trace.out={out['trace_dataset']}", f"trace.dataset={root / 'facts.json'}"
    )
    assert code == 0 and "kept 2 of 2 facts" in log, log
    edit = [*tiny_edit_args(model, small_wiki, shared, v_steps=3), "edit.generate_tokens=4", f"request={REQUEST}"]
    code, log = _main("stage=edit", *edit, "edit.verify.enabled=true", f"edit.out={out['edit']}")
    assert code == 2 and "failed verification" in log and (out["edit"] / "ledger.json").is_file(), log
    code, log = _main(
        "stage=edit",
        *edit,
        "edit.method=memit",
        "edit.layers=[1,2]",
        "edit.memit.v.steps=2",
        f"edit.out={out['edit_memit']}",
    )
    assert code == 0, log
    evaluation = [
        *tiny_edit_args(model, small_wiki, shared, v_steps=2),
        f"eval.dataset={COUNTERFACT}",
        "eval.n=2",
        "eval.generation.tokens=3",
        "eval.generative.max_tokens=3",
    ]
    code, log = _main("stage=eval", *evaluation, "eval.methods=[none,rome]", f"eval.out={out['eval']}")
    assert code == 0, log
    code, log = _main(
        "stage=eval",
        *evaluation,
        "eval.mode=sequential",
        "eval.methods=[rome]",
        "eval.batch_size=1",
        "eval.heldout.articles=5",
        "eval.heldout.max_length=32",
        "eval.known.n=20",
        f"eval.out={out['eval_scale']}",
    )
    assert code == 0, log
    return out


# each kind's section headings (the <h2> of every section the page has for these outputs)
SECTIONS = {
    "trace": ["Facts (1)", "Heatmaps"],
    "trace_dataset": ["Overview", "Average indirect effects", "Recommended layer", "Facts (2)", "Heatmaps"],
    "edit": ["Overview", "Edits"],
    "edit_memit": ["Overview", "Edits"],
    "eval": ["Results", "Chart", "Cases (4)", "Answers before and after", "Timing", "Run"],
    "eval_scale": ["Results", "Curve", "Checkpoints", "Run"],
}


def _chromium(page: Path, shot: Path, tmp: Path) -> tuple[str, str]:
    """Open ``page`` in headless Chromium with no network and a fresh profile: a screenshot into ``shot``;
    returns (the DOM after rendering, the browser's log)."""
    profile = tmp / f"profile-{shot.stem}"
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={shot}",
            "--dump-dom",
            "--window-size=1200,3000",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, result.stderr


def _console(log: str) -> list[str]:
    return [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def _needs_chromium() -> None:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium): the report is not opened in a browser")


def _blank(png: Path) -> float:
    """The pixel variance of a screenshot (0: one colour, nothing drawn)."""
    import matplotlib.image

    return float(matplotlib.image.imread(str(png))[..., :3].var())


@pytest.mark.parametrize("kind", list(SECTIONS))
def test_report_renders_in_chromium(outputs, kind, tmp_path):
    _needs_chromium()
    directory = outputs[kind]
    if kind.startswith("edit"):  # the ledgers: through the rome command's positional form
        code, log = _rome("report", directory)
        assert code == 0 and f"report: {directory / 'report.html'}" in log, log
    page = directory / "report.html"  # eval and trace runs wrote theirs at the end
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>\n" + MARKER)
    # one file: images inline, no script, no link to anything outside it
    assert "<script" not in html and "http://" not in html and "https://" not in html and "<link" not in html
    assert ("data:image/png;base64," in html) == (not kind.startswith("edit"))
    dom, log = _chromium(page, tmp_path / f"{kind}.png", tmp_path)
    assert _console(log) == []
    for heading in SECTIONS[kind]:
        assert f"<h2>{heading}</h2>" in dom, heading
    assert (tmp_path / f"{kind}.png").stat().st_size > 10_000 and _blank(tmp_path / f"{kind}.png") > 1e-3


def test_chromium_console_is_read(tmp_path):
    """The check above can fail: a page with a script (blocked by the same policy) logs on the console."""
    _needs_chromium()
    page = Path(tmp_path / "bad.html")
    policy = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    page.write_text(
        f'<!DOCTYPE html><meta http-equiv="Content-Security-Policy" content="{policy}">'
        '<h2>x</h2><img src="https://example.invalid/x.png"><script>console.log(1)</script>'
    )
    _, log = _chromium(page, tmp_path / "bad.png", tmp_path)
    assert len(_console(log)) == 2  # the image request and the script, both refused


def test_page_contents(outputs, monkeypatch):
    """What each page says, from the stages' own files."""
    trace = (outputs["trace"] / "report.html").read_text()
    assert "Paris is in" in trace and "P(answer) clean" in trace and trace.count("data:image/png") == 3
    dataset = json.loads((outputs["trace_dataset"] / "summary.json").read_text())
    page = (outputs["trace_dataset"] / "report.html").read_text()
    assert f'<tr><th>recommended edit layer</th><td class="num">{dataset["recommended_layer"]}</td></tr>' in page
    assert page.count('<tr class="highlight">') == 1  # the recommended layer's row
    assert page.count("data:image/png") == 4 + 2 * 3  # 3 AIE heatmaps + the lines; 2 facts x 3 heatmaps
    monkeypatch.setattr(report_html, "HEATMAP_FACTS", 1)  # a long dataset: only the first facts' heatmaps
    page = render_report(outputs["trace_dataset"])
    assert page.count("data:image/png") == 4 + 3 and "the first 1 of 2; all of them are in facts/" in page
    ledger = json.loads((outputs["edit"] / "ledger.json").read_text())
    (entry,) = ledger["entries"]
    page = render_report(outputs["edit"])
    assert "The Eiffel Tower is located in the city of → Rome" in page
    assert f"{entry['probs']['post']['prompt']['new'][0]:.4f}" in page  # P(new) after, on the prompt
    assert "The Eiffel Tower is located in the city of" + _escaped(entry["generations"]["post"]) in page
    # three v* steps on a random model: the edit does not take, is rolled back, and the page says what it gave
    assert entry["status"] == "rolled_back" and 'class="status-rolled_back"' in page and "P(new) rejected edit" in page
    assert f"{entry['probs']['rejected']['prompt']['new'][0]:.4f}" in page
    memit = render_report(outputs["edit_memit"])
    (batch,) = json.loads((outputs["edit_memit"] / "ledger.json").read_text())["entries"]
    assert "edit 1: memit" in memit and "<tr><th>layer</th><th>1</th><th>2</th></tr>" in memit
    assert f'<td class="num">{batch["p_target"][0]:.4f}</td>' in memit  # P(new) its target value reached
    table = (outputs["eval"] / "table.md").read_text()
    page = (outputs["eval"] / "report.html").read_text()
    assert "| Method | n | S |" in table and "<th>Method</th><th>n</th><th>S</th>" in page
    assert "Generative (gen), greedy continuations:" in page
    scale = json.loads((outputs["eval_scale"] / "summary.json").read_text())
    page = (outputs["eval_scale"] / "report.html").read_text()
    assert [p["edits"] for p in scale["methods"]["rome"]["curve"]] == [1, 2]
    assert page.count('<td class="num">1</td><td class="num">1</td>') == 1  # checkpoint 1: 1 edit, 1 case scored
    assert scale["methods"]["rome"]["collapse_point"] in page


def _escaped(s: str) -> str:
    from rome.pipeline.report.page import text

    return text(s)


def _rome(*argv: object) -> tuple[int, str]:
    """The ``rome`` console script (cli.cli) in this process."""
    from rome import cli

    buf, old = io.StringIO(), sys.argv
    sys.argv = ["rome", *map(str, argv)]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            code = cli.cli()
    finally:
        sys.argv = old
    return code, buf.getvalue()


def test_rome_command_and_refusals(outputs, tmp_path, monkeypatch):
    code, log = _rome()
    assert code == 0 and "rome report DIR" in log and "report   one HTML page" in log  # bare rome: the help
    code, log = _rome("report", tmp_path)
    assert code == 2 and log.strip() == (
        f"error: report.dir={tmp_path} holds no output a report reads: expected an eval.out (summary.json), a "
        "trace.out (summary.json or fact directories with scores.npz) or an edit.out (ledger.json)"
    )
    code, log = _rome("report")
    assert code == 2 and "nothing to report" in log
    code, log = _rome("report", f"ledger={outputs['edit']}", f"report.out={tmp_path / 'ledger.html'}")
    assert code == 0 and log.strip() == f"report: {tmp_path / 'ledger.html'}"  # the other stages' key for an edit.out
    assert "The Eiffel Tower is located in the city of → Rome" in (tmp_path / "ledger.html").read_text()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "2026-12-04").mkdir()
    code, log = _rome("report", "2026-12-04")  # the directory as typed: text, never a YAML date
    assert code == 2 and log.startswith("error: report.dir=2026-12-04 holds no output a report reads")
    # another path (report.out=), and never over a file of the user's
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my notes</html>")
    code, log = _rome("report", outputs["trace"], f"report.out={mine}")
    assert code == 2 and "is not a report this project wrote; nothing was touched" in log
    assert mine.read_text() == "<html>my notes</html>"
    ours = tmp_path / "pages" / "trace.html"
    assert write_report(outputs["trace"], ours) == ours and write_report(outputs["trace"], ours) == ours  # replaced
    assert [p.name for p in ours.parent.iterdir()] == ["trace.html"]  # no temporary left beside it
    assert detect_kind(outputs["eval_scale"]) == "eval_scale" and detect_kind(outputs["edit_memit"]) == "edit"
    with pytest.raises(UserError, match="is not a directory"):
        detect_kind(tmp_path / "nope")


def test_a_failed_report_does_not_fail_the_run(outputs, monkeypatch, capsys):
    """The report at the end of a run is a warning when it fails; the run's results stand."""
    monkeypatch.setattr(report_html, "render_report", lambda d: 1 / 0)
    assert report_html.report_after_run(outputs["trace"], True) is None
    assert capsys.readouterr().out.startswith("warning: no report written (ZeroDivisionError: division by zero)")
    assert report_html.report_after_run(outputs["trace"], False) is None and capsys.readouterr().out == ""


def test_markdown_is_escaped_and_tables_read():
    html = markdown(
        "**T <b>**\n\nCaption:\n\n| a | b |\n|---|---|\n| <script>x</script> | 1.5 ± 0.2 |\n\n- note & more\n"
    )
    assert html.startswith("<p><strong>T &lt;b&gt;</strong></p>")
    assert "<thead><tr><th>a</th><th>b</th></tr></thead>" in html
    assert '<td>&lt;script&gt;x&lt;/script&gt;</td><td class="num">1.5 ± 0.2</td>' in html
    assert "<ul><li>note &amp; more</li></ul>" in html
