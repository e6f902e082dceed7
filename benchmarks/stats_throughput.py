"""Stats stage throughput against the original's procedure, same texts, tokens, threads and process.

    OMP_NUM_THREADS=1 python benchmarks/stats_throughput.py                      # SmolLM2-135M, layer 6, CPU
    python benchmarks/stats_throughput.py --device cuda --dtype bfloat16 --shape llama3-8b --tokens 4000000
    python benchmarks/stats_throughput.py --device cuda --dtype bfloat16 --shape gptj-6b --check-syncs
    python benchmarks/stats_throughput.py --device cuda --model EleutherAI/gpt-j-6b --dtype float16

Every row reads the first ``--tokens`` tokens of the Wikipedia sample in stream order, each text truncated
to ``--max-length`` (the last one cut to the budget), whatever ``--workers`` (the stage's shards take their
parts of that prefix: ``pipeline.stats.text.plan_stream``), and accumulates the statistics of one layer:

- forward only: the stage's batches, the forward stopped at the layer's down-projection input, nothing else
  (the ceiling: what the stage would reach if accumulating cost nothing);
- original:     the procedure of kmeng01/rome (``rome/layer_stats.py``, ``util/runningstats.py``,
  ``rome/tok_dataset.py``): texts tokenised whole in the dataloader worker, 100 texts per loader batch,
  sorted by length and split into right-padded sub-batches of at most 3 x n_positions tokens (3 x
  --max-length for models without ``n_positions``: the original truncates to n_positions, we to max_length),
  the forward with the attention mask under a hook that stops it *after* the down-projection, the real
  tokens' keys gathered by a boolean mask, and C accumulated as ``mom2 += k.t().mm(k)`` in float32;
- stage (exact) / stage: the stats stage itself (``modules.statistics.collect``, what ``python train.py
  stage=stats`` runs after loading the model: Trainer, dataloader worker, the module, the cache and the
  convergence readouts) with ``stats.product=exact`` (keys cast to float64) and the default ``fp32``.

The methods run one after another in this process, ``--repeats`` times in turn (the table keeps each one's
fastest run); C of each is compared with the stage's exact C (relative Frobenius difference). A stage row's
seconds are the whole call (the cache looked up, the streaming pass, then the files written with their
checksums: seconds for a 7B model's 2 GB per layer); its streaming pass alone is shown beside.
``--shape gptj-6b|llama3-8b`` builds a randomly initialised model of that real size on the device with
SmolLM2's tokenizer: **timing only**. ``--check-syncs`` (CUDA) counts the host-device syncs of the stage.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
WIKI = ROOT.parent / "shared" / "data" / "wikipedia" / "wikipedia_en_sample.jsonl.gz"

from shapes import add_model_arguments, build_shape  # noqa: E402

from rome.datamodules.text import ShardedTokenStream  # noqa: E402
from rome.pipeline.core.hooks import Trace, TraceDict, get_module  # noqa: E402
from rome.pipeline.core.loading import configure, load_model, resolve_dtype  # noqa: E402
from rome.pipeline.core.timing import Clock  # noqa: E402
from rome.pipeline.stats.store import batch_tokens as resolve_batch_tokens  # noqa: E402
from rome.pipeline.stats.text import TextSource, plan_stream, tokenize_window  # noqa: E402

# -- the texts every method reads -------------------------------------------------------------------------


def first_texts(tokenizer, tokens: int, max_length: int) -> tuple[list[str], list[int]]:
    """The texts that hold the first ``tokens`` tokens in stream order, and each one's token count (the last
    cut to the budget): what the stage reads on one process."""
    texts, counts, left = [], [], tokens
    for window in TextSource(files=str(WIKI)).windows(512):
        for text, ids in zip(window, tokenize_window(tokenizer, window, max_length, 8)):
            n = min(len(ids), left)
            if n:
                texts.append(text)
                counts.append(n)
                left -= n
            if not left:
                return texts, counts
    raise SystemExit(f"the sample holds fewer than {tokens} tokens")


# -- the original's procedure (kmeng01/rome) ----------------------------------------------------------------


class TokenizedDataset(Dataset):
    """rome/tok_dataset.py's TokenizedDataset: each text tokenised whole, truncated (here also cut to the
    shared budget), with position ids and an all-ones attention mask."""

    def __init__(self, texts: list[str], counts: list[int], tokenizer, max_length: int) -> None:
        self.texts, self.counts, self.tokenizer, self.max_length = texts, counts, tokenizer, max_length

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.tokenizer.encode(self.texts[i], truncation=True, max_length=self.max_length)[: self.counts[i]]
        return {
            "input_ids": torch.tensor(ids),
            "position_ids": torch.arange(len(ids)),
            "attention_mask": torch.ones(len(ids), dtype=torch.long),
        }


def make_padded_batch(items: list[dict]) -> dict[str, torch.Tensor]:
    """rome/tok_dataset.py: right-padded with zeros."""
    return {k: pad_sequence([d[k] for d in items if len(d["input_ids"])], batch_first=True) for k in items[0]}


def length_collation(token_size: int):
    """rome/tok_dataset.py's length_collation, as released (including its reset of the running width)."""

    def collate_fn(items):
        items = sorted(items, key=lambda x: -len(x["input_ids"]))
        batches, batch, batch_width = [], [], 0
        for item in items:
            batch_width = max(batch_width, len(item["input_ids"]))
            if batch_width * (len(batch) + 1) > token_size:
                batches.append(make_padded_batch(batch))
                batch, batch_width = [], 0
            batch.append(item)
        if len(batch):
            batches.append(make_padded_batch(batch))
        return batches

    return collate_fn


