"""The GPU check: issue 21's table on one GPU in at most 8 minutes, every row with its goal and PASS / FAIL.

    python benchmarks/gpu_check.py                         # on a GPU: the Llama-3-8B shape, random weights
    python benchmarks/gpu_check.py --tiny --device cpu     # the same steps on a tiny random Llama (smoke run)
    python benchmarks/gpu_check.py --json results.json     # the rows as JSON too

It builds the Llama-3-8B shape once, in bf16, directly on the GPU (``benchmarks/shapes.py``: random
weights, **timing only**; the embedded SmolLM2 tokenizer), then runs these steps, each under its own time
limit (a step over it is reported as TIMEOUT and the check goes on with the next one):

1. ROME, bf16: ``--edits`` edits through the edit stage's loop (``fit_edits``) and the same edits with the
   original's full-forward v* loop (``edit_latency.reference_edit``): s/edit, the keys and v* phases, the
   peak GPU memory over the weights.
   With ``--profile DIR``: torch.profiler over two more bf16 edits of one new request (its shapes new, then
   again), their operator tables and the repeat's trace in DIR, and a row with the device's busy time against
   the wall clock, the kernel launches and the synchronisations.
2. ROME, fp32, C = I: the same on a float32 copy of the model (skipped when the GPU cannot hold it).
3. Statistics, bf16, the shape's layer (5), ``--stats-tokens`` tokens of the Wikipedia sample: forward only,
   the original's procedure and the stage (``stats_throughput``'s methods): tokens/s, the pass alone, the rest.
4. C's precision and the workers: 40k tokens through the stage with ``stats.product=exact`` and ``fp32`` (1
   worker), and ``fp32`` with 2 workers (windows of 2 texts, so both workers have some and the budget cuts
   the stream): C fp32 vs exact, and C with 2 workers vs 1.
5. MEMIT, bf16, ``--memit-requests`` CounterFact requests in one batch (layers 4-8, random SPD C per layer,
   ``edit.memit.micro_batch`` auto): seconds and peak GPU memory over the weights.
6. Batched v*, bf16, ``--batched-requests`` requests: the z optimisation of all of them at once against each
   alone (the speedup) and the largest relative difference between a request's δ in both.

A row's verdict compares the measured value with the issue's goal on the 8B shape on a GPU; with ``--tiny``
(or on a CPU) the timing and memory rows say ``n/a`` and only the numerical rows (C's precision, workers, δ)
are judged. Needs the project, the Wikipedia sample and CounterFact in ``../shared/data`` and the SmolLM2
tokenizer (on the lent GPU machine: ``bash ../shared/gpu/stage.sh`` here, then ``source
.gpu/on-device.sh`` there; docs/gpu.md, "The GPU check").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import signal
import statistics
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import stats_throughput  # noqa: E402
from edit_latency import COUNTERFACT, WIKI, reference_edit  # noqa: E402
from edit_latency import requests as edit_requests  # noqa: E402
from shapes import build_shape, statistics_for  # noqa: E402

from rome.pipeline.core.atomic import write_json  # noqa: E402
from rome.pipeline.stats.text import TextSource, plan_stream  # noqa: E402

GB = 1e9
CHECK_WINDOW = 2  # texts per window in the precision and worker rows: both workers get windows of a small budget


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the check measures, and its time limits (seconds)."""

    shape: str
    edits: int
    stats_tokens: int
    check_tokens: int  # the precision and worker rows
    memit_requests: int
    batched_requests: int
    budget: float  # the whole check
    limits: dict[str, float]
    overrides: tuple[str, ...] = ()  # configuration for the shape (the family file's MEMIT layers otherwise)


