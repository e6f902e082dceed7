"""Why MEMIT and AlphaEdit refuse a model whose MLP output is normed before the residual add (Gemma 2/3, OLMo 2):
``python benchmarks/mlp_out_norm.py [--model gemma3-270m] [--n 10] [--through-norm] [key=value ...]``.

One batch of CounterFact records 0..n-1: z optimised as MEMIT does it, then the layers written one after another
as MEMIT writes them (each layer's share of what is still missing, s = (z − h) / layers left, solved as
ΔW = s Kᵀ(λC + K Kᵀ)⁻¹). Per layer it prints ‖s‖ and what the update did with it: the change of the layer's MLP
contribution to the residual stream at the subject's last token (after the norm, where there is one) and its
cosine with s, and the change of the last edited layer's output and its cosine with s (what MEMIT assumes: the
shift written reaches the last layer as it is). Then ‖z − h‖ after every layer, the largest ‖ΔW‖/‖W‖ and, of the
n edits, how many pass P(new) > P(true) (teacher-forced) and how many the model now says (its greedy continuation
starts with the new object).

``--through-norm`` tries the one fix that keeps MEMIT's form: each share mapped through the norm's inverse before
the solve. With N(d) = g ⊙ d / rms(d) (g = N(1), the norm's gain) and the target o* = N(d) + s per template row,
d* = rms(d) u / rms(u) with u = o* g / (g² + μ²) (μ = 10⁻³ rms(g), so coordinates the norm all but zeroes are
left alone); the update is solved for d* − d averaged over the templates. The printout says how close N(d*) comes
to o* (rms(u) = 1 where o* is reachable). C comes from the statistics cache (computed when missing) with the
overrides given after the options (``stats.tokens=50000 data.files=...``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rome.modules.statistics import layer_statistics  # noqa: E402
from rome.pipeline.core.hooks import Trace, get_module  # noqa: E402
from rome.pipeline.core.loading import configure, load_configured  # noqa: E402
from rome.pipeline.core.padding import right_pad  # noqa: E402
from rome.pipeline.core.probability import greedy_continuation, target_probs  # noqa: E402
from rome.pipeline.core.requests import parse_requests  # noqa: E402
from rome.pipeline.editors import memit  # noqa: E402
from rome.pipeline.editors.factory import build_editor  # noqa: E402
from rome.pipeline.editors.rank_one import LowRank, apply_low_rank, frobenius_norm  # noqa: E402
from rome.pipeline.evaluation.generative import continuation, exact_match  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


@torch.no_grad()
def mlp_contribution(ctx, prompts: memit.PromptRows, layer: int, shift: torch.Tensor | None = None):
    """Per request (averaged over the templates, float64): the layer's MLP contribution to the residual stream at
    the subject's last token (the normed output where a norm follows the MLP) and, with ``shift`` [n, d_model],
    the down-projection output change that ``--through-norm`` solves for."""
    model, spec = ctx.model, ctx.spec
    norm = get_module(model, spec.mlp_out_norm_name(layer)) if spec.mlp_out_norm else None
    out = torch.zeros(prompts.n_requests, model.config.hidden_size, dtype=torch.float64)
    mapped, reach, sizes = torch.zeros_like(out), [], {"|d|": [], "|N(d)|": []}
    if norm is not None:  # the norm's gain g = N(1), and μ: where g is below it the output cannot be moved
        gain = norm(torch.ones(1, out.shape[-1], dtype=model.dtype)).double()[0]
        mu = 1e-3 * gain.pow(2).mean().sqrt()
        sizes["gain"] = [float(gain.abs().min()), float(gain.abs().max())]
    for start in range(0, len(prompts.rows), 64):
        chunk = prompts.rows[start : start + 64]
        ids, mask = right_pad([r for r, _ in chunk], ctx.tokenizer.pad_token_id or 0, "cpu")
        with Trace(get_module(model, spec.down_proj_name(layer)), retain_output=True) as t:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        d = t.output[torch.arange(len(chunk)), torch.tensor([s for _, s in chunk])]
        owner = torch.tensor(prompts.owner[start : start + 64])
        o = (norm(d) if norm is not None else d).double()
        out.index_add_(0, owner, o)
        sizes["|d|"] += d.double().norm(dim=-1).tolist()
        sizes["|N(d)|"] += o.norm(dim=-1).tolist()
        if shift is not None and norm is not None:
            u = (o + shift[owner]) * gain / (gain.pow(2) + mu.pow(2))
            rms = lambda x: x.pow(2).mean(-1, keepdim=True).sqrt()  # noqa: E731
            d64 = d.double()
            mapped.index_add_(0, owner, rms(d64) * u / rms(u) - d64)
            reach += rms(u).squeeze(-1).tolist()
    n = len(ctx.templates)
    return out / n, (mapped / n if shift is not None and norm is not None else shift), reach, sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--n", type=int, default=10, help="CounterFact records 0..n-1, one batch")
    parser.add_argument("--through-norm", action="store_true", help="map each share through the norm's inverse")
    args, overrides = parser.parse_known_args(argv)
    cfg = configure(
        [f"model.name={args.model}", "model.device=cpu", "edit.method=memit", "edit.memit.allow_mlp_out_norm=true"]
        + ["edit.verify.enabled=false", *overrides]
    )
    loaded = load_configured(cfg.model)
    torch.manual_seed(0)
    records = json.loads((DATA / "counterfact" / "counterfact-edit.json").read_text())[: args.n]
    requests = parse_requests([{k: r[k] for k in ("prompt", "subject", "target_new")} for r in records])
    ctx = build_editor(cfg, loaded, statistics=layer_statistics(cfg, loaded))
    edit = ctx.begin(requests)
    while not ctx.step(edit):
        pass
    z = (edit.h0 + edit.optimisation.result()).double()
    model, spec, layers = loaded.model, loaded.spec, ctx.layers
    prompts = memit.PromptRows.build(ctx, requests)
    print(
        f"{args.model}: {args.n} requests, layers {layers}, norm after the MLP: {spec.mlp_out_norm}, "
        f"{'shares mapped through the norm' if args.through_norm else 'the release procedure'}"
    )
    residual, relative = [], []
    for i, layer in enumerate(layers):
        keys, h = memit.subject_states(ctx, prompts, [layer], layers[-1])
        share = (z - h.double()) / (len(layers) - i)
        residual.append(float((z - h.double()).norm(dim=-1).mean()))
        before, target, reach, sizes = mlp_contribution(ctx, prompts, layer, share if args.through_norm else None)
        target = share if target is None else target
        right = memit.memit_right(keys[layer].double().T, ctx.solvers[layer], float(ctx.hp.memit.mom2_update_weight))
        weight = spec.down_proj_weight(model, layer)
        update = LowRank(target.T, right)
        relative.append(update.norm() / frobenius_norm(weight))
        apply_low_rank(weight, update, spec.down_proj_conv1d)
        after, _, _, _ = mlp_contribution(ctx, prompts, layer)
        _, h_last = memit.subject_states(ctx, prompts, [], layers[-1])
        moved, moved_last = after - before, h_last.double() - h.double()
        cos = torch.nn.functional.cosine_similarity
        print(
            f"layer {layer}: |share| {share.norm(dim=-1).mean():.1f}  MLP output moved {moved.norm(dim=-1).mean():.1f} "
            f"(cos {cos(moved, share, dim=-1).mean():.2f})  last layer moved {moved_last.norm(dim=-1).mean():.1f} "
            f"(cos {cos(moved_last, share, dim=-1).mean():.2f})  |dW|/|W| {relative[-1]:.3f}"
            + (f"  rms(u) {min(reach):.2f}-{max(reach):.2f}" if reach else "")
        )
        norm_sizes = f"; |N(d)| {min(sizes['|N(d)|']):.0f}-{max(sizes['|N(d)|']):.0f}" if spec.mlp_out_norm else ""
        gains = f"; the norm's gains |g| {sizes['gain'][0]:.2g}-{sizes['gain'][1]:.0f}" if "gain" in sizes else ""
        print(
            f"    before: the MLP output at the subject's last token |d| {min(sizes['|d|']):.1f}-"
            f"{max(sizes['|d|']):.1f}{norm_sizes}{gains}"
        )
    _, h = memit.subject_states(ctx, prompts, [], layers[-1])
    residual.append(float((z - h.double()).norm(dim=-1).mean()))
    texts = [r.text for r in requests]
    p_new = target_probs(model, loaded.tokenizer, texts, [r["target_new"] for r in records], 16)
    p_true = target_probs(model, loaded.tokenizer, texts, [r["ground_truth"] for r in records], 16)
    says = [continuation(greedy_continuation(model, loaded.tokenizer, t, 12)) for t in texts]
    took = sum(exact_match(s, r["target_new"]) for s, r in zip(says, records))
    print(f"|z - h| before each layer and after the last: {', '.join(f'{x:.0f}' for x in residual)}")
    print(
        f"largest |dW|/|W| {max(relative):.3f}; P(new) > P(true) {int((p_new > p_true).sum())} of {args.n}; "
        f"the model says the new object {took} of {args.n}"
    )
    print("says after:", "; ".join(says[:5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
