"""One lever against the bf16 v* loop's launch cost, measured: ``torch.compile`` of the decoder layers after the
edited one. ``python benchmarks/compile_lever.py`` (SmolLM2 on the CPU; ``--device cuda --dtype bfloat16
--shape llama3-8b`` on a GPU).

The v* loop runs the layers after the edited one forward and backward at every step (``pipeline/editors/
value.py``); in eager mode each of their elementwise operators is a kernel launch (``benchmarks/step_ops.py``
counts them). Compiling those layers fuses the elementwise work (fewer launches; ``--mode reduce-overhead`` also
replays them as CUDA graphs). The edited layer itself stays eager: the key reads stop the forward by raising
from a hook on its down-projection, which a compiled region would have to trace through.

This runs the same ROME edits twice through the edit stage's loop (``fit_edits``; each from the clean weights,
verification and generation off, as ``step_ops.py``), eagerly and then with the layers compiled in place, and
prints per edit the outer wall time (device synchronised), the v* phase, and how far the compiled δ is from the
eager one; then how many graphs Dynamo compiled. Every decoder layer calls the KV cache with its own index, so
each compiles its own graph (and again when a new request's shapes first mark them dynamic): ``--cache-limit``
must exceed that count, or Dynamo falls back to eager for the rest without an error (its default is 8). A
``--shape`` model is random: timing only.

    python benchmarks/compile_lever.py --cases 3 stats.tokens=50000 \
        data.files=../shared/data/wikipedia/wikipedia_en_sample.jsonl.gz
    python benchmarks/compile_lever.py --shape llama-tiny --cases 3       # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from edit_latency import requests as edit_requests  # noqa: E402
from shapes import SHAPES, add_model_arguments, model_and_config, statistics_for  # noqa: E402


def timed_edits(editor, requests, cfg, weight, clean) -> list[tuple[float, float, torch.Tensor]]:
    """(outer wall s, v* s, δ) of each request's edit, each from the clean weights."""
    from rome.modules.edit_loop import fit_edits
    from rome.pipeline.core.timing import sync

    out = []
    for request in requests:
        sync(weight.device)
        started = time.perf_counter()
        edit = fit_edits(editor, [request], cfg, progress=False)[0]
        sync(weight.device)
        out.append((time.perf_counter() - started, edit.timings.get("v_star", float("nan")), edit.delta.float().cpu()))
        with torch.no_grad():
            weight.copy_(clean)
    return out


def apart(delta: torch.Tensor, reference: torch.Tensor) -> float:
    return float((delta - reference).norm() / reference.norm().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=3, help="edits (the Eiffel Tower, then CounterFact's first records)")
    p.add_argument("--mode", default="default", help="torch.compile mode (default, reduce-overhead, max-autotune)")
    p.add_argument("--cache-limit", type=int, default=256, help="Dynamo's recompile limit per code object")
    p.add_argument(
        "--against-float32",
        action="store_true",
        help="with --model and a 16-bit --dtype: also edit the float32 model, and say how far each δ is from its δ",
    )
    add_model_arguments(p)
    p.add_argument("--warm-cache", action="store_true", help="use the compiler's on-disk caches (default: empty ones)")
    args, overrides = p.parse_known_args(argv)
    if args.warm_cache:
        return measure(args, overrides)
    # a first compile as a user's first run pays it, not served from an earlier run's on-disk cache
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    cold = tempfile.mkdtemp(prefix="compile-lever-")
    os.environ.update(TORCHINDUCTOR_CACHE_DIR=cold, TRITON_CACHE_DIR=os.path.join(cold, "triton"))
    try:
        return measure(args, overrides)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(cold, ignore_errors=True)


def measure(args: argparse.Namespace, overrides: list[str]) -> int:
    from rome.cli import quiet

    quiet()
    warnings.filterwarnings("ignore")
    import torch._dynamo
    from torch._dynamo.utils import counters

    from rome.pipeline.editors.factory import build_editor

    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    layer = [f"edit.layer={SHAPES[args.shape][2]}"] if args.shape else []  # the shape's layer, as the others
    quiet_edits = ["edit.generate_tokens=0", "edit.verify.enabled=false", f"trainer.accelerator={accelerator}"]
    cfg, loaded = model_and_config(args, [*layer, *quiet_edits, *overrides])
    editor = build_editor(cfg, loaded, statistics=statistics_for(args, cfg, loaded))
    weight = loaded.spec.down_proj_weight(loaded.model, editor.layer)
    clean = weight.detach().clone()
    requests = edit_requests(args.cases)
    reference = None
    if args.against_float32 and not args.shape and args.dtype != "float32":
        args32 = argparse.Namespace(**{**vars(args), "dtype": "float32"})
        cfg32, loaded32 = model_and_config(args32, [*layer, *quiet_edits, *overrides])
        editor32 = build_editor(cfg32, loaded32, statistics=statistics_for(args, cfg32, loaded32))
        w32 = loaded32.spec.down_proj_weight(loaded32.model, editor32.layer)
        reference = [d for _, _, d in timed_edits(editor32, requests, cfg32, w32, w32.detach().clone())]
        del editor32, loaded32, w32
    timed_edits(editor, requests[:1], cfg, weight, clean)  # first-use costs (allocator, kernels) out of both runs
    eager = timed_edits(editor, requests, cfg, weight, clean)

    from rome.pipeline.core.hooks import get_module

    blocks = [b for i, b in enumerate(get_module(loaded.model, loaded.spec.blocks)) if i > editor.layer]
    for block in blocks:
        block.compile(mode=args.mode)
    counters.clear()
    with torch._dynamo.config.patch(cache_size_limit=args.cache_limit):
        compiled = timed_edits(editor, requests, cfg, weight, clean)
        again = timed_edits(editor, requests, cfg, weight, clean)

    model = f"random {args.shape} (timing only)" if args.shape else args.model
    print(
        f"{model}, {args.dtype}, {args.device}; ROME at layer {editor.layer}; the {len(blocks)} layers after it "
        f"compiled (mode {args.mode}, recompile limit {args.cache_limit})"
    )
    extra = " eager δ from float32 δ | compiled δ from float32 δ |" if reference else ""
    print(f"| edit | eager: s (v* s) | compiled, first time: s (v* s) | compiled, again: s (v* s) | δ apart |{extra}")
    print("|---|---|---|---|---|" + ("---|---|" if reference else ""))
    for i, (e, c, a) in enumerate(zip(eager, compiled, again)):
        row = f"| {i + 1} | {e[0]:.2f} ({e[1]:.2f}) | {c[0]:.2f} ({c[1]:.2f}) | {a[0]:.2f} ({a[1]:.2f}) |"
        row += f" {apart(a[2], e[2]):.1e} |"
        if reference:
            row += f" {apart(e[2], reference[i]):.1e} | {apart(a[2], reference[i]):.1e} |"
        print(row)
    print("(δ apart: ‖δ_compiled − δ_eager‖ / ‖δ_eager‖, the second compiled run's δ)")
    graphs = counters["stats"]["unique_graphs"]
    hit = " (the limit: later frames ran eagerly)" if graphs >= args.cache_limit else ""
    cache = "warm (the compiler's on-disk caches)" if args.warm_cache else "cold (empty caches)"
    print(f"\ngraphs compiled: {graphs}{hit}; graph breaks: {sum(counters['graph_break'].values())}; compiler {cache}")
    torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
