"""The statistics do not depend on how many dataloader workers and ranks share the text: with a budget that
cuts the stream, 1 worker, 2 workers, 2 ranks and 2 ranks x 2 workers read the same texts (the stream's first
``stats.tokens`` tokens) into the same batches and give the same C (pipeline/stats/text.py ``plan_stream``,
datamodules/text.py). Ranks are simulated in-process (each rank's stream, the partial sums added, as the
stage's all-reduce does); the stage itself runs with 1 and 2 workers, and with 2 DDP processes (slow). And
the accumulation's matmuls run with full-precision reductions whatever the process set (pipeline/core/precision.py)."""

import json
import types
from collections import Counter

import pytest
import torch
from conftest import OFFLINE, main_in_process, run_cli, wiki_texts
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from rome.datamodules.text import ShardedTokenStream
from rome.modules.second_moment import PARTIAL_FORMAT, PartialStats, SecondMomentModule
from rome.pipeline.core.hooks import TraceDict
from rome.pipeline.core.precision import full_precision_reductions, precision_flags
from rome.pipeline.errors import UserError
from rome.pipeline.stats import second_moment as accumulation
from rome.pipeline.stats.second_moment import accumulate_second_moment
from rome.pipeline.stats.text import TextSource, feeding_worker_init, plan_stream

