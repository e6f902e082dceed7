"""The stats stage stopped by real signals sent to the process group of a real ``python train.py``:
SIGTERM / SIGINT finish the batch, save the partial state, print one line and exit 143 / 130 (the
dataloader worker ignores them); the same command resumes ("resuming from N tokens", the progress bar
starting at N) to statistics identical to an uninterrupted run, as it does after SIGKILL (from the last
checkpoint). Lightning's SLURM requeue (SIGUSR1, then the SIGTERM with which SLURM ends the job) works with
the partial state."""

import os
import re
import signal
import stat
from pathlib import Path

import pytest
import torch
from conftest import WIKI, run_cli, run_main, signal_run
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # several real processes each
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TOKENS = 12000


def args(model_dir, stats_dir):
    return (
        "stage=stats",
        f"model.name={model_dir}",
        f"data.files={WIKI}",
        f"stats.dir={stats_dir}",
        "data.max_length=24",
        "data.batch_tokens=48",
        "data.sort_window=16",
        "trainer.accelerator=cpu",
        "stats.layers=[2]",
        f"stats.tokens={TOKENS}",
        "stats.checkpoint_every_batches=20",
    )


def statistics(stats_dir: Path) -> dict:
    (f,) = stats_dir.glob("*/layer_2.safetensors")
    return load_file(f)


def checkpointed(stats_dir: Path):
    """``signal_run``'s readiness: the run has written its first checkpoint (so it is well under way)."""
    return lambda lines: bool(list(stats_dir.glob("*/partial/rank0.pt")))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    r = run_main(*args(tiny_model_dir("gpt2"), out))
    assert r.returncode == 0, r.stderr
    return statistics(out)


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_prints_one_line_exits_and_the_same_command_resumes(
    tiny_model_dir, reference, tmp_path, signum, code
):
    cmd = args(tiny_model_dir("gpt2"), tmp_path)
    rc, lines = signal_run(cmd, signum, checkpointed(tmp_path), env=OFFLINE)
    assert rc == code, "\n".join(lines[-30:])
    stops = [line for line in lines if line.startswith("interrupted:")]
    assert len(stops) == 1, "\n".join(lines[-30:])
    found = re.fullmatch(
        r"interrupted: partial statistics \(([\d,]+) tokens\) saved in (\S+); to resume, run the same command", stops[0]
    )
    assert found and Path(found.group(2)).is_dir(), stops[0]
    saved = int(found.group(1).replace(",", ""))
    # the worker was not killed under it
    assert not any("Traceback" in line or "DataLoader worker" in line for line in lines)
    partial = torch.load(next(tmp_path.glob("*/partial/rank0.pt")), weights_only=True)
    assert partial["count"] == saved and 0 < saved < TOKENS  # the state of the batch it finished, not an older one
    assert not list(tmp_path.glob("*/layer_2.safetensors"))

    resumed = run_main(*cmd)  # in this process: a resume needs no process of its own
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {saved:,} tokens" in resumed.stdout
    first = re.search(r"tokens:\s+\d+%\|[^|]*\|\s*([\d.]+)(k?)/", resumed.stderr)  # the bar's first frame
    assert first and float(first.group(1)) * (1000 if first.group(2) else 1) >= saved * 0.99
    got = statistics(tmp_path)
    assert int(got["count"]) == int(reference["count"]) == TOKENS
    assert torch.equal(got["second_moment"], reference["second_moment"])  # bit for bit
    assert not list(tmp_path.rglob("partial")) and not list(tmp_path.rglob("*.tmp"))


def test_sigkill_then_same_command_resumes_to_identical_statistics(tiny_model_dir, reference, tmp_path):
    cmd = args(tiny_model_dir("gpt2"), tmp_path)
    rc, _ = signal_run(cmd, signal.SIGKILL, checkpointed(tmp_path), env=OFFLINE)
    assert rc == -signal.SIGKILL
    partial = torch.load(next(tmp_path.glob("*/partial/rank0.pt")), weights_only=True)
    assert 0 < partial["count"] < TOKENS
    assert not list(tmp_path.glob("*/layer_2.safetensors"))
    resumed = run_main(*cmd)  # in this process: a resume needs no process of its own
    assert resumed.returncode == 0, resumed.stderr
    got = statistics(tmp_path)
    assert int(got["count"]) == TOKENS and torch.equal(got["second_moment"], reference["second_moment"])
    assert not list(tmp_path.rglob("partial")) and not list(tmp_path.rglob("*.tmp"))


def test_slurm_requeue_then_sigterm_resumes(tiny_model_dir, reference, tmp_path):
    """What a requeued SLURM job goes through: SIGUSR1 (``--signal=SIGUSR1@90``, to every process of the
    step) makes Lightning checkpoint and run ``scontrol requeue``; SLURM then ends the job with SIGTERM; the
    requeued job runs the same command. A fake ``scontrol`` records the requeue and sends that SIGTERM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path / "requeued"}\nkill -s TERM 0\n'
    )  # SLURM ends the job it requeues: SIGTERM to the whole process group
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "rome-stats",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        **OFFLINE,
    }
    cmd = args(tiny_model_dir("gpt2"), tmp_path / "stats")
    rc, lines = signal_run(cmd, signal.SIGUSR1, checkpointed(tmp_path / "stats"), env=slurm)
    assert rc == 143, "\n".join(lines[-30:])
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    assert list((tmp_path / "stats").glob("*/partial/hpc_ckpt_*.ckpt"))  # Lightning's, beside our partial state
    resumed = run_cli(*cmd, env=slurm)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    got = statistics(tmp_path / "stats")
    assert torch.equal(got["second_moment"], reference["second_moment"])
    assert not list((tmp_path / "stats").rglob("partial"))


def test_a_worker_prints_no_traceback_when_the_main_process_drops_a_transfer():
    """A dataloader worker serves its batches' file descriptors from multiprocessing's resource-sharer thread,
    which prints its errors through ``sys.excepthook``; a main process stopped at once by a second Ctrl+C resets
    that connection. The worker's hook leaves the sharer's lost connection unprinted and passes everything else
    on as before."""
    import os as _os
    import sys
    import threading
    import traceback

    from rome.pipeline.core.signals import ignore_resource_sharer_resets

    def raised_in(filename: str):
        namespace: dict = {}
        exec(compile("def serve():\n    raise ConnectionResetError(104, 'reset')\n", filename, "exec"), namespace)
        try:
            namespace["serve"]()
        except ConnectionResetError:
            return sys.exc_info()

    sharer = _os.path.join(_os.path.dirname(threading.__file__), "multiprocessing", "resource_sharer.py")
    passed_on = []
    before = sys.excepthook
    sys.excepthook = lambda exc_type, exc, tb: passed_on.append(traceback.extract_tb(tb)[-1].filename)
    ignore_resource_sharer_resets()
    try:
        for filename in (sharer, "elsewhere.py"):
            sys.excepthook(*raised_in(filename))
    finally:
        sys.excepthook = before
    assert passed_on == ["elsewhere.py"]
