"""Latency of ROME edits through the edit stage vs the original's v* loop, same requests, hyperparameters, seed.

    python benchmarks/edit_latency.py --cases 5                                   # SmolLM2 on the CPU
    python benchmarks/edit_latency.py --device cuda --dtype bfloat16 --shape llama3-8b --cases 5
    python benchmarks/edit_latency.py --device cuda --model EleutherAI/gpt-j-6b --cov identity

Each method runs in its own process (its peak memory is its own), edits the requests one after another
(sequentially, as a user's run does) and reports, per edit, the outer wall time (device synchronised) and
every phase:
- stage:     the edit stage's own loop (``modules.edit_loop.fit_edits``: one Trainer, one fit, the callbacks
             apply / verify), k* and v* with the prefix KV cache, suffix-only steps, LM head at loss positions.
             Its outer wall per edit is measured by the loop module from the end of the previous edit (or the
             start of the fit) to the end of this one, after every callback, so nothing the framework does
             between edits is left out; the whole call (Trainer construction included) is reported too.
- reference: the same edit with the v* loop the original runs: the whole model over all prompts for every
             optimisation step, logits over every position (k*, v₀, solve, apply and verification are the
             same code). Its outer wall is a clock around the whole edit.
``--shape gptj-6b|llama3-8b`` builds a randomly initialised model of that architecture's real size directly
on the device, with the embedded SmolLM2 tokenizer: those numbers are **timing only** (the outcomes of a
random model mean nothing). Model load, statistics and context templates (``build_editor``, the factory
every stage uses) are outside the edits.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = ROOT.parent / "shared" / "data"
WIKI = DATA / "wikipedia" / "wikipedia_en_sample.jsonl.gz"
COUNTERFACT = DATA / "counterfact" / "counterfact-edit.json"
EIFFEL = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}
PHASES = ["pre", "keys", "v_star", "solve", "apply", "verify"]

from shapes import add_model_arguments, build_shape, statistics_for  # noqa: E402  (one place for the random real-size models)


def requests(n: int):
    from rome.pipeline.core.requests import parse_requests

    return parse_requests([EIFFEL] + json.loads(COUNTERFACT.read_text())[: n - 1])


def reference_edit(ctx, request, hp):
    """The original's v* loop (full forward over every prompt, every step) between the same k*/v₀ and the
    same solve, apply and verification as the stage."""
    from rome.pipeline.core.timing import Clock
    from rome.pipeline.editors import rome
    from rome.pipeline.editors.reference import reference_loss
    from rome.pipeline.editors.value import build_rows

    result = rome.EditResult(request, ctx.layer, ctx.module, None, None, None)
    clock = Clock(ctx.model, result.timings)
    if hp.verify.enabled:
        result.probs["pre"] = rome.measure(ctx.model, ctx.tokenizer, request, int(hp.verify.batch_size))
    clock.lap("pre")
    result.k_star, result.v0, result.k_direction = rome.key_and_value(
        ctx.model, ctx.tokenizer, ctx.spec, ctx.layer, ctx.templates, request.prompt, request.subject, str(hp.variant)
    )
    rows = build_rows(
        ctx.tokenizer, ctx.templates, request.prompt, request.subject, request.target_new, list(hp.kl_prompts)
    )
    clock.lap("keys")
    delta = torch.zeros(1, result.v0.shape[0], device=result.v0.device, requires_grad=True)
    adam = torch.optim.Adam([delta], lr=float(hp.v.lr))
    v0_norm, kl_init, losses = result.v0.norm()[None], None, []
    with torch.enable_grad():
        for step in range(int(hp.v.steps)):
            parts = reference_loss(
                ctx.model,
                ctx.spec,
                ctx.spec.mlp_name(ctx.layer),
                rows,
                ctx.tokenizer.pad_token_id or 0,
                delta,
                v0_norm,
                kl_init,
                hp.v,
            )
            if kl_init is None:
                kl_init = parts.kl_logp.detach()
            losses.append(parts.total.item())
            if losses[-1] < float(hp.v.early_stop_loss) or step == int(hp.v.steps) - 1:
                break
            adam.zero_grad()
            parts.total.sum().backward()
            adam.step()
            with torch.no_grad():
                max_norm = float(hp.v.clamp_norm_factor) * v0_norm
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    result.delta, result.losses = delta.detach()[0].clone(), losses
    clock.lap("v_star")
    rome.apply_edit(ctx, result)
    rome.verify_edit(ctx, result)
    return result


def child(args) -> None:
    import warnings

    from rome.cli import quiet

    quiet()  # no framework banners or tips (the CLI's settings)
    warnings.filterwarnings("ignore")
    from rome.modules.edit_loop import fit_edits
    from rome.pipeline.core.loading import configure, load_model, resolve_dtype
    from rome.pipeline.core.timing import Clock, sync
    from rome.pipeline.editors.factory import build_editor

    dtype = resolve_dtype(args.dtype)
    overrides = [
        f"data.files={WIKI}",
        "stats.tokens=50000",
        "edit.generate_tokens=0",
        f"edit.v.steps={args.steps}",
        "edit.method=rome",
        f"edit.mom2_adjustment={args.cov != 'identity'}",
        "trainer.accelerator=cpu" if args.device == "cpu" else "trainer.accelerator=gpu",
    ]
    if args.shape:
        loaded, layer = build_shape(args.shape, args.device, dtype, args.num_layers)
        cfg = configure([*overrides, f"edit.layer={args.layer if args.layer is not None else layer}"])
    else:
        cfg = configure([f"model.name={args.model}", *overrides] + ([f"edit.layer={args.layer}"] if args.layer else []))
        loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    clock = Clock(loaded.model)
    ctx = build_editor(cfg, loaded, statistics=statistics_for(args, cfg, loaded))  # C factorised, templates sampled
    t_templates = clock.lap("editor")
    reqs = requests(args.cases)
    weights_gb = sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 2**30
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    sync(loaded.model)
    t = time.perf_counter()
    if args.method == "stage":
        results = fit_edits(ctx, reqs, cfg, progress=False)
    else:
        results = []
        for req in reqs:
            sync(loaded.model)
            t0 = time.perf_counter()
            results.append(reference_edit(ctx, req, cfg.edit))
            sync(loaded.model)
            results[-1].timings["wall"] = time.perf_counter() - t0
    sync(loaded.model)
    whole = time.perf_counter() - t
    out = []
    for r in results:
        post = r.probs["post"]["prompt"]
        out.append(
            {
                "case": r.request.case_id,
                "timings": r.timings,
                "steps": len(r.losses),
                "final_loss": r.losses[-1],
                "p_new": post["new"][0],
                "p_true": post["true"][0] if post["true"] else None,
                "success": bool(post["true"]) and post["new"][0] > post["true"][0],
            }
        )
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    print(
        json.dumps(
            {
                "method": args.method,
                "results": out,
                "whole_call_s": whole,
                "templates_s": t_templates,
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "peak_gpu_gib": peak_gpu,
                "weights_gib": weights_gb,
                "threads": torch.get_num_threads(),
                "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=5)
    add_model_arguments(p)
    p.add_argument("--layer", type=int)
    p.add_argument("--steps", type=int, default=20, help="v* steps (ROME's 20)")
    p.add_argument(
        "--cov",
        choices=["stats", "identity", "random"],
        default=None,
        help="C from the statistics cache (default for real models), I, or a random SPD (default for --shape)",
    )
    p.add_argument("--methods", default="stage,reference")
    p.add_argument("--method", choices=["stage", "reference"], help=argparse.SUPPRESS)
    args = p.parse_args()
    args.cov = args.cov or ("random" if args.shape else "stats")
    if args.method:
        return child(args)
    out = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--method", method]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if r.returncode != 0:
            sys.exit(f"{method} failed:\n{r.stderr[-3000:]}")
        out[method] = json.loads(r.stdout.strip().splitlines()[-1])
    label = f"random {args.shape} (timing only)" if args.shape else args.model
    first = next(iter(out.values()))
    print(
        f"{label}, {args.dtype}, {first['device']}, layer C={args.cov}, {args.cases} edits, {first['threads']} threads"
    )
    print(
        f"| method | edit | {' | '.join(PHASES)} | sum of phases | outer wall | wall / sum | steps | P(new) | success |"
    )
    print("|---" * (len(PHASES) + 8) + "|")
    for method, res in out.items():
        for i, r in enumerate(res["results"]):
            phases = sum(r["timings"].get(s, 0.0) for s in PHASES)
            print(
                f"| {method} | {i + 1} | "
                + " | ".join(f"{r['timings'].get(s, 0.0):.3f}" for s in PHASES)
                + f" | {phases:.3f} | {r['timings']['wall']:.3f} | {r['timings']['wall'] / phases:.3f} | {r['steps']} "
                f"| {r['p_new']:.4f} | {r['success']} |"
            )
    print()
    means = {}
    for method, res in out.items():
        rs = res["results"]
        means[method] = sum(r["timings"]["wall"] for r in rs) / len(rs)
        gpu = (
            f", peak GPU {res['peak_gpu_gib']:.2f} GiB (weights {res['weights_gib']:.2f} GiB)"
            if res["peak_gpu_gib"]
            else ""
        )
        print(
            f"{method}: {means[method]:.3f} s/edit outer wall; whole call {res['whole_call_s']:.2f} s "
            f"= {res['whole_call_s'] / len(rs):.3f} s/edit; peak RSS {res['peak_rss_gib']:.2f} GiB{gpu}; "
            f"editor build (C factorised, templates) {res['templates_s']:.2f} s (once, outside)"
        )
    if {"stage", "reference"} <= set(out):
        a, b = out["stage"]["results"], out["reference"]["results"]
        same = sum(x["success"] == y["success"] for x, y in zip(a, b))
        dl = max(abs(x["p_new"] - y["p_new"]) for x, y in zip(a, b))
        print(
            f"stage / reference outer wall: {means['stage'] / means['reference']:.3f}; same outcome on {same}/{len(a)} "
            f"edits; max |ΔP(new)| {dl:.2e}"
        )


if __name__ == "__main__":
    main()
