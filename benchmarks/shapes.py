"""Randomly initialised models of real sizes (GPT-J 6B, Llama-3 8B) built directly on a device, for the
benchmarks' timing runs on machines that do not hold the real weights (and a tiny Llama for smoke runs).
Timing only: the outcomes of a random model mean nothing."""

from __future__ import annotations

import argparse

import torch

__all__ = ["SHAPES", "build_shape", "model_and_config", "add_model_arguments", "statistics_for"]

SHAPES = {  # family, config, the layer the benchmarks edit / collect statistics for
    "gptj-6b": (
        "gptj",
        dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_positions=2048, vocab_size=50400, n_inner=16384),
        5,
    ),
    "llama3-8b": (
        "llama",
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        ),
        5,
    ),
    # not a real size: Llama's layout at a width a CPU runs in seconds, for smoke runs (gpu_check.py --tiny)
    "llama-tiny": (
        "llama",
        dict(
            hidden_size=64,
            num_hidden_layers=6,
            intermediate_size=160,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=49152,
            max_position_embeddings=2048,
        ),
        3,
    ),
}


def build_shape(shape: str, device: str, dtype: torch.dtype, num_layers: int | None):
    """A randomly initialised model of the real shape, built directly on ``device``, with SmolLM2's tokenizer;
    returns (LoadedModel, layer)."""
    import transformers as tf

    from pipeline.core.arch import arch_for
    from pipeline.core.loading import LoadedModel, load_model

    family, kwargs, layer = SHAPES[shape]
    if num_layers:  # a smaller stack of the same width: only for smoke-running a script without the memory
        kwargs = {**kwargs, ("n_layer" if family == "gptj" else "num_hidden_layers"): num_layers}
    config = (tf.GPTJConfig if family == "gptj" else tf.LlamaConfig)(**kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    tok = load_model("smollm2-135m", device="cpu").tokenizer
    return LoadedModel(
        model, tok, arch_for(model), {"name": f"random-{shape}", "revision": "timing-only"}, f"random-{shape}"
    ), layer


def model_and_config(args: argparse.Namespace, overrides: list[str]):
    """The benchmarks' model and its configuration with ``overrides``: ``--shape``, random at the real size and
    configured with its family's model file (configs/model/llama.yaml or gpt-j's); else ``--model``, loaded.
    Returns (cfg, LoadedModel)."""
    from rome.pipeline.core.loading import configure, load_model, resolve_dtype

    if args.shape:
        loaded, _ = build_shape(args.shape, args.device, resolve_dtype(args.dtype), args.num_layers)
        family = "llama" if SHAPES[args.shape][0] == "llama" else "EleutherAI/gpt-j-6b"
        return configure([f"model.name={family}", *overrides]), loaded
    cfg = configure([f"model.name={args.model}", *overrides])
    return cfg, load_model(args.model, device=args.device, dtype=args.dtype)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmarks' common choice of model and device: --device, --dtype, --model, --shape, --num-layers."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--model", default="smollm2-135m", help="embedded key, local directory or hub id")
    p.add_argument("--shape", choices=sorted(SHAPES), help="a random model of this real shape (timing only)")
    p.add_argument("--num-layers", type=int, help="with --shape: fewer blocks (a smoke run, not a measurement)")


_RANDOM_SPD: dict = {}  # (d_ff, layer, device) -> LayerStats: the random C of statistics_for, drawn once per process


def statistics_for(args: argparse.Namespace, cfg, loaded):
    """The statistics provider a benchmark builds its editors with: for a ``--shape`` model a random SPD C of
    the real size per layer (timing only; written to a temporary directory, so AlphaEdit's cached
    eigendecomposition has a file to sit beside), else C from the statistics cache (computed when missing)."""
    if not getattr(args, "shape", None):
        from modules.statistics import layer_statistics

        return layer_statistics(cfg, loaded)
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    from pipeline.stats.store import LayerStats

    def random_spd(layers):
        found = {}
        for layer in layers:
            d = loaded.spec.key_size(loaded.model, layer)
            key = (d, layer, str(args.device))
            if key not in _RANDOM_SPD:  # once per process: 1.6 GB to draw and write per layer at the 8B shape
                g = torch.Generator(device=args.device).manual_seed(layer)
                a = torch.randn(d, 2 * d, generator=g, device=args.device, dtype=torch.float32)
                c = (a @ a.T / (2 * d)).double().cpu()  # on the CPU, as a statistics file is loaded
                del a
                where = Path(tempfile.mkdtemp(prefix="random-spd-"))
                path = where / f"layer_{layer}.safetensors"
                save_file({"second_moment": c.contiguous()}, str(path))
                _RANDOM_SPD[key] = LayerStats(layer, loaded.spec.down_proj_name(layer), c, 2 * d, path)
            found[layer] = _RANDOM_SPD[key]
        return found

    return random_spd
