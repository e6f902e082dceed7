"""ROME's v* norms as solved, one request at a time on the clean model: where a record range's first request
stands among the next ones. With ``edit.nas.reference_values=1`` ROME's NAS reference (``edit.v.norm_anchor``)
is the first request's own ‖v*‖, so this says how hard that anchor holds the later edits of a sequential run
back; the default (20) takes the trimmed mean of the first 20 (docs/many-edits.md, "Norm anchoring on ROME: a
second record range" and "the reference over the first 20 edits").

    python benchmarks/rome_v_norms.py [--model smollm2-135m] [--starts 0,1000] [--n 20] [key=value ...]
    (the runs of docs/many-edits.md: data.files=../shared/data/wikipedia/wikipedia_en_sample.jsonl.gz
    stats.tokens=50000, the statistics the sequential runs used)

Each request is edited with the model's ROME settings (no anchor, no verification) and its layer restored
before the next; C comes from the statistics cache (computed there if missing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from edit_latency import COUNTERFACT  # noqa: E402  (the benchmarks' one path to the data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--starts", default="0,1000", help="comma-separated first CounterFact records of the ranges")
    parser.add_argument("--n", type=int, default=20, help="requests per range")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value), e.g. for the statistics")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from rome.modules.statistics import layer_statistics
    from rome.pipeline.core.loading import configure, load_configured
    from rome.pipeline.editors.factory import build_editor
    from rome.pipeline.evaluation.cases import load_cases

    fixed = ["edit.method=rome", "edit.verify.enabled=false", "edit.v.norm_anchor=false", "trainer.accelerator=cpu"]
    cfg = configure([f"model.name={args.model}", *args.overrides, *fixed])
    loaded = load_configured(cfg.model, "cpu")
    editor = build_editor(cfg, loaded, statistics=layer_statistics(cfg, loaded))
    weight = loaded.spec.down_proj_weight(loaded.model, editor.layers[0])
    clean = weight.detach().clone()
    print(f"{args.model}, ROME at layer {editor.layers[0]}: ‖v*‖ = ‖v0 + δ‖ as solved, each request alone")
    for start in (int(s) for s in args.starts.split(",")):
        cases, _ = load_cases(str(COUNTERFACT), args.n, start)
        norms = []
        for case in cases:
            (result,) = editor.edit([case.request])
            norms.append(float((result.v0 + result.delta).norm()))
            with torch.no_grad():
                weight.copy_(clean)
        first = norms[0]
        print(
            f"records {start}-{start + len(norms) - 1}: first {first:.1f}, mean {statistics.mean(norms):.1f}, "
            f"median {statistics.median(norms):.1f}, min {min(norms):.1f}, max {max(norms):.1f}; the first ranks "
            f"{sorted(norms).index(first) + 1} of {len(norms)} from the smallest "
            f"({100 * (first / statistics.mean(norms) - 1):+.0f}% against the mean)"
        )


if __name__ == "__main__":
    main()
