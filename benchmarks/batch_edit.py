"""Throughput of batch editing: batched v* against one request at a time, and MEMIT / AlphaEdit against
one-at-a-time ROME, on the same requests, model and statistics, in one process.

    python benchmarks/batch_edit.py --requests 20                                         # SmolLM2, CPU
    python benchmarks/batch_edit.py --device cuda --dtype bfloat16 --shape llama3-8b --requests 100

Measured (outer wall clocks, device synchronised), each from the clean model:
1. batched v*:  the δ of all requests optimised together (``ValueOptimisation`` over every request's rows,
                MEMIT's z at the last layer of the set), one forward and backward per step;
2. one at a time: the same optimisation for each request alone (what the originals do), same δ expected;
3. memit:       ``memit.batch_edit`` of all requests (z, then one solve per layer) -> edits/s;
4. alphaedit:   the same with the null-space projection;
5. rome:        ``rome.edit_in_context`` for each request in turn (edits accumulate) -> edits/s.
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
from shapes import add_model_arguments, build_shape  # noqa: E402


def clock(model):
    from pipeline.core.timing import sync

    sync(model)
    return time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20)
    add_model_arguments(p)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: alone,alphaedit,rome")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import warnings

    warnings.filterwarnings("ignore")
    from pipeline.editors import memit
    from pipeline.editors import rome
    from pipeline.core.loading import configure
    from pipeline.core.loading import load_model, resolve_dtype
    from pipeline.editors.rank_one import KeySolver
    from pipeline.stats.spectrum import eigendecomposition, null_space_projector
    from pipeline.core.requests import parse_requests
    from pipeline.editors.templates import context_templates

    overrides = [f"data.files={WIKI}", "stats.tokens=50000", "edit.generate_tokens=0", "edit.verify.enabled=false",
                 "trainer.accelerator=cpu"]
    if args.shape:
        loaded, _ = build_shape(args.shape, args.device, resolve_dtype(args.dtype), args.num_layers)
        cfg = configure(["model.name=llama" if "llama" in args.shape else "model.name=EleutherAI/gpt-j-6b", *overrides])
    else:
        cfg = configure([f"model.name={args.model}", *overrides])
        loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    layers, layer = list(cfg.edit.layers), int(cfg.edit.layer)
    model, tok, spec = loaded.model, loaded.tokenizer, loaded.spec
    if args.shape:
        g = torch.Generator(device=args.device).manual_seed(0)
        d = spec.key_size(model, layers[0])
        a = torch.randn(d, 2 * d, generator=g, device=args.device)
        c = {l: (a @ a.T / (2 * d)).double() for l in sorted({*layers, layer})}
    else:
        from modules.statistics import collect

        c = {l: s.second_moment for l, s in collect(cfg, loaded, sorted({*layers, layer})).items()}
    requests = parse_requests(json.loads(COUNTERFACT.read_text())[: args.requests])
    memit_templates = context_templates(model, tok, None, cfg.edit.memit.templates, None, seed=0)
    rome_templates = context_templates(model, tok, None, cfg.edit.templates, None, seed=0)
    edited = sorted({*layers, layer})
    clean = {l: spec.down_proj_weight(model, l).detach().clone() for l in edited}

    def restore():
        with torch.no_grad():
            for l in edited:
                spec.down_proj_weight(model, l).copy_(clean[l])

    def batch_ctx(method):
        ctx = memit.BatchContext(model, tok, spec, method, layers, memit_templates, cfg.edit)
        for l in layers:
            ctx.solvers[l] = KeySolver(c[l], 0.0, args.device)
            if method == "alphaedit":
                values, vectors = eigendecomposition(c[l], args.device)
                ctx.projectors[l] = null_space_projector(values, vectors, float(cfg.edit.alphaedit.nullspace_threshold))[0].to(args.device)
        return ctx

    n, rows = len(requests), {}
    ctx = batch_ctx("memit")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # 1. batched v*
    t = clock(model)
    state = memit.begin_batch(ctx, requests)
    with torch.enable_grad():
        while not state.optimisation.step():
            pass
    together = state.optimisation.result()
    rows["batched v*"] = clock(model) - t
    # 2. one request at a time
    if "alone" not in skip:
        t = clock(model)
        alone = []
        for r in requests:
            one = memit.begin_batch(ctx, [r])
            with torch.enable_grad():
                while not one.optimisation.step():
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
        t = clock(model)
        results[method] = memit.batch_edit(batch_ctx(method), requests)
        rows[method] = clock(model) - t
    if "rome" not in skip:
        restore()
        rctx = rome.EditContext(model, tok, spec, layer, rome_templates, KeySolver(c[layer], 0.0, args.device), cfg.edit)
        t = clock(model)
        for r in requests:
            rome.edit_in_context(rctx, r)
        rows["rome, one at a time"] = clock(model) - t
    restore()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    label = f"random {args.shape} (timing only)" if args.shape else args.model
    print(f"{label}, {args.dtype}, {device}; {n} CounterFact requests; MEMIT layers {layers}, ROME layer {layer}")
    print("| what | seconds | requests/s |")
    print("|---|---|---|")
    for name, sec in rows.items():
        print(f"| {name} | {sec:.2f} | {n / sec:.3f} |")
    if "v* one at a time" in rows:
        print(f"\nbatched v* is {rows['v* one at a time'] / rows['batched v*']:.2f}x one at a time; largest relative "
              f"difference between their δ: {diff:.2e}")
    if "memit" in rows and "rome, one at a time" in rows:
        print(f"memit: {rows['rome, one at a time'] / rows['memit']:.2f}x the edits/s of one-at-a-time ROME")
    for method, res in results.items():
        print(f"{method}: timings {json.dumps({k: round(v, 2) for k, v in res.timings.items()})}; residual "
              f"{res.residual[0]:.2f} -> {res.residual[-1]:.2f}")
    if args.device.startswith("cuda"):
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (weights {weights:.2f} GiB)")


if __name__ == "__main__":
    main()
