"""benchmarks/paired_runs.py: one method's scores in two eval runs, paired by case, with the flips counted and an
exact two-sided sign test (6 wins to none: p = 2/64)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

from paired_runs import sign_test  # noqa: E402


def test_sign_test_is_the_exact_two_sided_binomial():
    assert sign_test(6, 0) == pytest.approx(2 / 64)
    assert sign_test(7, 4) == pytest.approx(2 * sum([1, 11, 55, 165, 330]) / 2**11)
    assert sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0


def test_two_runs_are_paired_by_case_and_their_flips_counted(tmp_path):
    def run(name, es_by_case):
        out = tmp_path / name
        out.mkdir()
        with open(out / "cases.rank0.jsonl", "w") as f:
            for case, es in es_by_case.items():
                for method in ("none", "rome"):
                    f.write(json.dumps({"index": case, "method": method, "post": {"es": es, "ps": 0.5}}) + "\n")
        return out

    a = run("a", {1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0})
    b = run("b", {2: 1.0, 3: 1.0, 4: 0.0, 5: 1.0})  # case 1 only in a, 5 only in b
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "paired_runs.py"), str(a), str(b), "--metrics", "es", "ps"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "rome: 3 cases scored in both" in r.stdout
    assert "| es | 33.3 ± " in r.stdout and "| 2/1 | 1.000 |" in r.stdout
    assert "| ps | 50.0 ± 0.0 | 50.0 ± 0.0 | 0/0 | 1.000 |" in r.stdout
    none = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "paired_runs.py"), str(a), str(b), "--method", "memit"],
        capture_output=True,
        text=True,
    )
    assert none.returncode != 0 and "no case that both" in none.stderr
