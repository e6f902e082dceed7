"""benchmarks/gpu_check.py runs on a CPU too (``--tiny``: a tiny random Llama, small counts): every row of the
GPU check is printed with a value and a verdict, no step fails or runs out of time, and the numerical rows
(C's precision, C with 2 workers vs 1, batched vs alone δ) pass."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import OFFLINE, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_check import NUMERICAL, ROWS  # noqa: E402


@pytest.mark.slow  # a few minutes on a CPU: every step of the check, with its Trainers and dataloader workers
def test_the_gpu_check_runs_on_a_cpu_and_prints_every_row(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu", "--json", str(out)]
        + ["--profile", str(tmp_path / "profile")],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE},
        timeout=1800,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [row["key"] for row in rows] == [key for key, *_ in ROWS]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| measure")]
    assert len(table) == len(ROWS)
    for row, line in zip(rows, table):
        assert row["value"] and row["verdict"], row
        assert row["verdict"] not in ("FAIL", "TIMEOUT"), row
        assert line.startswith(f"| {row['measure']} | {row['value']} |") and line.endswith(f"| {row['verdict']} |")
        if row["key"] in NUMERICAL:
            assert row["verdict"] == "PASS", row
        else:  # timing and memory goals are the 8B shape's on a GPU
            assert row["verdict"].startswith("n/a") or row["verdict"] == "info", row
    assert "timing only" in r.stdout
    profiled = {row["key"]: row for row in rows}["profile"]["data"]  # two edits under torch.profiler, one request
    assert set(profiled) == {"new", "repeat"} and all(
        p["wall_s"] > 0 and "v_star" in p["phases"] for p in profiled.values()
    )
    assert sorted(f.name for f in (tmp_path / "profile").iterdir()) == [
        "profile_new.txt",
        "profile_repeat.txt",
        "trace_repeat.json.gz",
    ]


def test_the_ultraedit_scale_check_runs_on_a_cpu(tmp_path, capsys):
    """benchmarks/ultraedit_scale.py (issue 19's GPU number: edits/s at 20,000 edits on the 8B shape) on the tiny
    shape: every batch timed, the statistics counted over every batch, a stop by --seconds said as such."""
    import ultraedit_scale

    out = tmp_path / "ue.json"
    assert ultraedit_scale.main(["--shape", "llama-tiny", "--edits", "25", "--batch", "10", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [n for n, _ in result["batches"]] == [10, 20, 25] and result["edits"] == 25
    assert result["statistics_rows"]["stats.shared"] > 25  # a row per target-predicting position of every request
    assert "25 edits in " in capsys.readouterr().out
    assert ultraedit_scale.main(["--shape", "llama-tiny", "--edits", "30", "--batch", "10", "--seconds", "0"]) == 0
    assert "(stopped by --seconds 0 after 10 of 30)" in capsys.readouterr().out


def test_key_overlap_share_is_the_ridge_hat_energy():
    """benchmarks/key_overlap.py's share kᵀPk / kᵀk, P = Hᵀ(HHᵀ + λI)⁻¹H: for keys H = e1..e3 (unit rows) P is
    diag(1/(1+λ)) on their span and 0 off it, so e1 gives 1/(1+λ), e4 gives 0 and (e1 + e4)/√2 half of e1's."""
    import torch
    from key_overlap import hat_share

    h = torch.eye(6, dtype=torch.float64)[:3]
    k = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0], [1, 0, 0, 1, 0, 0]], dtype=torch.float64)
    assert hat_share(h, k, ridge=1.0).tolist() == pytest.approx([0.5, 0.0, 0.25])
    assert hat_share(h, k, ridge=1e-9)[0] == pytest.approx(1.0)


def test_step_ops_counts_launches_and_host_reads_per_v_star_step(capsys):
    """benchmarks/step_ops.py (what a v* step asks of the device, counted by the CPU profiler) on the tiny shape:
    a row per loop; our loop reads device values on the host fewer times per step than the original's (its
    one read per step, where the original reads the loss and the norms)."""
    import step_ops

    assert step_ops.main(["--shape", "llama-tiny", "--steps", "3"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| the ")]
    assert [r.split(" | ")[0] for r in rows] == ["| the edit stage (fit_edits)", "| the original's loop"]
    ops, reads = ([float(r.split(" | ")[i].replace(",", "")) for r in rows] for i in (2, 3))
    assert all(n > 100 for n in ops)  # six layers' forward and backward: hundreds of launches a step
    assert reads[0] < reads[1]
    x = torch.ones(3, 4)
    counted = step_ops.computing_ops(_events_of(lambda: torch.mm(x.view(4, 3), x).t()))
    assert counted == {"aten::mm": 1}  # the view and the transpose launch nothing


def _events_of(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.events()


@pytest.mark.slow  # about a minute: the compiler builds four graphs for the one block after the edited one
def test_compile_lever_gives_the_eager_delta_from_compiled_blocks(capsys):
    """benchmarks/compile_lever.py (the fusion lever: the blocks after the edited one compiled) on the tiny shape:
    a row per edit; in float32 the compiled blocks give the eager δ, and the compiler really built graphs (the
    recompile limit raised, so no block silently fell back to eager)."""
    import compile_lever

    before = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    assert compile_lever.main(["--shape", "llama-tiny", "--num-layers", "5", "--cases", "2"]) == 0
    assert {k: os.environ.get(k) for k in before} == before  # the empty caches were the run's own
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2
    assert all(float(r[4].rstrip(" |")) < 1e-4 for r in rows), rows
    graphs = int(out.split("graphs compiled: ")[1].split(";")[0].split()[0])
    assert 0 < graphs < 256 and "the limit" not in out
