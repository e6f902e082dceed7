"""ENCORE's parts (Gupta et al. 2025; configs/method/encore.yaml) on tiny random models: most-probable early
stopping of the value optimisation (MPES), finished requests leaving the batch, and MEMIT's solve with the norm
constraint and the earlier batches' keys."""

import types

import pytest
import torch
from test_memit import REQUESTS, TEMPLATES, batch_edit_args, context, random_spd

from rome.pipeline.core.loading import configure, load_model
from rome.pipeline.core.requests import parse_requests
from rome.pipeline.editors import memit
from rome.pipeline.editors.reference import reference_loss
from rome.pipeline.editors.settings import method_hparams
from rome.pipeline.editors.value import ValueBatch, ValueOptimisation, build_rows

# the subject ends the prompt and the new object is one token: δ at layer 1 of the tiny model can put it on top
# (the first two within a few steps; the third, in mid-sentence, never within 12)
ROWS = [
    ("People who visit Paris see {}", "The Eiffel Tower", "the"),
    ("Jazz was played by {}", "Miles Davis", "of"),
    ("The mother tongue of {} is", "Danielle Darrieux", "and"),
]


def on_top(model, spec, tok, rows, delta):
    """Whether every target token is the argmax in every rewriting row, by the plain full-forward loss
    (``reference_loss``: the whole rows, δ added to layer 1's MLP output, no prefix cache, no suffix tricks)."""
    v0_norm, hp = torch.ones(1), configure([]).edit.v
    with torch.no_grad():
        pad = tok.pad_token_id or 0
        parts = reference_loss(model, spec, spec.mlp_name(1), rows, pad, delta[None], v0_norm, None, hp)
    return bool(parts.target_top)


def optimisation(loaded, requests, hp, v0):
    model, tok, spec = loaded.model, loaded.tokenizer, loaded.spec
    rows = [build_rows(tok, TEMPLATES, p, s, t, ["{} is a"]) for p, s, t in requests]
    batch = ValueBatch.build(model, spec, rows, tok.pad_token_id or 0)
    return ValueOptimisation(model, spec, spec.mlp_name(1), batch, v0, hp), rows