def flatten_masked_batch(data: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """rome/layer_stats.py / util/runningstats.py: the rows of the attended tokens."""
    flat_data = data.view(-1, data.size(-1))
    attended_tokens = mask.view(-1).nonzero()[:, 0]
    return flat_data[attended_tokens]


def run_original(loaded, layer: int, texts, counts, args) -> tuple[float, torch.Tensor, int, dict]:
    n_positions = getattr(loaded.model.config, "n_positions", None)
    sub_batch_tokens = 3 * (n_positions or args.max_length)
    ds = TokenizedDataset(texts, counts, loaded.tokenizer, args.max_length)
    loader = DataLoader(
        ds,
        batch_size=100,
        collate_fn=length_collation(sub_batch_tokens),
        num_workers=args.workers,
        pin_memory=args.device.startswith("cuda"),
    )
    module = get_module(loaded.model, loaded.spec.down_proj_name(layer))
    mom2, count = None, 0
    clock = Clock(args.device)
    with torch.no_grad():
        for batch_group in loader:
            for batch in batch_group:
                batch = {k: v.to(args.device) for k, v in batch.items()}
                # retain_output makes our Trace stop *after* the module, as the original's nethook does
                with Trace(module, retain_input=True, retain_output=True, stop=True) as tr:
                    loaded.model(**batch)
                feats = flatten_masked_batch(tr.input, batch["attention_mask"]).to(dtype=torch.float32)
                if mom2 is None:
                    mom2 = feats.new_zeros(feats.shape[1], feats.shape[1])
                count += feats.shape[0]
                mom2 += feats.t().mm(feats)
    return clock.lap("original"), (mom2 / count).double().cpu(), count, {}


# -- the stage ------------------------------------------------------------------------------------------------


def stage_cfg(args, layer: int, product: str, stats_dir: str):
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    return configure(
        [
            f"model.dtype={args.dtype}",
            f"data.files={WIKI}",
            f"stats.dir={stats_dir}",
            f"stats.layers=[{layer}]",
            f"stats.tokens={args.tokens}",
            f"stats.product={product}",
            f"data.max_length={args.max_length}",
            f"data.batch_tokens={args.batch_tokens}",
            f"data.num_workers={args.workers}",
            f"trainer.accelerator={accelerator}",
            "trainer.devices=1",
        ]
    )


def run_stage(loaded, layer: int, product: str, args) -> tuple[float, torch.Tensor, int, dict]:
    """The whole call (the lookup, the pass, then writing the files with their checksums), and in ``extra``
    the streaming pass alone and, with --check-syncs, the syncs counted."""
    from rome.modules.statistics import collect

    extra: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = stage_cfg(args, layer, product, tmp)  # the statistics are keyed by the loaded model itself
        clock = Clock(args.device)
        if args.check_syncs and args.device.startswith("cuda"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    stats = collect(cfg, loaded, [layer], timings=extra)[layer]
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            extra["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
        else:
            stats = collect(cfg, loaded, [layer], timings=extra)[layer]
        seconds = clock.lap("stage")
    return seconds, stats.second_moment.double(), stats.count, extra


def stage_batches(loaded, args, tokens_per_batch: int) -> DataLoader:
    """The stage's batches on one process with ``--workers`` workers (their budgets from the stream's plan, as
    the stage's data module makes it)."""
    source = TextSource(files=str(WIKI))
    plan = None
    if args.workers > 1:
        plan = plan_stream(
            source,
            loaded.tokenizer,
            sort_window=512,
            max_length=args.max_length,
            chars_per_token=8,
            budget=args.tokens,
            workers=args.workers,
        )
    stream = ShardedTokenStream(
        source,
        loaded.tokenizer,
        max_length=args.max_length,
        chars_per_token=8,
        batch_tokens=tokens_per_batch,
        sort_window=512,
        tokens=args.tokens,
        rank=0,
        world_size=1,
        resume={},
        plan=plan,
    )
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=args.workers,
        prefetch_factor=4 if args.workers else None,
        pin_memory=args.device.startswith("cuda"),
    )


def run_forward_only(loaded, layer: int, args, tokens_per_batch: int) -> tuple[float, None, int, dict]:
    name = loaded.spec.down_proj_name(layer)
    count = 0
    clock = Clock(args.device)
    with torch.inference_mode():
        for batch in stage_batches(loaded, args, tokens_per_batch):
            with TraceDict(loaded.model, [name], retain_input=True, stop=name):
                loaded.model(input_ids=batch["input_ids"].to(args.device, non_blocking=True), use_cache=False)
            count += batch["tokens"]
    return clock.lap("forward"), None, count, {}


def main() -> None:
    from rome.cli import quiet

    quiet()  # no framework banners or tips (the CLI's settings)
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536)
    add_model_arguments(p)
    p.add_argument("--layer", type=int, help="default: the model file's edit layer (the shape's for --shape)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-tokens", default="auto", help="the stage's data.batch_tokens (auto: by device)")
    p.add_argument("--workers", type=int, default=1, help="dataloader workers, the same for every method")
    p.add_argument("--methods", default="forward,original,exact,stage")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--check-syncs", action="store_true", help="CUDA: count the stage's host-device syncs")
    args = p.parse_args()
    args.batch_tokens = int(args.batch_tokens) if args.batch_tokens != "auto" else "auto"
    dtype = resolve_dtype(args.dtype)
    if args.shape:
        loaded, layer = build_shape(args.shape, args.device, dtype, args.num_layers)
    else:
        loaded = load_model(args.model, device=args.device, dtype=args.dtype)
        layer = int(configure([f"model.name={args.model}"]).model.edit_layer)
    layer = args.layer if args.layer is not None else layer
    tokens_per_batch = resolve_batch_tokens(stage_cfg(args, layer, "fp32", "unused"), args.device.split(":")[0])
    texts, counts = first_texts(loaded.tokenizer, args.tokens, args.max_length)

    runs: dict[str, list] = {m: [] for m in args.methods.split(",")}
    for _ in range(args.repeats):
        for method in runs:
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            if method == "forward":
                out = run_forward_only(loaded, layer, args, tokens_per_batch)
            elif method == "original":
                out = run_original(loaded, layer, texts, counts, args)
            else:
                out = run_stage(loaded, layer, "exact" if method == "exact" else "fp32", args)
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
            runs[method].append((*out, peak))
            print(f"{method}: {out[0]:.2f} s", file=sys.stderr, flush=True)

    best = {m: min(r, key=lambda x: x[0]) for m, r in runs.items()}
    reference = best.get("exact", best.get("stage"))[1] if ("exact" in best or "stage" in best) else None
    label = f"random {args.shape} (timing only)" if args.shape else args.model
    names = {
        "forward": "forward only (the stage's batches, no accumulation)",
        "original": "original's procedure (kmeng01/rome layer_stats)",
        "exact": "stage, stats.product=exact",
        "stage": "stage (default: stats.product=fp32)",
    }
    rows = []
    for m, (seconds, c, count, extra, peak) in best.items():
        diff = float((c - reference).norm() / reference.norm()) if c is not None and reference is not None else None
        rows.append(
            {
                "method": m,
                "seconds": round(seconds, 2),
                "all_seconds": [round(r[0], 2) for r in runs[m]],
                "pass_seconds": round(extra["pass"], 2) if "pass" in extra else None,
                "tokens": count,
                "tokens_per_s": round(count / seconds),
                "rel_diff_C_vs_exact": diff,
                "peak_gpu_gib": None if peak is None else round(peak, 2),
                "syncs": extra.get("syncs"),
            }
        )
    base = best.get("original")
    result = {
        "model": label,
        "layer": layer,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "tokens": args.tokens,
        "max_length": args.max_length,
        "stage_batch_tokens": tokens_per_batch,
        "texts": len(texts),
        "rows": rows,
        "speedup_vs_original": round(base[0] / best["stage"][0], 2) if base and "stage" in best else None,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(json.dumps(result, indent=2))
    print(
        f"\n{label}, layer {layer}, {args.device} {args.dtype}, {args.tokens} tokens ({len(texts)} texts), "
        f"{torch.get_num_threads()} thread(s), {args.workers} worker(s), "
        f"stage batches of {tokens_per_batch} tokens\n"
    )
    print(
        f"| method | seconds (fastest of {args.repeats}) | tokens/s | C: relative difference to the exact stage "
        "| the stage's streaming pass alone: s, tokens/s |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        diff = "" if r["rel_diff_C_vs_exact"] is None else f"{r['rel_diff_C_vs_exact']:.1e}"
        alone = (
            "" if r["pass_seconds"] is None else f"{r['pass_seconds']:.2f}, {round(r['tokens'] / r['pass_seconds'])}"
        )
        print(f"| {names[r['method']]} | {r['seconds']:.2f} | {r['tokens_per_s']} | {diff} | {alone} |")
    if result["speedup_vs_original"]:
        print(f"\nstage vs original: {result['speedup_vs_original']}x")


if __name__ == "__main__":
    main()
