"""The README's Python API block, run verbatim on the embedded SmolLM2: it runs as written and prints what the
README says it prints (the seconds aside, each probability within 0.002). Slow: a real model, and C is computed
over the Wikipedia sample when the statistics cache does not hold it yet."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OFFLINE, ROOT

pytestmark = pytest.mark.slow

NUMBER = re.compile(r"\d+\.\d+")


def readme_python_api() -> tuple[str, list[str]]:
    """The section's ```python block (the code, verbatim) and its ```text block (what it prints)."""
    section = (ROOT / "README.md").read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    return code, printed.rstrip("\n").splitlines()


def same(expected: str, got: str) -> bool:
    """The same text with the same numbers, each within 0.002; ``...`` in ``expected`` stands for any text."""
    if "..." in expected:
        head, tail = expected.split("...", 1)
        return got.startswith(head) and len(got) >= len(expected) and same(tail, got[len(got) - len(tail) :])
    want, have = NUMBER.findall(expected), NUMBER.findall(got)
    return (
        NUMBER.sub("#", expected) == NUMBER.sub("#", got)
        and len(want) == len(have)
        and all(abs(float(a) - float(b)) <= 2e-3 for a, b in zip(want, have))
    )


def test_the_comparison_rule():
    assert same("  prompt   0.7015   0.0000", "  prompt   0.7020   0.0000")
    assert not same("  prompt   0.7015", "  prompt   0.7100") and not same("answer: Rome", "answer: Paris")
    assert same("  time: ... | x 0.0845 | status: applied", "  time: pre 1.00s, keys 2.0s | x 0.0846 | status: applied")
    assert not same("  time: ... | status: applied", "  time: pre 1.00s | status: rolled_back")


