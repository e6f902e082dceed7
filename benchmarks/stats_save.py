"""What saving one layer's C costs after the statistics pass, at a 7B model's size: ``python benchmarks/stats_save.py``.

Issue 21's row "stats: whole call minus the pass" (goal ≤ 2 s; 8.5 s measured on an H200 host): after the
streaming pass the stage divides the running sums by the token count, writes C as safetensors (atomically) and
checksums the file (``StatsEntry.save``). At Llama-3-8B's d_ff (14,336) C is 14,336² float64 values, 1.6 GB. This
times ``StatsEntry.save`` on random sums of that size on the CPU, both ways it can divide, alternately:

- ``copy``: C = total / count into a new d x d tensor (the stage's way before 2026-12-07; still the way for a
  caller that keeps its sums);
- ``in place``: total divided in place (``in_place=True``, the stats stage's way now: its sums are not read
  after the pass).

The two ways take turns going first (the process's first save also pays for the first 1.6 GB it takes from the
system, as a stats run's one save does).

The files go to ``--dir`` (default: a directory under /dev/shm where it exists, so that the disk's writeback,
which moves a 1.6 GB write on this project's VM between 0.4 and 4 s, does not mix in; name a disk directory to
see it). Each run's seconds are printed, then the median of each way.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rome.pipeline.stats.store import StatsEntry, StatsKey  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-ff", type=int, default=14336, help="C's side (default: Llama-3-8B's d_ff)")
    parser.add_argument("--repeats", type=int, default=4, help="runs of each way, alternately")
    parser.add_argument("--dir", default=None, help="where the files go (default: under /dev/shm if present)")
    args = parser.parse_args(argv)
    parent = args.dir or ("/dev/shm" if Path("/dev/shm").is_dir() else None)
    root = Path(tempfile.mkdtemp(prefix="stats-save-", dir=parent))
    key = StatsKey({"name": "timing", "revision": "-"}, "bfloat16", {"files": "-"}, 1024, 1, "float64", "fp32")
    sums = torch.randn(args.d_ff, args.d_ff, dtype=torch.float64)
    size = sums.numel() * sums.element_size()
    threads = torch.get_num_threads()
    print(f"C of {args.d_ff} x {args.d_ff} float64 ({size / 2**30:.2f} GiB), files in {root}; {threads} threads")
    seconds: dict[bool, list[float]] = {False: [], True: []}
    try:
        for run in range(args.repeats):
            for in_place in (False, True) if run % 2 == 0 else (True, False):  # each way first in turn
                total = sums.clone()
                entry = StatsEntry(root / f"run{run}-{'in-place' if in_place else 'copy'}", key)
                started = time.perf_counter()
                saved = entry.save(5, "model.layers.5.mlp.down_proj", total, 1000, in_place=in_place)
                seconds[in_place].append(time.perf_counter() - started)
                print(f"{'in place' if in_place else 'copy':>8}: {seconds[in_place][-1]:.2f} s", flush=True)
                del total, saved
                shutil.rmtree(entry.dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for in_place, runs in seconds.items():
        print(f"median, {'in place' if in_place else 'copy'}: {statistics.median(runs):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
