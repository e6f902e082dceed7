"""Stats stage throughput vs a naive baseline, GFLOP/s vs the machine's matmul peak, peak memory.

    python benchmarks/stats_throughput.py --tokens 16384 --layer 6

Same model, layer, data, batches and token budget for both, in one run:
- stage:    the stats stage's own SecondMomentModule through trainer.predict (forward stops before the
            layer's down-projection, keys accumulated in float64);
- baseline: what the original implementation's collection does per batch: the *full* forward with a hook
            on the down-projection input (no early stop), keys accumulated in float64.
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
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WIKI = ROOT.parent / "shared" / "data" / "wikipedia" / "wikipedia_en_sample.jsonl.gz"

from datamodules.text import ShardedTokenStream, TextDataModule  # noqa: E402
from modules.second_moment import SecondMomentModule  # noqa: E402
from pipeline.hooks import Trace, get_module  # noqa: E402
from pipeline.loading import load_model  # noqa: E402
from pipeline.second_moment import accumulate_second_moment  # noqa: E402
from pipeline.text import TextSource  # noqa: E402


def batches(loaded, args):
    """The same stream of batches the stage reads, through a DataLoader worker as in the stage."""
    from torch.utils.data import DataLoader

    stream = ShardedTokenStream(TextSource(files=str(WIKI)), loaded.tokenizer, max_length=args.max_length, chars_per_token=8,
                                batch_tokens=args.batch_tokens, tokens=args.tokens, rank=0, world_size=1, resume={})
    return DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=4)


def run_stage(loaded, args) -> tuple[float, torch.Tensor, int]:
    import lightning as L

    module = SecondMomentModule(loaded.model, loaded.spec, [args.layer])
    data = TextDataModule(TextSource(files=str(WIKI)), loaded.tokenizer, max_length=args.max_length, chars_per_token=8,
                          batch_tokens=args.batch_tokens, tokens=args.tokens, num_workers=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False)
    start = time.perf_counter()
    trainer.predict(module, datamodule=data, return_predictions=False)
    return time.perf_counter() - start, module.sums[args.layer] / module.count, module.count


@torch.inference_mode()
def run_naive(loaded, data, args) -> tuple[float, torch.Tensor, int]:
    module = get_module(loaded.model, loaded.spec.down_proj_name(args.layer))
    d = loaded.spec.key_size(loaded.model, args.layer)
    total, count = torch.zeros(d, d, dtype=torch.float64), 0
    start = time.perf_counter()
    for b in data:
        with Trace(module, retain_input=True) as t:
            loaded.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        keys = t.input[b["attention_mask"].bool()]
        accumulate_second_moment(total, keys)
        count += keys.shape[0]
    return time.perf_counter() - start, total / count, count


@torch.inference_mode()
def forward_flops(loaded, batch, layer: int | None) -> int:
    """Matmul FLOPs of one batch's forward, full or stopped before ``layer``'s down-projection."""
    with FlopCounterMode(display=False) as fc:
        if layer is None:
            loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        else:
            with Trace(get_module(loaded.model, loaded.spec.down_proj_name(layer)), retain_input=True, stop=True):
                loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return fc.get_total_flops()


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def peak_rss_of_stage(args) -> float:
    """Peak resident memory (GiB) of the real command, model load included."""
    with __import__("tempfile").TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "train.py"), "stage=stats", f"stats.layers=[{args.layer}]",
               f"stats.tokens={args.tokens}", f"data.files={WIKI}", f"stats.dir={tmp}", "data.num_workers=0",
               f"data.max_length={args.max_length}", f"data.batch_tokens={args.batch_tokens}"]
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def main() -> None:
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-tokens", type=int, default=8192)
    args = p.parse_args()
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m", device="cpu")
    n_layers = loaded.spec.num_layers(loaded.model)
    data = batches(loaded, args)
    first = [next(iter(data))]

    t_stage1, c_stage, n_stage = run_stage(loaded, args)
    t_naive, c_naive, n_naive = run_naive(loaded, data, args)
    t_stage2, _, _ = run_stage(loaded, args)
    t_stage = (t_stage1 + t_stage2) / 2
    assert n_stage == n_naive == args.tokens
    rel = float((c_stage - c_naive).norm() / c_naive.norm())

    # FLOPs per token from the first (full-width) batch; batches are 8 x 1024 tokens of Wikipedia
    per_tok = lambda layer: forward_flops(loaded, first[0], layer) / int(first[0]["tokens"])
    flops_stop, flops_full = per_tok(args.layer) * args.tokens, per_tok(None) * args.tokens
    d = loaded.spec.key_size(loaded.model, args.layer)
    flops_acc = 2 * d * d * args.tokens
    peak32, peak64 = matmul_peak(torch.float32), matmul_peak(torch.float64)
    rss = peak_rss_of_stage(args)

    res = {
        "tokens": args.tokens, "layer": f"{args.layer} of {n_layers}", "threads": torch.get_num_threads(),
        "stage_s": [round(t_stage1, 2), round(t_stage2, 2)], "naive_s": round(t_naive, 2),
        "stage_tok_s": round(args.tokens / t_stage), "naive_tok_s": round(args.tokens / t_naive),
        "speedup": round(t_naive / t_stage, 2), "max_rel_diff_C": rel,
        "stage_forward_gflop": round(flops_stop / 1e9, 1), "naive_forward_gflop": round(flops_full / 1e9, 1),
        "accumulate_gflop_f64": round(flops_acc / 1e9, 1),
        "stage_gflop_s": round((flops_stop + flops_acc) / t_stage / 1e9, 1),
        "naive_gflop_s": round((flops_full + flops_acc) / t_naive / 1e9, 1),
        "matmul_peak_f32_gflop_s": round(peak32, 1), "matmul_peak_f64_gflop_s": round(peak64, 1),
        "peak_rss_gib_stage_command": round(rss, 2),
        "stats_bytes_per_layer": {"smollm2-135m (d_ff 1536)": 1536**2 * 8, "gpt-j-6b (d_ff 16384)": 16384**2 * 8,
                                  "llama-3-8b (d_ff 14336)": 14336**2 * 8},
    }
    print(json.dumps(res, indent=2))
    print(f"\n| method | seconds | tokens/s | forward GFLOP | GFLOP/s |\n|---|---|---|---|---|\n"
          f"| naive (full forward + hook) | {t_naive:.1f} | {res['naive_tok_s']} | {res['naive_forward_gflop']} | {res['naive_gflop_s']} |\n"
          f"| stats stage (stop at layer {args.layer}) | {t_stage:.1f} | {res['stage_tok_s']} | {res['stage_forward_gflop']} | {res['stage_gflop_s']} |\n"
          f"speedup {res['speedup']}x; matmul peak f32 {peak32:.0f} GFLOP/s, f64 {peak64:.0f} GFLOP/s; "
          f"peak RSS of the stage command {rss:.2f} GiB")


if __name__ == "__main__":
    main()