MAX_LENGTH, SORT_WINDOW, BATCH_TOKENS, BUDGET = 48, 4, 96, 1000
LAYER = 2


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """40 articles in two local jsonl files (25 + 15: windows never span a file, the last ones are short)."""
    folder = tmp_path_factory.mktemp("shards-text")
    texts = wiki_texts(40)
    for name, part in (("a.jsonl", texts[:25]), ("b.jsonl", texts[25:])):
        (folder / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return str(folder / "*.jsonl")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    path = tiny_model_dir("llama")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def stream(text, tok, rank=0, world=1, plan=None, resume=None):
    return ShardedTokenStream(
        TextSource(files=text),
        tok,
        max_length=MAX_LENGTH,
        chars_per_token=8,
        batch_tokens=BATCH_TOKENS,
        sort_window=SORT_WINDOW,
        tokens=BUDGET,
        rank=rank,
        world_size=world,
        resume=resume or {},
        plan=plan,
    )


def batches(text, tok, ranks: int, workers: int) -> list[dict]:
    """Every batch of a run with ``ranks`` x ``workers`` shards (each rank's dataloader, workers as real processes)."""
    plan = None
    if ranks * max(workers, 1) > 1:  # what TextDataModule.plan does on rank 0 and broadcasts
        plan = plan_stream(
            TextSource(files=text),
            tok,
            sort_window=SORT_WINDOW,
            max_length=MAX_LENGTH,
            chars_per_token=8,
            budget=BUDGET,
            workers=workers,
        )
    out = []
    for rank in range(ranks):
        loader = DataLoader(
            stream(text, tok, rank, ranks, plan),
            batch_size=None,
            num_workers=workers,
            worker_init_fn=feeding_worker_init if workers else None,
        )
        out += list(loader)
    return out


def rows(batch) -> list[tuple[int, ...]]:
    """The token rows of a batch (the pads dropped through the batch's index of real tokens)."""
    ids = batch["input_ids"]
    if batch["index"] is None:
        return [tuple(r) for r in ids.tolist()]
    real = torch.zeros(ids.numel(), dtype=torch.bool)
    real[batch["index"]] = True
    real = real.view(ids.shape)
    return [tuple(r[m].tolist()) for r, m in zip(ids, real)]


def second_moment(model, batches: list[dict]) -> tuple[torch.Tensor, int]:
    """C the way the stage's step sums it (float32 products into a float64 total), all shards added."""
    name = f"model.layers.{LAYER}.mlp.down_proj"
    d = model.config.intermediate_size
    total, count = torch.zeros(d, d, dtype=torch.float64), 0
    with torch.no_grad():
        for b in batches:
            with TraceDict(model, [name], retain_input=True, stop=name) as tr:
                model(input_ids=b["input_ids"], use_cache=False)
            keys = tr[name].input.reshape(-1, d)
            if b["index"] is not None:
                keys = keys.index_select(0, b["index"])
            accumulate_second_moment(total, keys, "fp32")
            count += b["tokens"]
    return total / count, count


def test_workers_and_ranks_read_the_same_tokens_and_give_the_same_c(text, tiny):
    model, tok = tiny
    data_tokens = sum(len(tok(t, truncation=True, max_length=MAX_LENGTH)["input_ids"]) for t in wiki_texts(40))
    assert data_tokens > 1.5 * BUDGET  # the budget cuts the stream
    one = batches(text, tok, ranks=1, workers=0)
    c_one, n_one = second_moment(model, one)
    assert n_one == BUDGET
    for ranks, workers in ((1, 2), (2, 0), (2, 2)):
        many = batches(text, tok, ranks, workers)
        assert len({b["shard"] for b in many}) == ranks * max(workers, 1)  # every shard had windows
        # the same texts, cut at the same place, packed into the same batches
        assert Counter(r for b in many for r in rows(b)) == Counter(r for b in one for r in rows(b))
        assert sorted(b["input_ids"].shape for b in many) == sorted(b["input_ids"].shape for b in one)
        c, n = second_moment(model, many)
        assert n == n_one
        rel = float((c - c_one).norm() / c_one.norm())
        assert rel < 1e-12, (ranks, workers, rel)  # the same float32 products, added in another order


def test_the_plan_is_the_stream_prefix(text, tiny):
    _, tok = tiny
    source = TextSource(files=text)
    kwargs = dict(sort_window=SORT_WINDOW, max_length=MAX_LENGTH, chars_per_token=8)
    plan = plan_stream(source, tok, budget=BUDGET, **kwargs)
    assert plan.tokens == BUDGET and plan.window_tokens[-1] > 0
    lengths = [[len(tok(t, truncation=True, max_length=MAX_LENGTH)["input_ids"]) for t in w] for w in source.windows(4)]
    whole = [sum(w) for w in lengths]
    assert list(plan.window_tokens[:-1]) == whole[: len(plan.window_tokens) - 1]  # whole windows, then the cut one
    assert plan_stream(source, tok, budget=BUDGET, workers=2, **kwargs) == plan  # counted by 2 workers in turn
    assert sum(plan.budget(s, 3) for s in range(3)) == BUDGET
    everything = plan_stream(source, tok, budget=10**9, **kwargs)  # the data run out first: every window whole
    assert list(everything.window_tokens) == whole


def test_a_shard_resumes_to_the_same_batches(text, tiny):
    """Two ranks; rank 1 stopped inside a window resumes (with the module's own bookkeeping) to the rest."""
    _, tok = tiny
    plan = plan_stream(
        TextSource(files=text), tok, sort_window=SORT_WINDOW, max_length=MAX_LENGTH, chars_per_token=8, budget=BUDGET
    )
    done = list(stream(text, tok, 1, 2, plan))
    cut = next(i for i, b in enumerate(done) if not b["last"] and b["window"] > 0)  # inside its second window
    bookkeeping = types.SimpleNamespace(shards={}, count=0, steps=0)
    for b in done[: cut + 1]:
        SecondMomentModule._advance(bookkeeping, b)
    rest = list(stream(text, tok, 1, 2, plan, resume=bookkeeping.shards))
    assert len(rest) == len(done) - cut - 1
    for a, b in zip(rest, done[cut + 1 :]):
        assert (a["window"], a["batch"], a["tokens"]) == (b["window"], b["batch"], b["tokens"])
        assert a["input_ids"].equal(b["input_ids"])


def test_an_earlier_versions_partial_state_is_refused_in_one_line(tmp_path):
    run = {"format": PARTIAL_FORMAT, "key": "k", "layers": [2]}
    old = PartialStats(tmp_path, {**run, "format": 2})
    old.save(0, {"count": 10, "sums": {2: torch.eye(4, dtype=torch.float64)}, "shards": {}})
    with pytest.raises(UserError, match="another version of the stats stage .* delete"):
        PartialStats(tmp_path, run).load(0)


def stage_args(model_dir, text, stats_dir, *extra):
    return [
        "stage=stats",
        f"model.name={model_dir}",
        f"data.files={text}",
        f"stats.dir={stats_dir}",
        f"data.max_length={MAX_LENGTH}",
        f"data.batch_tokens={BATCH_TOKENS}",
        f"data.sort_window={SORT_WINDOW}",
        f"stats.tokens={BUDGET}",
        f"stats.layers=[{LAYER}]",
        "stats.convergence.probes=0",
        "trainer.accelerator=cpu",
        *extra,
    ]


def stage_c(stats_dir):
    (f,) = stats_dir.glob(f"*/layer_{LAYER}.safetensors")
    got = load_file(f)
    return got["second_moment"], int(got["count"])


def test_the_stage_gives_the_same_c_with_1_and_2_workers(text, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    runs = {}
    for workers in (1, 2):
        code, out, errors = main_in_process(
            *stage_args(model_dir, text, tmp_path / str(workers), f"data.num_workers={workers}")
        )
        assert code == 0 and not errors, errors
        runs[workers] = stage_c(tmp_path / str(workers))
    (c1, n1), (c2, n2) = runs[1], runs[2]
    assert n1 == n2 == BUDGET
    assert float((c2.double() - c1.double()).norm() / c1.double().norm()) < 1e-6


@pytest.mark.slow
def test_two_ddp_processes_with_two_workers_each_give_the_c_of_one(text, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    one = run_cli(*stage_args(model_dir, text, tmp_path / "one", "data.num_workers=1"), env=OFFLINE)
    assert one.returncode == 0, one.stderr
    ddp = ("data.num_workers=2", "trainer.devices=2", "trainer.strategy=ddp")
    two = run_cli(*stage_args(model_dir, text, tmp_path / "two", *ddp), env=OFFLINE)
    assert two.returncode == 0, two.stderr
    (c1, n1), (c2, n2) = stage_c(tmp_path / "one"), stage_c(tmp_path / "two")
    assert n1 == n2 == BUDGET
    assert float((c2.double() - c1.double()).norm() / c1.double().norm()) < 1e-6


def test_the_accumulation_multiplies_with_full_precision_reductions(monkeypatch):
    """The process asks for fast, reduced-precision matmuls (cuBLAS's bf16/fp16 split-K sums, TF32, oneDNN
    bf16 passes); the accumulation's product runs without them, and the process's choice is back afterwards."""
    seen = []
    product = accumulation._fp32_product

    def recording(keys):
        seen.append(precision_flags())
        return product(keys)

    monkeypatch.setattr(accumulation, "_fp32_product", recording)
    cuda, cpu = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    fast = {
        (cuda, "allow_bf16_reduced_precision_reduction"): True,
        (cuda, "allow_fp16_reduced_precision_reduction"): True,
        (cuda, "fp32_precision"): "tf32",
        (cpu, "fp32_precision"): "bf16",
    }
    before = {key: getattr(*key) for key in fast}
    try:
        for (backend, name), value in fast.items():
            setattr(backend, name, value)
        total = torch.zeros(8, 8, dtype=torch.float64)
        keys = torch.randn(20000, 8, generator=torch.Generator().manual_seed(0))  # 3 blocks of PRODUCT_TOKENS
        accumulate_second_moment(total, keys, "fp32")
        assert {getattr(*key) for key in fast} == {True, "tf32", "bf16"}  # restored
        with full_precision_reductions(ieee_fp32=False):  # what the v* loop uses: float32 left as the process set
            assert precision_flags()["cuda.fp32_precision"] == "tf32"
            assert not precision_flags()["cuda.allow_bf16_reduced_precision_reduction"]
    finally:
        for (backend, name), value in before.items():
            setattr(backend, name, value)
    full = {
        "cuda.allow_bf16_reduced_precision_reduction": False,
        "cuda.allow_fp16_reduced_precision_reduction": False,
        "cuda.fp32_precision": "ieee",
        "mkldnn.fp32_precision": "ieee",
    }
    assert seen == [full] * 3
    exact = keys.double().T @ keys.double()
    assert float((total - exact).norm() / exact.norm()) < 1e-6
