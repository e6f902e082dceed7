"""The README's Python API block, run verbatim on the embedded SmolLM2: it runs as written and prints what the
README says it prints (the seconds aside, each probability within 0.002). Slow: a real model, and C is computed
over the Wikipedia sample when the statistics cache does not hold it yet."""

from __future__ import annotations

import re

import pytest
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