FULL = Plan(
    "llama3-8b",
    edits=4,
    stats_tokens=1_000_000,
    check_tokens=40_000,
    memit_requests=100,
    batched_requests=10,
    budget=470,
    limits={
        "build": 90,
        "rome-bf16": 80,
        "profile": 60,
        "rome-fp32": 80,
        "stats": 110,
        "checks": 75,
        "memit": 60,
        "batched": 60,
    },
)
TINY = Plan(
    "llama-tiny",
    edits=2,
    stats_tokens=4000,
    check_tokens=3000,
    memit_requests=6,
    batched_requests=3,
    budget=1500,
    limits={
        "build": 60,
        "rome-bf16": 300,
        "profile": 300,
        "rome-fp32": 300,
        "stats": 300,
        "checks": 300,
        "memit": 200,
        "batched": 200,
    },
    overrides=("edit.layers=[2,3]", "edit.v.steps=5", "edit.memit.v.steps=5"),
)

# every row the check prints, in order: (key, step, what is measured, the goal)
ROWS = [
    ("rome-fp32", "rome-fp32", "ROME edit, fp32, C = I, s/edit", "<= 2.0 s"),
    ("rome-bf16", "rome-bf16", "ROME edit, bf16, s/edit (mean incl. the first edit)", "<= 1.0 s"),
    ("rome-bf16-phases", "rome-bf16", "bf16 edit: keys / v* phase per edit, s", "info"),
    ("rome-bf16-memory", "rome-bf16", "peak GPU memory, bf16 edit", "<= weights + 2 GB"),
    ("stats-whole", "stats", "stats, bf16, whole call, tokens/s", ">= 2.5x the original"),
    ("stats-pass", "stats", "stats: streaming pass alone, tokens/s", ">= 85% of forward only"),
    ("stats-rest", "stats", "stats: whole call minus the pass (write, checksum), s", "<= 2 s"),
    ("c-precision", "checks", "C from bf16 keys, stats.product=fp32 vs exact (relative)", "<= 1e-6"),
    ("c-workers", "checks", "C with 2 dataloader workers vs 1, the budget cutting the stream", "<= 1e-6, same tokens"),
    ("memit", "memit", "MEMIT, one batch, bf16, s", "<= 11 s"),
    ("memit-memory", "memit", "MEMIT, one batch, bf16: peak GPU memory", "<= weights + 16 GB"),
    ("batched-speed", "batched", "batched v*, bf16: speedup over one at a time", ">= 5x"),
    ("batched-delta", "batched", "batched v*, bf16: δ batched vs alone (largest relative difference)", "<= 1e-3"),
    ("profile", "profile", "bf16 edit under torch.profiler (--profile): device busy / wall, launches, syncs", "info"),
    ("peak-memory", "end", "peak GPU memory over the check", "info"),
]
STEPS = ["build", "rome-bf16", "profile", "rome-fp32", "stats", "checks", "memit", "batched"]
NUMERICAL = {"c-precision", "c-workers", "batched-delta"}  # judged on any device and shape


@dataclasses.dataclass
class Row:
    key: str
    measure: str
    goal: str
    value: str = ""
    beside: str = ""
    verdict: str = ""
    data: dict = dataclasses.field(default_factory=dict)


class StepTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``StepTimeout`` in this (main) thread after ``seconds``: between two Python operations, so a step
    stops within one kernel launch or batch of the limit."""

    def expire(signum, frame):
        raise StepTimeout(f"over its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        counts = ("edits", "stats_tokens", "memit_requests", "batched_requests", "budget")
        chosen = {k: getattr(args, k) for k in counts}
        self.plan = dataclasses.replace(TINY if args.tiny else FULL, **{k: v for k, v in chosen.items() if v})
        self.device = args.device
        self.cuda = self.device.startswith("cuda")
        self.judged = self.cuda and not args.tiny  # timing and memory goals are the 8B shape's on a GPU
        self.rows = {key: Row(key, measure, goal) for key, _, measure, goal in ROWS}
        self.start = time.monotonic()
        self.loaded = None
        self.layer = 5
        self.weights = 0.0
        self.editor = None

    # -- running the steps -------------------------------------------------------------------------------

    def run(self) -> None:
        steps: dict[str, Callable[[], None]] = {
            "build": self.build,
            "rome-bf16": lambda: self.rome("bfloat16"),
            "profile": self.profile,
            "rome-fp32": lambda: self.rome("float32"),
            "stats": self.stats,
            "checks": self.checks,
            "memit": self.memit,
            "batched": self.batched,
        }
        for name in STEPS:
            left = self.plan.budget - (time.monotonic() - self.start)
            limit = min(self.plan.limits[name], left)
            if name == "profile" and not self.args.profile:
                self.rows["profile"].value, self.rows["profile"].verdict = "not asked for (--profile DIR)", "info"
                continue
            if name != "build" and self.loaded is None:
                self.fail_step(name, "not run: the model was not built")
                continue
            if limit < 5:
                self.fail_step(name, "not run: the check's time is spent")
                continue
            say(f"[{time.monotonic() - self.start:6.1f} s] {name} (limit {limit:.0f} s)")
            try:
                with time_limit(limit):
                    steps[name]()
            except StepTimeout as err:
                self.fail_step(name, f"TIMEOUT: {err}")
            except (Exception, SystemExit) as err:  # a broken step is a row's verdict, not the end of the check
                traceback.print_exc(file=sys.stderr)
                self.fail_step(name, f"ERROR: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            finally:
                gc.collect()
                if self.cuda:
                    torch.cuda.empty_cache()
            for key, row_step, _, _ in ROWS:  # each step's rows as soon as it ends: a kill from outside keeps them
                if row_step == name:
                    row = self.rows[key]
                    say(f"    {row.measure}: {row.value} [{row.verdict}]" + (f" ({row.beside})" if row.beside else ""))
            if self.args.json:
                write_json(self.args.json, [dataclasses.asdict(r) for r in self.rows.values()])
        peak = self.rows["peak-memory"]
        if self.cuda:
            peak.value = f"{torch.cuda.max_memory_allocated() / GB:.1f} GB (weights {self.weights:.1f} GB)"
        else:
            peak.value = "n/a (no GPU)"
        peak.verdict = "info"

    def fail_step(self, step: str, why: str) -> None:
        for key, row_step, _, _ in ROWS:
            row = self.rows[key]
            if row_step == step and not row.verdict:
                row.value, row.verdict = why, "TIMEOUT" if why.startswith("TIMEOUT") else "FAIL"
        if step == "build":
            say(f"build: {why}")

    def judge(self, key: str, ok: bool) -> None:
        row = self.rows[key]
        row.verdict = ("PASS" if ok else "FAIL") if (self.judged or key in NUMERICAL) else "n/a (not the 8B on a GPU)"

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_over_weights(self) -> float:
        return torch.cuda.max_memory_allocated() / GB - self.weights if self.cuda else float("nan")

    def ns(self, **kw) -> types.SimpleNamespace:
        """The options ``stats_throughput``'s and ``shapes``' functions read."""
        base = dict(
            device=self.device,
            dtype="bfloat16",
            shape=self.plan.shape,
            tokens=self.plan.stats_tokens,
            max_length=1024,
            batch_tokens="auto",
            workers=1,
            check_syncs=False,
        )
        return types.SimpleNamespace(**{**base, **kw})

    def configure(self, *overrides: str):
        from rome.pipeline.core.loading import configure

        return configure(
            [
                "model.name=llama",  # the family file: Llama-3-8B's MEMIT layers
                f"data.files={WIKI}",
                "stats.tokens=50000",
                "edit.generate_tokens=0",
                "edit.verify.enabled=false",
                f"trainer.accelerator={'gpu' if self.cuda else 'cpu'}",
                f"model.cache_dir={self.tmp / 'cache'}",
                f"stats.dir={self.tmp / 'stats'}",
                *self.plan.overrides,
                *overrides,
            ]
        )

    # -- the steps ---------------------------------------------------------------------------------------

    def build(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.loaded, self.layer = build_shape(self.plan.shape, self.device, torch.bfloat16, None)
        self.weights = sum(p.numel() * p.element_size() for p in self.loaded.model.parameters()) / GB
        say(f"built random {self.plan.shape} in bf16 on {self.device}: {self.weights:.1f} GB of weights")

    def rome(self, dtype: str) -> None:
        from rome.modules.edit_loop import fit_edits
        from rome.pipeline.core.timing import sync
        from rome.pipeline.editors.factory import build_editor

        loaded = self.loaded
        if dtype == "float32":
            if self.cuda:
                free = torch.cuda.mem_get_info()[0] / GB
                if free < 2.2 * self.weights + 8:
                    raise RuntimeError(f"a float32 copy needs {2 * self.weights:.0f} GB; {free:.0f} GB free")
            loaded = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).float())
        identity = dtype == "float32"  # the fp32 row is C = I; bf16 uses a random SPD C of the real size
        cfg = self.configure(f"edit.layer={self.layer}", f"edit.mom2_adjustment={not identity}", "edit.method=rome")
        provider = statistics_for(self.ns(), cfg, loaded)
        weight = loaded.spec.down_proj_weight(loaded.model, self.layer)
        clean = weight.detach().clone()
        editor = build_editor(cfg, loaded, statistics=provider)
        requests = edit_requests(self.plan.edits)
        self.reset_peak()
        torch.manual_seed(0)
        stage = fit_edits(editor, requests, cfg, progress=False)
        peak = self.peak_over_weights() if dtype == "bfloat16" else None
        stage_s = [e.timings["wall"] for e in stage]
        with torch.no_grad():
            weight.copy_(clean)
        reference, reference_s = [], []
        for request in requests:
            sync(loaded.model)
            t = time.perf_counter()
            reference.append(reference_edit(editor, request, cfg.edit))
            sync(loaded.model)
            reference_s.append(time.perf_counter() - t)
        with torch.no_grad():
            weight.copy_(clean)
        mean = statistics_mean(stage_s)
        key = "rome-bf16" if dtype == "bfloat16" else "rome-fp32"
        row = self.rows[key]
        row.value = f"{mean:.2f} ({', '.join(f'{s:.2f}' for s in stage_s)})"
        row.beside = f"reference loop {statistics_mean(reference_s):.2f} ({', '.join(f'{s:.2f}' for s in reference_s)})"
        row.data = {"stage_s": stage_s, "reference_s": reference_s}
        self.judge(key, mean <= (1.0 if dtype == "bfloat16" else 2.0))
        if dtype == "bfloat16":
            phases = self.rows["rome-bf16-phases"]
            keys, v_star = [e.timings.get("keys", 0.0) for e in stage], [e.timings.get("v_star", 0.0) for e in stage]
            ref_v = [e.timings.get("v_star", 0.0) for e in reference]
            phases.value = f"keys {fmt(keys)}; v* {fmt(v_star)}"
            phases.beside = f"reference keys {fmt([e.timings.get('keys', 0.0) for e in reference])}; v* {fmt(ref_v)}"
            phases.verdict = "info"
            memory = self.rows["rome-bf16-memory"]
            memory.value = f"weights + {peak:.1f} GB" if self.cuda else "n/a (no GPU)"
            self.judge("rome-bf16-memory", self.cuda and peak <= 2.0)
        del editor, loaded

    def profile(self) -> None:
        """torch.profiler over two bf16 ROME edits of one request that the timed edits did not use: first with
        its shapes new to the run, then again. Writes each edit's tables (by device time, by CPU time) to
        ``--profile``, and the trace of the repeat; the row: the device's busy time against the wall clock
        (far below it: the loop waits on launches, Python or syncs, not on arithmetic), kernel launches, syncs."""
        import gzip
        import shutil

        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        from rome.modules.edit_loop import fit_edits
        from rome.pipeline.core.timing import sync
        from rome.pipeline.editors.factory import build_editor

        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.configure(f"edit.layer={self.layer}", "edit.mom2_adjustment=true", "edit.method=rome")
        editor = build_editor(cfg, self.loaded, statistics=statistics_for(self.ns(), cfg, self.loaded))
        weight = self.loaded.spec.down_proj_weight(self.loaded.model, self.layer)
        clean = weight.detach().clone()
        request = edit_requests(self.plan.edits + 1)[-1]  # after the timed edits' requests: shapes not seen yet
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        by_device = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        found = {}
        for label in ("new", "repeat"):
            torch.manual_seed(0)
            with profiler(activities=activities) as prof:
                sync(self.loaded.model)
                t = time.perf_counter()
                (edit,) = fit_edits(editor, [request], cfg, progress=False)
                sync(self.loaded.model)
                wall = time.perf_counter() - t
            with torch.no_grad():
                weight.copy_(clean)
            counts = profile_counts(prof.events())
            found[label] = {"wall_s": wall, "phases": dict(edit.timings), **counts}
            table = prof.key_averages()
            (out / f"profile_{label}.txt").write_text(
                f"{label}: {request.prompt!r} -> {request.target_new!r}; wall {wall:.2f} s; {counts}\n"
                f"phases: {edit.timings}\n\n"
                + table.table(sort_by=by_device, row_limit=40, max_name_column_width=70)
                + "\n\n"
                + table.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)
            )
            row = self.rows["profile"]  # before the trace's export (the slowest part): a timeout keeps the row
            row.value = "; ".join(
                f"{k}: wall {v['wall_s']:.2f} s, device busy {v['busy_s']:.2f} s, {v['launches']} launches, "
                f"{v['syncs']} syncs"
                for k, v in found.items()
            )
            row.beside = f"tables and trace in {out}"
            row.data, row.verdict = found, "info"
            if label == "repeat":
                trace = out / "trace_repeat.json"
                prof.export_chrome_trace(str(trace))
                with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                trace.unlink()

    def stats(self) -> None:
        from rome.pipeline.stats.store import batch_tokens

        layer, ns = self.layer, self.ns()
        per_batch = batch_tokens(stats_throughput.stage_cfg(ns, layer, "fp32", "unused"), self.device.split(":")[0])
        texts, counts = stats_throughput.first_texts(self.loaded.tokenizer, ns.tokens, ns.max_length)
        forward_s, _, forward_n, _ = stats_throughput.run_forward_only(self.loaded, layer, ns, per_batch)
        original_s, _, original_n, _ = stats_throughput.run_original(self.loaded, layer, texts, counts, ns)
        stage_s, _, stage_n, extra = stats_throughput.run_stage(self.loaded, layer, "fp32", ns)
        assert forward_n == original_n == stage_n == ns.tokens, (forward_n, original_n, stage_n)
        rate = {k: ns.tokens / s for k, s in (("forward", forward_s), ("original", original_s), ("stage", stage_s))}
        pass_s = extra["pass"]
        whole = self.rows["stats-whole"]
        whole.value = f"{rate['stage'] / 1e3:.1f}k ({stage_s:.1f} s, {ns.tokens:,} tokens, layer {layer})"
        whole.beside = f"original {rate['original'] / 1e3:.1f}k; forward only {rate['forward'] / 1e3:.1f}k"
        self.judge("stats-whole", rate["stage"] >= 2.5 * rate["original"])
        alone = self.rows["stats-pass"]
        share = (ns.tokens / pass_s) / rate["forward"]
        alone.value = f"{ns.tokens / pass_s / 1e3:.1f}k ({share:.0%} of forward only)"
        self.judge("stats-pass", share >= 0.85)
        rest = self.rows["stats-rest"]
        rest.value = f"{stage_s - pass_s:.1f}"
        self.judge("stats-rest", stage_s - pass_s <= 2.0)

    def stage_c(self, product: str, workers: int) -> tuple[torch.Tensor, int]:
        """C from the stats stage over ``check_tokens`` tokens, windows of ``CHECK_WINDOW`` texts."""
        from omegaconf import OmegaConf

        from rome.modules.statistics import collect

        ns = self.ns(tokens=self.plan.check_tokens, workers=workers)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = stats_throughput.stage_cfg(ns, self.layer, product, tmp)
            cfg = OmegaConf.merge(cfg, {"data": {"sort_window": CHECK_WINDOW}, "stats": {"convergence": {"probes": 0}}})
            found = collect(cfg, self.loaded, [self.layer])[self.layer]
        return found.second_moment.double(), found.count

    def checks(self) -> None:
        exact, n_exact = self.stage_c("exact", 1)
        fast, n_fast = self.stage_c("fp32", 1)
        two, n_two = self.stage_c("fp32", 2)
        precision = float((fast - exact).norm() / exact.norm())
        row = self.rows["c-precision"]
        row.value = f"{precision:.1e} ({n_fast:,} tokens)"
        self.judge("c-precision", precision <= 1e-6 and n_fast == n_exact)
        workers = float((two - fast).norm() / fast.norm())
        plan = plan_stream(
            TextSource(files=str(WIKI)),
            self.loaded.tokenizer,
            sort_window=CHECK_WINDOW,
            max_length=1024,
            chars_per_token=8,
            budget=self.plan.check_tokens,
        )
        windows = len(plan.window_tokens)  # at least 2: each worker has text, and the last one is cut
        row = self.rows["c-workers"]
        row.value = f"{workers:.1e}; tokens {n_two:,} vs {n_fast:,}; {windows} windows"
        self.judge("c-workers", workers <= 1e-6 and n_two == n_fast == self.plan.check_tokens and windows >= 2)

    def memit_editor(self):
        """One MEMIT editor (its C factorised once) for the MEMIT and the batched v* steps."""
        from rome.pipeline.editors.factory import build_editor

        if self.editor is None:
            cfg = self.configure("edit.method=memit", f"edit.batch_size={self.plan.memit_requests}")
            self.editor = build_editor(cfg, self.loaded, statistics=statistics_for(self.ns(), cfg, self.loaded))
        return self.editor

    def counterfact(self, n: int):
        from rome.pipeline.core.requests import parse_requests

        return parse_requests(json.loads(COUNTERFACT.read_text())[:n])

    def memit(self) -> None:
        from rome.pipeline.core.timing import sync

        n = self.plan.memit_requests
        editor = self.memit_editor()
        clean = {
            layer: self.loaded.spec.down_proj_weight(self.loaded.model, layer).detach().clone()
            for layer in editor.layers
        }
        requests = self.counterfact(n)
        self.reset_peak()
        sync(self.loaded.model)
        t = time.perf_counter()
        (edit,) = editor.edit(requests)
        sync(self.loaded.model)
        seconds = time.perf_counter() - t
        peak = self.peak_over_weights()
        with torch.no_grad():
            for layer, w in clean.items():
                self.loaded.spec.down_proj_weight(self.loaded.model, layer).copy_(w)
        row = self.rows["memit"]
        parts = getattr(edit.optimisation, "parts", [edit.optimisation])
        row.value = f"{seconds:.1f} ({n} requests, {len(parts)} micro-batch(es), layers {editor.layers})"
        row.data = {"timings": edit.timings, "micro_batches": len(parts)}
        row.beside = "phases " + ", ".join(f"{k} {v:.1f}" for k, v in edit.timings.items())
        self.judge("memit", seconds <= 11.0)
        memory = self.rows["memit-memory"]
        memory.value = f"weights + {peak:.1f} GB" if self.cuda else "n/a (no GPU)"
        self.judge("memit-memory", self.cuda and peak <= 16.0)

    def batched(self) -> None:
        from rome.pipeline.core.timing import sync

        n = self.plan.batched_requests
        editor = self.memit_editor()
        requests = self.counterfact(n)

        def optimise(batch):
            state = editor.begin(batch)
            while not editor.step(state):
                pass
            return state.optimisation.result()

        sync(self.loaded.model)
        t = time.perf_counter()
        together = optimise(requests)
        sync(self.loaded.model)
        together_s = time.perf_counter() - t
        alone = []
        for r in requests:
            alone.append(optimise([r])[0])
        sync(self.loaded.model)
        alone_s = time.perf_counter() - t - together_s
        alone = torch.stack(alone)
        diff = float(((together - alone).norm(dim=-1) / alone.norm(dim=-1)).max())
        speed = self.rows["batched-speed"]
        speed.value = f"{alone_s / together_s:.1f}x ({together_s:.1f} s vs {alone_s:.1f} s, {n} requests)"
        self.judge("batched-speed", alone_s / together_s >= 5.0)
        delta = self.rows["batched-delta"]
        delta.value = f"{diff:.1e}"
        self.judge("batched-delta", diff <= 1e-3)
        self.editor = None

    # -- the report --------------------------------------------------------------------------------------

    def report(self) -> list[dict]:
        device = torch.cuda.get_device_name() if self.cuda else f"cpu, {torch.get_num_threads()} threads"
        print(
            f"\nGPU check: random {self.plan.shape} (timing only), {device}, torch {torch.__version__}, "
            f"{time.monotonic() - self.start:.0f} s"
        )
        if not self.judged:
            print("(not the 8B shape on a GPU: the timing and memory rows are measured, not judged)")
        print("| measure | value | beside it | goal | verdict |")
        print("|---|---|---|---|---|")
        for row in self.rows.values():
            print(f"| {row.measure} | {row.value} | {row.beside} | {row.goal} | {row.verdict} |")
        verdicts = [r.verdict for r in self.rows.values()]
        print(f"\n{verdicts.count('PASS')} PASS, {sum(v in ('FAIL', 'TIMEOUT') for v in verdicts)} FAIL or TIMEOUT")
        return [dataclasses.asdict(r) for r in self.rows.values()]


def profile_counts(events) -> dict:
    """From a profiler's events: the device's busy seconds (the union of its kernels' and copies' intervals:
    overlaps count once), the kernel launches and the host-device synchronisations (explicit ones and the
    blocking copies to the host that ``.item()`` and ``.cpu()`` make)."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type != torch.autograd.DeviceType.CPU and e.time_range.end > e.time_range.start
    )
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    names = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    launches = sum(n.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch")) for n in names)
    syncs = sum("Synchronize" in n for n in names)
    copies = sum(n.startswith("cudaMemcpy") and "Async" not in n for n in names)
    return {
        "busy_s": busy / 1e6,
        "launches": launches,
        "syncs": syncs,
        "blocking_copies": copies,
        "kernels": len(spans),
    }


def statistics_mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> None:
    from rome.cli import quiet

    quiet()  # no framework banners or tips (the CLI's settings)
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama and small counts (a smoke run)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--profile", help="profile two bf16 ROME edits with torch.profiler; tables and trace to this folder")
    p.add_argument("--edits", type=int, help="ROME edits per method (default 4; --tiny 2)")
    p.add_argument("--stats-tokens", type=int, help="tokens of the statistics rows (default 1,000,000; --tiny 4000)")
    p.add_argument("--memit-requests", type=int, help="requests of the MEMIT batch (default 100; --tiny 6)")
    p.add_argument("--budget", type=float, help="seconds for the whole check, the build included (default 470)")
    p.add_argument("--batched-requests", type=int, help="requests of the batched v* rows (default 10; --tiny 3)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; pass --device cpu (with --tiny for a smoke run)")
    check = Check(args)
    check.run()
    rows = check.report()
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
