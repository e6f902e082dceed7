"""Latency of one ROME edit vs the original's v* loop, same requests, hyperparameters and seed.

    python benchmarks/edit_latency.py --cases 5

Each method runs in its own process (so its peak memory is its own) on the embedded SmolLM2, layer 6,
C from the statistics cache (50k Wikipedia-sample tokens; computed first if missing):
- stage:     the edit stage's ``edit_one`` (prefix KV cache, suffix-only steps, LM head at loss positions);
- reference: the same edit with the v* loop the original runs -- the whole model over all prompts for
             every optimisation step, logits over every position.
Model load and statistics are excluded; the context templates are sampled fresh (not from the cache).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WIKI = ROOT.parent / "shared" / "data" / "wikipedia" / "wikipedia_en_sample.jsonl.gz"
COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
EIFFEL = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
          "target_true": "Paris"}


def requests(n: int):
    from pipeline.requests import parse_requests

    cases = [EIFFEL] + json.loads(COUNTERFACT.read_text())[: n - 1]
    return parse_requests(cases)


def reference_v_star(loaded, job, rows, hp) -> tuple[torch.Tensor, list[float]]:
    """The original's loop: full forward on every prompt each step, same loss, Adam, clamp, early stop."""
    from pipeline.value import reference_loss

    delta = torch.zeros_like(job.v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=float(hp.v.lr))
    v0_norm, kl_init, losses = float(job.v0.norm()), None, []
    for step in range(int(hp.v.steps)):
        opt.zero_grad()
        parts, kl_logp = reference_loss(loaded.model, loaded.spec, job.layer, rows, loaded.tokenizer.pad_token_id or 0,
                                        delta, v0_norm, kl_init, hp.v)
        if kl_init is None:
            kl_init = kl_logp.detach()
        losses.append(parts.total.item())
        if losses[-1] < float(hp.v.early_stop_loss) or step == int(hp.v.steps) - 1:
            break
        parts.total.backward()
        opt.step()
        with torch.no_grad():
            max_norm = float(hp.v.clamp_norm_factor) * v0_norm
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return delta.detach(), losses


def run_reference(loaded, request, layer, templates, c, hp, t_templates):
    """Same steps as ``edit_one`` (keys, v*, solve, apply, verify) with the reference v* loop."""
    from modules.callbacks import measure
    from modules.rome import EditJob
    from pipeline.hooks import get_module
    from pipeline.rank_one import apply_rank_one, rank_one_update
    from pipeline.value import build_rows, key_and_value

    model, tok, spec = loaded.model, loaded.tokenizer, loaded.spec
    timings = {"templates": t_templates}
    t = time.perf_counter()
    k, v0 = key_and_value(model, tok, spec, layer, templates, request.prompt, request.subject)
    rows = build_rows(tok, templates, request.prompt, request.subject, request.target_new, list(hp.kl_prompts))
    timings["keys"] = time.perf_counter() - t
    job = EditJob(request, layer, k, v0, c, hp)
    job.probs["pre"] = measure(model, tok, job)
    t = time.perf_counter()
    job.delta, job.losses = reference_v_star(loaded, job, rows, hp)
    timings["v_star"] = time.perf_counter() - t
    t = time.perf_counter()
    bias = getattr(get_module(model, spec.down_proj_name(layer)), "bias", None)
    v_star = v0.double() + job.delta.double() - (bias.double() if bias is not None else 0)
    job.edit = rank_one_update(spec.down_proj_matrix(model, layer).detach(), k, v_star, c, float(hp.ridge))
    timings["solve"] = time.perf_counter() - t
    t = time.perf_counter()
    job.backup = spec.down_proj_weight(model, layer).detach().clone()
    apply_rank_one(spec.down_proj_weight(model, layer), job.edit, spec.down_proj_conv1d)
    timings["apply"] = time.perf_counter() - t
    t = time.perf_counter()
    job.probs["post"] = measure(model, tok, job)
    timings["verify"] = time.perf_counter() - t
    job.timings = timings
    return job


def child(method: str, n: int) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from pipeline.config import compose
    from pipeline.loading import load_model
    from pipeline.templates import context_templates
    from recipes.edit import edit_one
    from recipes.stats import collect

    cfg = compose([f"data.files={WIKI}", "stats.tokens=50000", "edit.generate_tokens=0"])
    loaded = load_model("smollm2-135m", device="cpu")
    layer = int(cfg.edit.layer)
    c = collect(cfg, loaded, [layer])[layer].second_moment
    t = time.perf_counter()
    templates = context_templates(loaded.model, loaded.tokenizer, loaded.identity, cfg.edit.templates, None, seed=0)
    t_templates = time.perf_counter() - t
    weight = loaded.spec.down_proj_weight(loaded.model, layer)
    original = weight.detach().clone()
    results = []
    for i, req in enumerate(requests(n)):
        torch.manual_seed(0)
        if method == "stage":
            job = edit_one(loaded, req, layer, templates, c, cfg.edit, None, verbose=False, accelerator="cpu",
                           templates_seconds=t_templates if i == 0 else 0.0)
        else:
            job = run_reference(loaded, req, layer, templates, c, cfg.edit, t_templates if i == 0 else 0.0)
        post = job.probs["post"]["prompt"]
        results.append({"case": req.case_id, "timings": job.timings, "steps": len(job.losses),
                        "final_loss": job.losses[-1], "p_new": post["new"][0], "p_true": post["true"][0],
                        "success": post["new"][0] > post["true"][0]})
        with torch.no_grad():
            weight.copy_(original)  # every edit starts from the clean model
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"method": method, "results": results, "peak_rss_gib": peak}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", type=int, default=5)
    p.add_argument("--child", choices=["stage", "reference"])
    args = p.parse_args()
    if args.child:
        return child(args.child, args.cases)
    out = {}
    for method in ("stage", "reference"):
        r = subprocess.run([sys.executable, __file__, "--child", method, "--cases", str(args.cases)],
                           capture_output=True, text=True, check=True)
        out[method] = json.loads(r.stdout.strip().splitlines()[-1])
    steps = ["templates", "keys", "v_star", "solve", "apply", "verify"]
    print(f"| method | {' | '.join(steps)} | total s/edit | efficacy | peak RSS GiB |")
    print("|---" * (len(steps) + 4) + "|")
    totals = {}
    for method, res in out.items():
        rs = res["results"]
        mean = {s: sum(r["timings"].get(s, 0) for r in rs) / len(rs) for s in steps}
        totals[method] = sum(mean.values())
        eff = sum(r["success"] for r in rs)
        print(f"| {method} | " + " | ".join(f"{mean[s]:.2f}" for s in steps)
              + f" | {totals[method]:.2f} | {eff}/{len(rs)} | {res['peak_rss_gib']:.2f} |")
    same = [a["success"] == b["success"] for a, b in zip(out["stage"]["results"], out["reference"]["results"])]
    dl = max(abs(a["p_new"] - b["p_new"]) for a, b in zip(out["stage"]["results"], out["reference"]["results"]))
    print(f"\nstage / reference time: {totals['stage'] / totals['reference']:.2f}; same outcome on "
          f"{sum(same)}/{len(same)} cases; max |ΔP(new)| between methods {dl:.2e}; threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
