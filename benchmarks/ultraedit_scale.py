"""UltraEdit over many sequential batches: edits/s and peak memory, timed from the outside.

    python benchmarks/ultraedit_scale.py --edits 300                                                   # SmolLM2, CPU
    python benchmarks/ultraedit_scale.py --device cuda --dtype bfloat16 --shape llama3-8b --edits 20000 --seconds 420

Batches of ``--batch`` CounterFact requests (records 0, 1, ... of counterfact-edit.json, cycled past its end) go,
one after another into the same model, through the editor ``build_editor`` makes for ``edit.method=ultraedit``
(no verification, no generated text: the edit itself). Each batch is timed with a wall clock read after a device
synchronisation; printed: edits/s per 1,000 edits (does it slow down as the lifelong statistics grow?), over
the whole run, the peak memory against the weights (issue goal: weights + 8 GB) and the statistics' count.
``--seconds`` stops at the first batch boundary past it and says how many edits were done: the rate is measured
on those, never extrapolated to edits not made.

``--shape`` models are randomly initialised at the real size (timing only: their edits mean nothing). Their
edited down-projections span what the release edits in Llama-3-8B (its config/model/llama-3-instruct.yaml:
layers 11-15 and 18-24, twelve modules; it edits gate/up projections there, we edit the down-projections,
pipeline/editors/ultraedit.py), so the backward reaches as deep as the release's; ``--layers`` overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from edit_latency import COUNTERFACT  # noqa: E402
from shapes import add_model_arguments, model_and_config  # noqa: E402

SHAPE_LAYERS = {  # the release's depth for each shape (see the docstring); the tiny shape: its upper half
    "llama3-8b": [11, 12, 13, 14, 15, 18, 19, 20, 21, 22, 23, 24],
    "gptj-6b": [18, 19, 20, 21, 22, 23, 24, 25, 26],  # the paper's GPT-J layers
    "llama-tiny": [3, 4, 5],
}


def requests_for(n: int):
    """The first ``n`` CounterFact requests, the file's records cycled past its end."""
    from rome.pipeline.core.requests import parse_requests

    records = json.loads(COUNTERFACT.read_text())
    return parse_requests([records[i % len(records)] for i in range(n)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edits", type=int, default=300)
    p.add_argument("--batch", type=int, default=100, help="requests per batch (edit.batch_size)")
    p.add_argument("--seconds", type=float, help="stop at the first batch boundary after this many seconds")
    p.add_argument("--layers", help="comma-separated down-projections to edit (default: the shape's, or the model's)")
    p.add_argument("--json", type=Path, help="also write the results here")
    add_model_arguments(p)
    args = p.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    from rome.pipeline.core.timing import sync
    from rome.pipeline.editors.factory import build_editor

    layers = [int(x) for x in args.layers.split(",")] if args.layers else SHAPE_LAYERS.get(args.shape)
    overrides = [
        "edit.method=ultraedit",
        f"edit.batch_size={args.batch}",
        "edit.generate_tokens=0",
        "edit.verify.enabled=false",
        "trainer.accelerator=cpu",
        *([f"edit.ultraedit.layers=[{','.join(map(str, layers))}]"] if layers else []),
    ]
    cfg, loaded = model_and_config(args, overrides)
    model = loaded.model
    editor = build_editor(cfg, loaded)
    requests = requests_for(args.edits)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    per_batch: list[tuple[int, float]] = []  # (edits after the batch, its seconds)
    sync(model)
    start = time.perf_counter()
    for first in range(0, len(requests), args.batch):
        t = time.perf_counter()
        editor.edit(requests[first : first + args.batch])  # the edit is in the weights; its record is dropped
        sync(model)
        per_batch.append((first + len(requests[first : first + args.batch]), time.perf_counter() - t))
        if args.seconds is not None and time.perf_counter() - start > args.seconds:
            break
    whole = time.perf_counter() - start
    done = per_batch[-1][0]

    device = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    label = f"random {args.shape} (timing only)" if args.shape else args.model
    edited = list(cfg.edit.ultraedit.layers or cfg.edit.layers)
    print(f"{label}, {args.dtype}, {device}; UltraEdit, batches of {args.batch}, down-projections {edited}")
    print("| edits | seconds of these batches | edits/s |")
    print("|---|---|---|")
    thousand = max(1000, args.batch)
    for upto in range(thousand, done + thousand, thousand):
        rows = [(n, s) for n, s in per_batch if upto - thousand < n <= upto]
        if rows:
            seconds = sum(s for _, s in rows)
            edits = rows[-1][0] - (upto - thousand if upto - thousand < rows[0][0] else rows[0][0])
            print(f"| {upto - thousand + 1:,}-{rows[-1][0]:,} | {seconds:.1f} | {edits / seconds:.1f} |")
    stopped = f" (stopped by --seconds {args.seconds:g} after {done:,} of {args.edits:,})" if done < args.edits else ""
    print(f"\n{done:,} edits in {whole:.1f} s: {done / whole:.1f} edits/s{stopped}")
    result = {"edits": done, "seconds": whole, "edits_per_second": done / whole, "batches": per_batch}
    counts = {k.removesuffix(".count"): int(v.sum()) for k, v in editor.state().items() if k.endswith(".count")}
    if counts:
        result["statistics_rows"] = counts
        print("lifelong statistics: " + ", ".join(f"{k} over {v:,} feature rows" for k, v in counts.items()))
    if cuda:
        weights = sum(t.numel() * t.element_size() for t in model.parameters()) / 2**30
        peak = torch.cuda.max_memory_allocated() / 2**30
        result.update(peak_gib=peak, weights_gib=weights)
        verdict = "PASS" if peak - weights <= 8 else "FAIL"
        print(
            f"peak GPU memory {peak:.2f} GiB = weights {weights:.2f} + {peak - weights:.2f} (goal <= +8 GiB: {verdict})"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
