"""What one v* step asks of the device, counted on any machine: ``python benchmarks/step_ops.py``.

A bf16 v* step of a 7-8B model does ~10 ms of tensor-core arithmetic on an H100/H200, yet issue 21 measured
2.5-2.8 s for 20 steps: the loop waits on something other than arithmetic. In eager PyTorch every operator
that computes (not a view) is at least one kernel launch, dispatched from Python through autograd, and every
read of a device value on the host (``.item()``, ``.tolist()``) stops the host until the device catches up.
Both counts are properties of the program, not the device, so the CPU profiler counts them exactly: this
runs one ROME edit (``--steps`` v* steps, early stop off) through the edit stage's loop (``fit_edits``) and
through the original's full-forward loop (``edit_latency.reference_edit``), under ``torch.profiler``, and
prints per v* step the computing operators (leaf ATen ops that are not views, reshapes or allocations: the
kernel launches on a GPU, to within the few ops that launch two) and the host reads of device values. The
device's own side (how long those launches take there, the device's busy time) is the ``--profile`` of
``benchmarks/gpu_check.py``.

    python benchmarks/step_ops.py --dtype bfloat16 data.files=../shared/data/wikipedia/wikipedia_en_sample.jsonl.gz \
        stats.tokens=50000                           # SmolLM2 at its edit layer, bf16, on the CPU
    python benchmarks/step_ops.py --shape llama-tiny  # a tiny random Llama (seconds)

The overrides after the options go to the configuration (``data.files=...``, ``stats.tokens=...``: C comes from
the statistics cache, computed when missing; a ``--shape`` model gets a random C).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from edit_latency import reference_edit  # noqa: E402
from edit_latency import requests as edit_requests  # noqa: E402
from shapes import add_model_arguments, model_and_config, statistics_for  # noqa: E402

# ATen ops that compute nothing on the device: views, reshapes, metadata and allocations (no kernel launch)
NO_LAUNCH = {
    "aten::" + name
    for name in (
        "as_strided view _unsafe_view _reshape_alias reshape resolve_conj resolve_neg empty empty_strided "
        "empty_like t transpose expand slice select unsqueeze squeeze permute detach alias lift_fresh split "
        "narrow chunk unbind to _to_copy contiguous result_type is_nonzero item _local_scalar_dense set_ "
        "dim size stride numpy_T"
    ).split()
}
HOST_READ = "aten::_local_scalar_dense"  # .item(), .tolist(), float(t), bool(t): the host waits for the device


def computing_ops(events) -> Counter:
    """The leaf computing ops among ``events``: an op counts when none of its ATen children computes (so a
    composite such as ``aten::linear`` counts once, through its ``aten::mm``)."""

    def computes(e) -> bool:
        return e.name.startswith("aten::") and e.name not in NO_LAUNCH

    return Counter(e.name for e in events if computes(e) and not any(computes(c) for c in e.cpu_children))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="v* steps, every one taken (early stop off)")
    p.add_argument("--top", type=int, default=8, help="the most frequent ops to name")
    add_model_arguments(p)
    args, overrides = p.parse_known_args(argv)
    from rome.cli import quiet

    quiet()  # no framework banners or tips (the CLI's settings)
    warnings.filterwarnings("ignore")
    from torch.profiler import ProfilerActivity, profile

    from rome.modules.edit_loop import fit_edits
    from rome.pipeline.editors.factory import build_editor

    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    cfg, loaded = model_and_config(
        args,
        [
            f"edit.v.steps={args.steps}",
            "edit.v.early_stop_loss=0.0",
            "edit.generate_tokens=0",
            "edit.verify.enabled=false",
            f"trainer.accelerator={accelerator}",
            *overrides,
        ],
    )
    editor = build_editor(cfg, loaded, statistics=statistics_for(args, cfg, loaded))
    weight = loaded.spec.down_proj_weight(loaded.model, editor.layer)
    clean = weight.detach().clone()
    request = edit_requests(3)[-1]
    runs = {
        "the edit stage (fit_edits)": lambda: fit_edits(editor, [request], cfg, progress=False)[0],
        "the original's loop": lambda: reference_edit(editor, request, cfg.edit),
    }
    for run in runs.values():  # once unprofiled: first-use costs stay out of the counts
        run()
        with torch.no_grad():
            weight.copy_(clean)
    model = f"random {args.shape} (timing only)" if args.shape else args.model
    print(f"{model}, {args.dtype}, {args.device}; ROME at layer {editor.layer}, {args.steps} v* steps, early stop off")
    print("| loop | v* s | computing ops per step | host reads per step | most frequent ops (whole edit) |")
    print("|---|---|---|---|---|")
    for label, run in runs.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            edit = run()
            wall = time.perf_counter() - started
        with torch.no_grad():
            weight.copy_(clean)
        events = prof.events()
        ops = computing_ops(events)
        reads = sum(e.name == HOST_READ for e in events)
        steps = len(edit.losses) or args.steps
        top = ", ".join(f"{name.removeprefix('aten::')} {n:,}" for name, n in ops.most_common(args.top))
        print(
            f"| {label} | {edit.timings.get('v_star', wall):.2f} | {sum(ops.values()) / steps:,.0f} | "
            f"{reads / steps:.1f} | {top} |"
        )
    print(
        "\nper step, the whole edit's counts over its steps (the key reads and the solve add a few hundred ops and "
        "reads once); the profiler slows the CPU, so these seconds are not timings"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