def test_mpes_stops_at_the_nth_step_the_new_object_is_on_top(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    model, tok, spec = loaded.model, loaded.tokenizer, loaded.spec
    base = ["edit.v.steps=40", "edit.v.early_stop_loss=0", "edit.v.lr=0.5", "edit.v.clamp_norm_factor=100"]
    v0 = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    # without MPES: δ after every evaluation, each tested by a plain forward
    plain, rows = optimisation(loaded, ROWS[:1], configure(base).edit.v, v0)
    deltas = [plain.result()[0]]
    while not plain.step():
        deltas.append(plain.result()[0])
    tops = [i for i, d in enumerate(deltas) if on_top(model, spec, tok, rows[0], d)]
    assert len(tops) >= 2 and tops[0] > 0, tops  # the target is not on top at first, and gets there
    for n in (1, 2):
        mpes, _ = optimisation(loaded, ROWS[:1], configure([*base, f"edit.v.most_probable_stop={n}"]).edit.v, v0)
        while not mpes.step():
            pass
        assert len(mpes.losses[0]) == tops[n - 1] + 1  # stopped at that evaluation, before stepping
        torch.testing.assert_close(mpes.result()[0], deltas[tops[n - 1]], rtol=1e-5, atol=1e-6)


def test_finished_requests_leave_the_batch_and_the_rest_go_on_as_alone(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    hp = configure(["edit.v.steps=12", "edit.v.most_probable_stop=1", "edit.v.clamp_norm_factor=100"]).edit.v
    v0 = torch.randn(len(ROWS), loaded.model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    together, _ = optimisation(loaded, ROWS, hp, v0)
    sizes = []
    while not together.step():
        sizes.append(sorted(set(together.batch.row_request.tolist())))
    steps = [len(losses) for losses in together.losses]
    assert len(set(steps)) > 1, steps  # the requests stop at different steps
    first = min(range(len(ROWS)), key=lambda r: steps[r])
    assert first not in sizes[-1] and len(sizes[-1]) < len(ROWS)  # the batch no longer computes it
    for r in range(len(ROWS)):
        alone, _ = optimisation(loaded, ROWS[r : r + 1], hp, v0[r : r + 1])
        while not alone.step():
            pass
        assert len(alone.losses[0]) == steps[r]
        assert together.losses[r] == pytest.approx(alone.losses[0], rel=1e-5)
        rel = float((together.result()[r] - alone.result()[0]).norm() / alone.result()[0].norm())
        assert rel < 1e-5, (r, rel)


def test_encore_solve_adds_the_norm_constraint_and_the_earlier_batches_keys(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    lam, lam_n = 3.0, 0.5
    settings = [
        f"edit.memit.mom2_update_weight={lam}",
        f"edit.memit.norm_constraint={lam_n}",
        "edit.memit.preserve_edits=true",
    ]
    ctx, _ = context(loaded, "memit", [2], *settings)
    c = random_spd(loaded.spec.key_size(loaded.model, 2), seed=3)
    memit.prepare(ctx, {2: types.SimpleNamespace(second_moment=c.float())})
    c = c.float().double()
    assert ctx.keeps_keys and not ctx.preserved
    eye = torch.eye(c.shape[0], dtype=torch.float64)
    first = memit.batch_edit(ctx, parse_requests(REQUESTS[:2]))
    k1 = first.keys[2]
    torch.testing.assert_close(ctx.preserved[2], k1 @ k1.T)
    second = memit.batch_edit(ctx, parse_requests(REQUESTS[2:]))
    k2 = second.keys[2]  # one layer: its keys before and after its own update are the same
    for update, k, earlier in ((first.updates[2], k1, 0), (second.updates[2], k2, k1 @ k1.T)):
        delta_w = update.left @ update.right.T
        lhs = delta_w @ (lam * c + lam_n * eye + earlier + k @ k.T)
        rhs = update.left @ k.T
        assert float((lhs - rhs).norm() / rhs.norm()) < 1e-8
    assert set(ctx.state()) >= {"preserved.2"}  # a stopped run resumes with them

    # without the settings MEMIT keeps no keys and solves with λC alone (the paper's)
    plain, _ = context(loaded, "memit", [2], f"edit.memit.mom2_update_weight={lam}")
    memit.prepare(plain, {2: types.SimpleNamespace(second_moment=c.float())})
    result = memit.batch_edit(plain, parse_requests(REQUESTS[:2]))
    assert not plain.keeps_keys and not plain.preserved and not any(k.startswith("preserved") for k in plain.state())
    delta_w = result.updates[2].left @ result.updates[2].right.T
    k = result.keys[2]
    lhs, rhs = delta_w @ (lam * c + k @ k.T), result.updates[2].left @ k.T
    assert float((lhs - rhs).norm() / rhs.norm()) < 1e-8


def test_the_encore_method_file_is_memit_with_mpes_the_constraint_and_kept_keys():
    cfg = configure(["model.name=smollm2-135m", "edit.encore.norm_constraint=7"])
    hp = method_hparams(cfg, cfg.method.encore, measure_only=True)
    assert cfg.method.encore["class"] == "memit"
    assert hp.memit.norm_constraint == 7 and hp.memit.v.most_probable_stop == 2
    assert hp.memit.preserve_edits and not hp.memit.norm_anchor
    assert hp.memit.mom2_update_weight == 1500  # the model file's λ stays
    assert configure(["model.name=smollm2-135m"]).edit.encore.norm_constraint == 2.0  # λ_n scaled with λ
    plain = method_hparams(cfg, cfg.method.memit, measure_only=True)
    assert plain.memit.norm_constraint == 0 and plain.memit.v.most_probable_stop == 0 and not plain.memit.preserve_edits


def test_edit_method_encore_records_its_keys_and_a_later_run_preserves_them(tiny_model_dir, small_wiki, tmp_path):
    import json

    from conftest import run_main
    from safetensors.torch import load_file

    out = tmp_path / "ledger"

    def cli(requests, *extra):
        return run_main(
            *batch_edit_args(tiny_model_dir("llama"), small_wiki, tmp_path, "encore"),
            f"request={json.dumps(requests)}",
            *extra,
            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        )

    first = cli(REQUESTS)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count("encore batch [") == 2  # 3 requests in batches of 2, under the method's own name
    ledger = json.loads((out / "ledger.json").read_text())
    assert [(e["method"], len(e["requests"])) for e in ledger["entries"]] == [("memit", 2), ("memit", 1)]
    assert {k for k in load_file(out / ledger["entries"][0]["file"])} >= {"keys.1", "keys.2"}
    second = cli([{"prompt": "{} is in", "subject": "Madrid", "target_new": "Oslo"}])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "preserving the keys of the ledger's earlier MEMIT batches (layers [1, 2])" in second.stdout
    variant = cli(  # a variant defined from the method file runs under its own name, without the keys
        REQUESTS,
        "method.encore_keys_off={class: encore, memit: {preserve_edits: false}}",
        "edit.method=encore_keys_off",
        f"edit.out={tmp_path / 'ledger_keys_off'}",
    )
    assert variant.returncode == 0, variant.stderr[-3000:]
    assert variant.stderr.count("encore_keys_off batch [") == 2
    entries = json.loads((tmp_path / "ledger_keys_off" / "ledger.json").read_text())["entries"]
    assert not any(k.startswith("keys.") for k in load_file(tmp_path / "ledger_keys_off" / entries[0]["file"]))
    bad = cli(REQUESTS, "edit.method=encor")
    assert bad.returncode == 2 and "edit.method=encor is not one of" in bad.stderr and "encore" in bad.stderr
