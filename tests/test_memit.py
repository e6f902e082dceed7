"""MEMIT and AlphaEdit (pipeline/editors/memit.py) on tiny random models: the normal equations, lambda -> infinity,
one request in one layer is ROME, the null-space projection spares preserved keys."""

import pytest
import torch

from rome.pipeline.core.loading import configure, load_model
from rome.pipeline.core.requests import parse_requests
from rome.pipeline.editors import memit, rome
from rome.pipeline.editors.rank_one import KeySolver
from rome.pipeline.stats.spectrum import (
    cached_eigendecomposition,
    describe_null_space,
    eigendecomposition,
    null_space_projector,
    null_space_share,
)

TEMPLATES = ["{}", "The cat sat on the mat. {}", "Therefore we went home. {}"]
REQUESTS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": "tennis"},
]


def random_spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * d)


def context(loaded, method, layers, *overrides, c=None):
    hp = configure(["edit.v.steps=3", "edit.memit.v.steps=4", *overrides]).edit
    d = loaded.spec.key_size(loaded.model, layers[0])
    c = random_spd(d) if c is None else c
    editor = memit.AlphaEditEditor if method == "alphaedit" else memit.MemitEditor
    ctx = editor(method, loaded.model, loaded.tokenizer, loaded.spec, hp, layers, TEMPLATES, batch_size=100)
    for layer in layers:
        ctx.solvers[layer] = KeySolver(c)
        ctx.projectors[layer] = null_space_projector(*eigendecomposition(c), float(hp.alphaedit.nullspace_threshold))[0]
    return ctx, c


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_memit_update_satisfies_its_normal_equations(tiny_model_dir, family):
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    ctx, c = context(loaded, "memit", [2], "edit.memit.mom2_update_weight=3.0")
    w0 = loaded.spec.down_proj_matrix(loaded.model, 2).detach().double().clone()
    result = memit.batch_edit(ctx, parse_requests(REQUESTS))
    k, update = result.keys[2], result.updates[2]
    # K of the final model is read after the edit; the solve used the keys before it: same layer, same inputs
    delta_w = update.left @ update.right.T  # [d_model, d_ff]
    w1 = loaded.spec.down_proj_matrix(loaded.model, 2).detach().double()
    assert float((w1 - w0 - delta_w).norm() / delta_w.norm()) < 1e-5  # written as computed (float32 weights)
    lhs = delta_w @ (3.0 * c + k @ k.T)
    rhs = update.left @ k.T
    assert float((lhs - rhs).norm() / rhs.norm()) < 1e-8
    assert result.norms[2]["delta_w"] == pytest.approx(float(delta_w.norm()), rel=1e-9)


