"""The software and hardware a result was computed with, recorded beside it (statistics manifests, evaluation
summaries).

Why: the same command on the same machine gives the same numbers bit for bit, but the thread count alone moves
one ROME edit by ~1e-6 (the order of float sums), and a sequence of edits amplifies that to a known fact or two
after 20 edits (docs/many-edits.md, "What running a command again changes"). A number is only reproducible
together with this record.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment"]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions, CPU, torch's intra-op thread count and, for a CUDA ``device``, the GPU and CUDA version."""
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
    }
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info
