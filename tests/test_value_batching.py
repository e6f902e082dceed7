"""A request's v* does not depend on which requests share its batch, in bf16 as in float32 (pipeline/editors/
value.py ``batch_invariant``: eager attention, float32 reductions, per-request losses, δ and Adam state in
float32), and MEMIT's z optimised in micro-batches of requests (``edit.memit.micro_batch``) is the one-batch z
and gives the same update."""

import pytest
import torch
from test_memit import REQUESTS, TEMPLATES, context

from rome.pipeline.core.loading import configure, load_model
from rome.pipeline.core.requests import parse_requests
from rome.pipeline.editors import memit
from rome.pipeline.editors.value import (
    MICRO_BATCH_MEMORY,
    MicroBatches,
    ValueBatch,
    ValueOptimisation,
    build_rows,
    requests_per_micro_batch,
    step_memory,
)
from rome.pipeline.errors import UserError

# three requests whose rows differ in every length: subject position (prefix), suffix, target tokens
ROWS = [
    ("{} is located in the city of", "The Eiffel Tower", "Rome"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("In the long and winding history of the region, {} plays the", "Miles Davis", "trumpet and the piano"),
]


def optimise(model, spec, tok, requests, v0, hp):
    """δ of ``requests`` optimised together (ROME's loss at layer 1's MLP), and the attention
    implementation every forward of the optimisation saw."""
    rows = [build_rows(tok, TEMPLATES, p, s, t, ["{} is a"]) for p, s, t in requests]
    seen = set()
    hook = model.register_forward_pre_hook(lambda m, a: seen.add(m.config._attn_implementation))
    try:
        opt = ValueOptimisation(
            model, spec, spec.mlp_name(1), ValueBatch.build(model, spec, rows, tok.pad_token_id or 0), v0, hp
        )
        while not opt.step():
            pass
    finally:
        hook.remove()
    return opt.result(), opt.losses, seen


@pytest.mark.parametrize(
    "family, dtype, tolerance",
    [("llama", "bfloat16", 1e-3), ("gemma3_text", "bfloat16", 1e-3), ("llama", "float32", 1e-5)],
)
def test_a_requests_delta_does_not_depend_on_its_batch(tiny_model_dir, family, dtype, tolerance):
    loaded = load_model(str(tiny_model_dir(family)), device="cpu", dtype=dtype)
    model, tok, spec = loaded.model, loaded.tokenizer, loaded.spec
    hp = configure(["edit.v.steps=8"]).edit.v  # ROME's lr 0.5 (SDPA: bf16 δ 1% apart after 8 steps on a CPU)
    d = model.config.hidden_size
    v0 = torch.randn(len(ROWS), d, generator=torch.Generator().manual_seed(0)).to(model.dtype)
    before = model.config._attn_implementation
    alone, alone_losses, seen = optimise(model, spec, tok, ROWS[:1], v0[:1], hp)
    together, together_losses, _ = optimise(model, spec, tok, ROWS, v0, hp)
    assert seen == {"eager"} and model.config._attn_implementation == before  # switched for the loop only
    assert float(alone.norm()) > 0 and len(alone_losses[0]) > 1
    rel = float((together[0] - alone[0]).norm() / alone[0].norm())
    assert rel < tolerance, rel
    assert together_losses[0] == pytest.approx(alone_losses[0], rel=tolerance)


def test_memit_in_micro_batches_gives_the_one_batch_z_and_update(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    requests = parse_requests(REQUESTS)
    w0 = {layer: loaded.spec.down_proj_weight(loaded.model, layer).detach().clone() for layer in (1, 2)}
    runs = {}
    for micro_batch in (None, 2):  # None: auto, all at once on a CPU
        with torch.no_grad():
            for layer, w in w0.items():
                loaded.spec.down_proj_weight(loaded.model, layer).copy_(w)
        ctx, _ = context(loaded, "memit", [1, 2])
        ctx.micro_batch = micro_batch
        edit = ctx.begin(requests)
        assert isinstance(edit.optimisation, MicroBatches) == (micro_batch == 2)
        if micro_batch == 2:
            assert [p.batch.n_requests for p in edit.optimisation.parts] == [2, 1]
        ctx.advance(edit, "applied")
        runs[micro_batch] = edit.result
    one, micro = runs[None], runs[2]
    assert sum(micro.losses, []) == pytest.approx(sum(one.losses, []), rel=1e-6)
    assert float((micro.z - one.z).norm() / one.z.norm()) < 1e-6
    for layer in (1, 2):
        dw_one = one.updates[layer].left @ one.updates[layer].right.T
        dw_micro = micro.updates[layer].left @ micro.updates[layer].right.T
        assert float((dw_micro - dw_one).norm() / dw_one.norm()) < 1e-6


def test_on_a_cpu_auto_runs_all_requests_at_once_and_says_when_that_may_not_fit(tiny_model_dir, monkeypatch, capsys):
    """auto on a CPU does not depend on the free memory (the same z on every machine); where the step's estimate
    passes half the available RAM it prints which micro_batch would fit, and still runs all at once."""
    import types

    from rome.pipeline.editors import value

    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    model, tok, spec = loaded.model, loaded.tokenizer, loaded.spec
    rows = [build_rows(tok, TEMPLATES, p, s, t, ["{} is a"]) for p, s, t in ROWS]
    hp = configure(["edit.v.steps=1"]).edit.v
    v0 = torch.zeros(len(rows), model.config.hidden_size)
    memory = step_memory(model, spec, 1, rows)
    monkeypatch.setattr(value, "_memory_noted", False)
    for available, noted in ((100 * memory, False), (memory, True), (memory, False)):  # the note once a process
        monkeypatch.setattr(value.psutil, "virtual_memory", lambda a=available: types.SimpleNamespace(available=a))
        opt = value.optimise_values(model, spec, spec.mlp_name(1), 1, rows, v0, hp, tok.pad_token_id or 0)
        assert isinstance(opt, ValueOptimisation) and opt.batch.n_requests == 3  # all at once either way
        err = capsys.readouterr().err
        fit = requests_per_micro_batch(3, memory, available)
        assert (f"edit.memit.micro_batch={fit} splits it" in err) == noted, err
        assert fit == 1 or available > memory  # half of the step's own size fits one request of three


def test_micro_batch_setting_and_the_auto_size(tiny_model_dir):
    assert memit.micro_batch_setting(None) is None and memit.micro_batch_setting("auto") is None
    assert memit.micro_batch_setting(4) == 4
    for bad in (0, -1, "four", 2.5, True):
        with pytest.raises(UserError, match="edit.memit.micro_batch"):
            memit.micro_batch_setting(bad)
    # auto: a step of 100 requests that would take 48 GiB, on a 48 GB card with 24 GiB free: 8 GiB per micro-batch
    assert requests_per_micro_batch(100, 48 * 2**30, 24 * 2**30) == 100 * MICRO_BATCH_MEMORY // (48 * 2**30) == 16
    assert requests_per_micro_batch(100, 48 * 2**30, 8 * 2**30) == 8  # half the free memory
    assert requests_per_micro_batch(100, 2**30, 100 * 2**30) == 100  # all fit
    assert requests_per_micro_batch(100, 10**15, 2**30) == 1
    # the estimate grows with the rows and with the blocks after the layer where δ is added
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    model, tok, spec = loaded.model, loaded.tokenizer, loaded.spec
    rows = [build_rows(tok, TEMPLATES, p, s, t, ["{} is a"]) for p, s, t in ROWS]
    assert (
        step_memory(model, spec, 1, rows)
        > step_memory(model, spec, 1, rows[:1])
        > step_memory(model, spec, 3, rows[:1])
    )