def test_memit_with_huge_lambda_changes_nothing(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    ctx, _ = context(loaded, "memit", [1, 2], "edit.memit.mom2_update_weight=1e12")
    before = {layer: loaded.spec.down_proj_weight(loaded.model, layer).detach().clone() for layer in (1, 2)}
    result = memit.batch_edit(ctx, parse_requests(REQUESTS))
    for layer in (1, 2):
        assert result.norms[layer]["relative_update"] < 1e-8
        torch.testing.assert_close(loaded.spec.down_proj_weight(loaded.model, layer), before[layer], rtol=0, atol=1e-7)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_request_one_layer_is_rome(tiny_model_dir, family):
    """δ on the block output = δ on the MLP output (the residual stream adds it), so with the same loss
    settings MEMIT's residual is ROME's v* − v₀, and as λ → 0 the update is ROME's rank-one update."""
    same_v = ["lr=0.2", "steps=5", "weight_decay=0.0", "clamp_norm_factor=100.0", "early_stop_loss=0.0"]
    overrides = [f"edit.v.{x}" for x in same_v] + [f"edit.memit.v.{x}" for x in same_v]
    overrides += ["edit.memit.mom2_update_weight=1e-9", "edit.verify.enabled=false", "edit.generate_tokens=0"]
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    ctx, c = context(loaded, "memit", [2], *overrides)
    request = parse_requests(REQUESTS[:1])
    w0 = loaded.spec.down_proj_weight(loaded.model, 2).detach().clone()
    batch = memit.batch_edit(ctx, request)
    memit_dw = batch.updates[2].left @ batch.updates[2].right.T
    with torch.no_grad():
        loaded.spec.down_proj_weight(loaded.model, 2).copy_(w0)
    hp = configure(["edit.v.steps=3", "edit.memit.v.steps=4", *overrides]).edit  # the edit group context() used
    single = rome.edit(
        loaded.model, loaded.tokenizer, request[0], layer=2, hparams=hp, templates=TEMPLATES, second_moment=c
    )
    torch.testing.assert_close(batch.updates[2].left[:, 0].float(), single.delta, rtol=1e-3, atol=1e-5)  # R = δ
    rome_dw = torch.outer(single.update.lam, single.update.u)
    assert float((memit_dw - rome_dw).norm() / rome_dw.norm()) < 1e-3


def test_alphaedit_spares_keys_in_the_preserved_space_and_accumulates(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    d = loaded.spec.key_size(loaded.model, 2)
    # a C with a clear null space: rank d/2
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    spectrum = torch.cat([torch.linspace(1.0, 2.0, d // 2), torch.full((d - d // 2,), 1e-6)]).double()
    c = basis @ torch.diag(spectrum) @ basis.T
    ctx, _ = context(loaded, "alphaedit", [1, 2], c=c)
    p, rank = null_space_projector(*eigendecomposition(c), 0.1)
    assert rank == d - d // 2 and float((p @ p - p).norm()) < 1e-9
    before = {layer: loaded.spec.down_proj_matrix(loaded.model, layer).detach().double().clone() for layer in (1, 2)}
    result = memit.batch_edit(ctx, parse_requests(REQUESTS[:2]))
    kept = basis[:, : d // 2] @ torch.randn(d // 2, 5, generator=g, dtype=torch.float64)  # keys C preserves
    for layer in (1, 2):
        w = loaded.spec.down_proj_matrix(loaded.model, layer).detach().double()
        assert result.norms[layer]["delta_w"] > 0
        change = (w - before[layer]) @ kept
        assert float(change.norm() / (before[layer] @ kept).norm()) < 1e-6
        torch.testing.assert_close(ctx.preserved[layer], result.keys[layer] @ result.keys[layer].T)
    # a second batch adds its keys to the preserved sum
    second = memit.batch_edit(ctx, parse_requests(REQUESTS[2:]))
    torch.testing.assert_close(ctx.preserved[2], result.keys[2] @ result.keys[2].T + second.keys[2] @ second.keys[2].T)


def test_null_space_share_is_cs_energy_inside_the_projector_and_a_flat_spectrum_gets_a_note():
    d = 40
    basis = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64))[0]
    clear = torch.cat([torch.linspace(1.0, 2.0, d // 2), torch.full((d // 2,), 1e-6)]).double()
    flat = torch.linspace(0.1, 1.9, d).double()  # smallest eigenvalue 0.1x the mean, like SmolLM2's subject keys
    shares = {}
    for name, spectrum in (("clear", clear), ("flat", flat)):
        c = basis @ torch.diag(spectrum) @ basis.T
        p, rank = null_space_projector(*eigendecomposition(c), 0.5)
        shares[name] = null_space_share(eigendecomposition(c)[0], 0.5)
        assert shares[name] == pytest.approx(float(torch.trace(p @ c) / torch.trace(c)), abs=1e-9)
    assert shares["clear"] < 1e-5 and 0.05 < shares["flat"] < 0.3  # 9 of 40 directions below half the mean: 6.4%
    quiet = describe_null_space({1: (20, shares["clear"])}, "edit.alphaedit.nullspace_threshold")
    assert quiet == ["layer 1: C's null space has 20 dimensions, holding 0.0% of C's key energy"]
    noted = describe_null_space(
        {1: (20, shares["clear"]), 2: (12, shares["flat"])}, "edit.alphaedit.nullspace_threshold"
    )
    assert len(noted) == 3 and noted[2].startswith(f"note: up to {shares['flat']:.0%} of C's key energy")
    assert "edit.alphaedit.nullspace_threshold" in noted[2]


def test_bad_layer_sets_are_refused(tiny_model_dir):
    from rome.pipeline.errors import UserError

    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    hp = configure([]).edit
    for layers, match in (([3, 2], "increasing"), ([], "increasing"), ([2, 9], "out of range")):
        with pytest.raises(UserError, match=match):
            memit.MemitEditor(
                "memit", loaded.model, loaded.tokenizer, loaded.spec, hp, layers, TEMPLATES, batch_size=100
            )
    from rome.pipeline.editors.factory import build_editor

    with pytest.raises(UserError, match="not an editor"):
        build_editor(configure(["edit.method=rome_batches"]), loaded)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_a_model_whose_mlp_output_is_normed_is_refused_unless_asked_for(tiny_model_dir, method):
    from rome.pipeline.editors.factory import build_editor
    from rome.pipeline.errors import UserError

    loaded = load_model(str(tiny_model_dir("gemma3_text")), device="cpu")
    asked = []

    def statistics(layers):  # reached only once the method has accepted the model
        asked.append(list(layers))
        raise RuntimeError("statistics reached")

    with pytest.raises(UserError) as refused:
        build_editor(configure(cfg_args(method)), loaded, statistics=statistics)
    message = str(refused.value)
    assert f"{method} does not edit gemma3_text models" in message and "post_feedforward_layernorm" in message
    assert "rome or ultraedit" in message and "edit.memit.allow_mlp_out_norm=true" in message and "\n" not in message
    assert asked == []
    with pytest.raises(RuntimeError, match="statistics reached"):
        allowed = configure([*cfg_args(method), "edit.memit.allow_mlp_out_norm=true"])
        build_editor(allowed, loaded, statistics=statistics)
    assert asked == [[1, 2]]
    # a family without that norm is not refused
    llama = load_model(str(tiny_model_dir("llama")), device="cpu")
    with pytest.raises(RuntimeError, match="statistics reached"):
        build_editor(configure(cfg_args(method)), llama, statistics=statistics)


def cfg_args(method: str) -> list[str]:
    return [f"edit.method={method}", "edit.layers=[1,2]"]


def batch_edit_args(model_dir, small_wiki, tmp_path, method: str) -> list[str]:
    """The edit stage with a batch ``method`` on a tiny model: small statistics, 2 z steps, batches of 2, no
    verification, the ledger in ``tmp_path / "ledger"``."""
    return [
        "stage=edit",
        f"model.name={model_dir}",
        f"data.files={small_wiki}",
        f"stats.dir={tmp_path / 'stats'}",
        f"model.cache_dir={tmp_path / 'cache'}",
        "stats.tokens=2000",
        "data.max_length=64",
        "data.batch_tokens=256",
        "trainer.accelerator=cpu",
        "model.device=cpu",
        f"edit.method={method}",
        "edit.layers=[1,2]",
        "edit.batch_size=2",
        "edit.memit.v.steps=2",
        "edit.verify.enabled=false",  # about the ledger: 2 z steps on a random model do not make it say the objects
        f"edit.out={tmp_path / 'ledger'}",
    ]


def test_edit_stage_batches_ledger_continuation_and_bitwise_revert(tiny_model_dir, small_wiki, tmp_path):
    import json

    from conftest import run_main
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = tiny_model_dir("llama")
    out = tmp_path / "ledger"

    def cli(requests, method, saved, *extra):
        return run_main(
            *batch_edit_args(base, small_wiki, tmp_path, method),
            f"edit.save_to={saved}",
            f"request={json.dumps(requests)}",
            *extra,
            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        )

    r1 = cli(REQUESTS, "alphaedit", tmp_path / "m1")
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r1.stderr.count("alphaedit batch [") == 2  # 3 requests in batches of 2
    ledger = json.loads((out / "ledger.json").read_text())
    assert [(e["kind"], e["method"], len(e["requests"])) for e in ledger["entries"]] == [
        ("batch", "alphaedit", 2),
        ("batch", "alphaedit", 1),
    ]
    tensors = load_file(out / ledger["entries"][0]["file"])
    assert set(tensors) == {f"{k}.{layer}" for k in ("left", "right", "keys") for layer in (1, 2)}
    assert tensors["left.1"].shape[1] == 2 and tensors["left.1"].dtype == torch.float64
    r2 = cli([{"prompt": "{} is in", "subject": "Madrid", "target_new": "Oslo"}], "alphaedit", tmp_path / "m2")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "re-applying 2 earlier edit(s)" in r2.stdout and "preserving the keys" in r2.stdout
    assert r2.stdout.count("C's null space has") == 2  # one line per layer: P's rank and C's energy in its range
    m1 = load_file(next((tmp_path / "m1").glob("*.safetensors")))
    m2 = load_file(next((tmp_path / "m2").glob("*.safetensors")))
    assert not torch.equal(m1["model.layers.1.mlp.down_proj.weight"], m2["model.layers.1.mlp.down_proj.weight"])
    AutoModelForCausalLM.from_pretrained(tmp_path / "m2")  # plain transformers loads it
    r = run_main(
        "stage=revert", f"ledger={out}", "edit_id=3", f"edit.save_to={tmp_path / 'rev'}", env={"HF_HUB_OFFLINE": "1"}
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rev = load_file(next((tmp_path / "rev").glob("*.safetensors")))
    assert all(torch.equal(rev[k], m1[k]) for k in m1)  # bitwise the model after the first run
    bad = cli(REQUESTS, "memit", tmp_path / "m3", "edit.layers=[2,1]")
    assert bad.returncode == 2 and "increasing" in bad.stderr


def test_the_eigendecomposition_is_cached_beside_c_and_recomputed_when_c_or_it_changes(tmp_path):
    from safetensors.torch import save_file

    from rome.pipeline.stats.second_moment import LayerStats

    c = random_spd(24)
    path = tmp_path / "layer_3.safetensors"
    save_file({"second_moment": c}, str(path))
    stats = LayerStats(3, "m", c, 100, path)
    values, vectors = cached_eigendecomposition(stats)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, c)
    cached = tmp_path / "eigh_layer_3.safetensors"
    assert cached.exists() and (tmp_path / "eigh_layer_3.json").exists()
    stamp = cached.stat().st_mtime_ns
    again = cached_eigendecomposition(stats)
    assert cached.stat().st_mtime_ns == stamp and torch.equal(again[1], vectors)  # read, not recomputed
    raw = bytearray(cached.read_bytes())
    raw[-8:] = b"\x00" * 8  # damage it: recomputed, same result
    cached.write_bytes(bytes(raw))
    assert torch.equal(cached_eigendecomposition(stats)[1], vectors)
    other = random_spd(24, seed=5)  # C recomputed: the cache no longer matches
    save_file({"second_moment": other}, str(path))
    v2, u2 = cached_eigendecomposition(LayerStats(3, "m", other, 100, path))
    torch.testing.assert_close(u2 @ torch.diag(v2) @ u2.T, other)
