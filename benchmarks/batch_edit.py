"""Throughput of batch editing: batched v* against one request at a time, and MEMIT / AlphaEdit against
one-at-a-time ROME, on the same requests, model and statistics, in one process.

    python benchmarks/batch_edit.py --requests 20                                         # SmolLM2, CPU
    python benchmarks/batch_edit.py --device cuda --dtype bfloat16 --shape llama3-8b --requests 100

Measured (outer wall clocks, device synchronised), each from the clean model:
1. batched v*:  the δ of all requests optimised together (``ValueOptimisation`` over every request's rows,
                MEMIT's z at the last layer of the set), one forward and backward per step;
2. one at a time: the same optimisation for each request alone (what the originals do), same δ expected;
3. memit:       the MEMIT editor on all requests as one batch (z, then one solve per layer) -> edits/s;
4. alphaedit:   the same with the null-space projection;
5. rome:        the ROME editor on each request in turn (edits accumulate) -> edits/s.
Every editor comes from ``build_editor``, the factory every stage uses.
``--shape`` models are randomly initialised at the real size directly on the device (timing only), with a
random SPD C per layer; the real model uses C from the statistics cache (50k Wikipedia-sample tokens).
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

from edit_latency import COUNTERFACT, WIKI  # noqa: E402
from shapes import add_model_arguments, model_and_config, statistics_for  # noqa: E402


def clock(model):
    from rome.pipeline.core.timing import sync

    sync(model)
    return time.perf_counter()


def _with_method(cfg, method: str):
    """The run's configuration with ``edit.method`` set (one factory call per method)."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(cfg, {"edit": {"method": method}})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20)
    add_model_arguments(p)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: alone,alphaedit,rome")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import warnings

    warnings.filterwarnings("ignore")
    from rome.pipeline.core.requests import parse_requests
    from rome.pipeline.editors.factory import build_editor

    overrides = [
        f"data.files={WIKI}",
        "stats.tokens=50000",
        "edit.generate_tokens=0",
        "edit.verify.enabled=false",
        "trainer.accelerator=cpu",
        f"edit.batch_size={args.requests}",
    ]
    cfg, loaded = model_and_config(args, overrides)
    layers, layer = list(cfg.edit.layers), int(cfg.edit.layer)
    model, spec = loaded.model, loaded.spec
    statistics = statistics_for(args, cfg, loaded)
    statistics(sorted({*layers, layer}))  # one pass (or one random C) for every layer, before any clock
    requests = parse_requests(json.loads(COUNTERFACT.read_text())[: args.requests])
    edited = sorted({*layers, layer})
    clean = {layer: spec.down_proj_weight(model, layer).detach().clone() for layer in edited}

    def restore():
        with torch.no_grad():
            for layer in edited:
                spec.down_proj_weight(model, layer).copy_(clean[layer])

    def editor(method):
        return build_editor(_with_method(cfg, method), loaded, statistics=statistics)

    n, rows = len(requests), {}
    memit = editor("memit")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # 1. batched v*
    t = clock(model)
    state = memit.begin(requests)
    while not memit.step(state):
        pass
    together = state.optimisation.result()
    rows["batched v*"] = clock(model) - t
    # 2. one request at a time
    if "alone" not in skip:
        t = clock(model)
        alone = []
        for r in requests:
            one = memit.begin([r])
            while not memit.step(one):
                pass
            alone.append(one.optimisation.result()[0])
        rows["v* one at a time"] = clock(model) - t
        diff = float((torch.stack(alone) - together).norm(dim=-1).max() / together.norm(dim=-1).max())
    # 3-5. whole edits
    results = {}
    for method in ("memit", "alphaedit"):
        if method in skip:
            continue
        restore()
        batch_editor = editor(method)  # built (C factorised, P projected) outside the clock
        t = clock(model)
        (results[method],) = batch_editor.edit(requests)
        rows[method] = clock(model) - t
    if "rome" not in skip:
        restore()
        rome = editor("rome")
        t = clock(model)
        rome.edit(requests)
        rows["rome, one at a time"] = clock(model) - t
    restore()
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    )
    label = f"random {args.shape} (timing only)" if args.shape else args.model
    print(f"{label}, {args.dtype}, {device}; {n} CounterFact requests; MEMIT layers {layers}, ROME layer {layer}")
    print("| what | seconds | requests/s |")
    print("|---|---|---|")
    for name, sec in rows.items():
        print(f"| {name} | {sec:.2f} | {n / sec:.3f} |")
    if "v* one at a time" in rows:
        print(
            f"\nbatched v* is {rows['v* one at a time'] / rows['batched v*']:.2f}x one at a time; largest relative "
            f"difference between their δ: {diff:.2e}"
        )
    if "memit" in rows and "rome, one at a time" in rows:
        print(f"memit: {rows['rome, one at a time'] / rows['memit']:.2f}x the edits/s of one-at-a-time ROME")
    for method, res in results.items():
        print(
            f"{method}: timings {json.dumps({k: round(v, 2) for k, v in res.timings.items()})}; residual "
            f"{res.result.residual[0]:.2f} -> {res.result.residual[-1]:.2f}"
        )
    if args.device.startswith("cuda"):
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (weights {weights:.2f} GiB)")


if __name__ == "__main__":
    main()