def test_the_readme_python_block_runs_as_written_and_prints_what_it_says(monkeypatch, capsys):
    code, expected = readme_python_api()
    monkeypatch.chdir(ROOT)  # its paths are the repository's, as a reader runs it
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    exec(compile(code, "README.md (## Python API)", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out.splitlines()
    first = next(i for i, line in enumerate(out) if line == expected[0])  # after any line computing C prints
    got = out[first : first + len(expected)]
    assert len(got) == len(expected), "\n".join(out)
    bad = [(want, have) for want, have in zip(expected, got) if not same(want, have)]
    assert not bad, "\n".join(f"README: {want}\nprints: {have}" for want, have in bad)


# ---- the tour: every command of the README, as a reader runs it --------------------------------------------
# One substitution, of size only: the 200-fact trace takes hours on 2 cores; it runs here over the first 7
# records (the dataset path, the known-fact filter, the averages and their plots). Everything else runs verbatim.
SIZE_ONLY = {"trace.n=200": "trace.n=7"}  # records 0-6: one fact SmolLM2 knows (record 6), six it does not


def readme_tour() -> list[tuple[str, str]]:
    """(kind, text) of every command in the README, in order: each ```bash block (a shell script; installs and
    the test command left out) and its inline commands (`rome ask ...`, `python train.py --help`: spans with no
    placeholder), and the step-3 ```python block."""
    text = (ROOT / "README.md").read_text()
    tour = []
    for m in re.finditer(r"```(bash|python)\n(.*?)```|`((?:rome|python train\.py) [^`]*)`", text, re.S):
        kind, code, inline = m.group(1), m.group(2), m.group(3)
        if inline:
            if "..." not in inline and not re.search(r"\b[A-Z]{3,}\b", inline):  # STAGE, DIR: placeholders
                tour.append(("bash", inline))
        elif kind == "python":
            if 'AutoModelForCausalLM.from_pretrained("outputs/' in code:  # step 3; the API block: the test above
                tour.append(("python", code))
        elif "pytest" not in code:
            if "pip install" in code:
                code = code[code.rindex("python train.py") :]  # the install line's last command: the stats stage
            tour.append(("bash", code))
    for size, smaller in SIZE_ONLY.items():
        tour = [(k, c.replace(size, smaller)) for k, c in tour]
    return tour


def test_the_tour_finds_every_command():
    starts = [c.split("=")[0].split()[:3] for _, c in readme_tour()]
    assert [" ".join(s) for s in starts] == [
        "python train.py stage",  # Two commands: the install line's stats stage
        "python train.py stage",  # 1. stats (the same: from the cache now)
        "python train.py stage",  # 2. edit
        "from transformers import",  # 3. query the saved model
        "rome ask model.name",
        "python train.py stage",  # 4. revert
        "python train.py stage",  # 5. trace: one fact, many facts
        "python train.py stage",  # 6. eval
        "python train.py --help",
    ], readme_tour()


def reloaded_probabilities(saved: Path) -> torch.Tensor:
    """P(Rome), P(Paris) after the prompt from the saved model, loaded by plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rome.pipeline.core.probability import target_probs

    tok, model = AutoTokenizer.from_pretrained(saved), AutoModelForCausalLM.from_pretrained(saved)
    return target_probs(model, tok, ["The Eiffel Tower is located in the city of"] * 2, ["Rome", "Paris"], batch_size=2)


def test_every_readme_command_runs_as_written(tmp_path):
    """In a fresh working directory beside ``../shared`` (the README's relative paths), through a shell, on the
    embedded SmolLM2, offline: each command succeeds and prints what the README says it prints."""
    import os
    import subprocess
    import sys

    work, bin_dir = tmp_path / "main", tmp_path / "bin"
    work.mkdir(), bin_dir.mkdir()
    (tmp_path / "shared").symlink_to(ROOT.parent / "shared")
    (work / "train.py").symlink_to(ROOT / "train.py")  # python resolves it: the checkout's rome package
    (bin_dir / "python").symlink_to(sys.executable)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, **OFFLINE, "PATH": path, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}

    def run(kind: str, code: str) -> str:
        argv = ["bash", "-e", "-c", code] if kind == "bash" else ["python", "-c", code]
        done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{code}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    saved = work / "outputs" / "eiffel-rome"
    outputs, reloaded = [], None
    for kind, code in readme_tour():
        if "<run>" in code:  # step 4 names the ledger step 2 printed; before it, the saved model is the edited one
            (ledger,) = (work / "outputs" / "edit").iterdir()
            code = code.replace("<run>", ledger.name)
            reloaded = reloaded_probabilities(saved)
        outputs.append(run(kind, code))
    first_stats, stats, edit, query, ask, revert, trace, evaluation, usage = outputs

    for out in (first_stats, stats):
        assert "layer 6 (model.layers.6.mlp.down_proj): C (1536, 1536) over 200000 tokens" in out
    readme = (ROOT / "README.md").read_text().split("prints, for each request,", 1)[1]
    expected = re.search(r"```\n(.*?)```", readme, re.S).group(1).rstrip("\n").splitlines()
    lines = edit.splitlines()
    first = lines.index(expected[0])
    bad = [(want, have) for want, have in zip(expected, lines[first:]) if not same(want, have)]
    assert not bad, "\n".join(f"README: {want}\nprints: {have}" for want, have in bad)
    assert "status: applied" in edit and (work / "outputs" / "eiffel-rome" / "model.safetensors").exists()
    assert query.startswith(" Rome")  # the saved model, loaded by plain transformers
    assert "Rome" in ask.split("unedited", 1)[0] and "Paris" in ask  # edited beside unedited
    # plain transformers reloads the edited model and agrees with the edit's own numbers (README: 0.9988, 0.0000)
    entry = json.loads((ledger / "ledger.json").read_text())["entries"][0]
    post = entry["probs"]["post"]["prompt"]
    torch.testing.assert_close(reloaded, torch.tensor([post["new"][0], post["true"][0]]), rtol=1e-3, atol=1e-5)
    # revert: the model saved again is the base model, bitwise (README step 4)
    assert "reverted edit(s)" in revert
    from safetensors.torch import load_file

    from rome.pipeline.core.loading import load_model

    base = load_model("smollm2-135m", device="cpu").model.state_dict()
    back = load_file(saved / "model.safetensors")
    assert back and all(torch.equal(t, base[name]) for name, t in back.items())

    (fact,) = [p for p in (work / "outputs" / "trace").iterdir() if p.name.startswith("The_Eiffel_Tower")]
    for kind in ("hidden", "mlp", "attn"):
        assert (fact / f"{kind}.png").stat().st_size > 5000 and (fact / f"{kind}.pdf").exists()
    # what docs/trace.md reads from it: recalled from the subject's informative token ('iffel', not the
    # predictable ' Tower') through early MLPs; attention carries it to the last token in late layers
    from rome.pipeline.tracing.engine import TraceResult

    res, _ = TraceResult.load(fact / "scores.npz")
    assert res.answer.strip() == "Paris" and res.subject == (0, 4) and res.p_clean > 0.6 and res.p_corrupted < 0.1
    n = res.effects["mlp"].shape[1]
    mlp_subject = res.effects["mlp"][res.subject[0] : res.subject[1]]
    tok, layer = np.unravel_index(int(mlp_subject.argmax()), mlp_subject.shape)
    assert res.tokens[tok] == "iffel" and mlp_subject.max() > 0.2 and layer < n // 3
    assert res.effects["attn"][-1].max() > 0.3 and res.effects["attn"][-1].argmax() >= n // 2
    assert (work / "outputs" / "trace" / "summary.json").exists()  # the dataset run (trace.n=1)

    table = (work / "outputs" / "eval-tour" / "table.md").read_text()
    assert "| rome |" in table and "gen" in table, table  # the generative columns beside the paper's
    assert "usage: python train.py stage=STAGE" in usage
