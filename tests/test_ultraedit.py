"""UltraEdit (pipeline/editors/ultraedit.py) on tiny random models: the ridge shift solves its normal equations,
the lifelong statistics merge exactly, the features are the down-projections' keys and output gradients at the
target positions, the editor writes the shift of its pseudo-targets, and the edit stage's ledger continues a
sequence bitwise (the statistics travel with it), reverts bitwise and saves a loadable model."""

import json
import re

import pytest
import torch

from rome.pipeline.core.hooks import Trace, get_module
from rome.pipeline.core.loading import configure, load_model
from rome.pipeline.core.probability import target_token_ids
from rome.pipeline.core.requests import parse_requests
from rome.pipeline.core.subject import fill_prompt, subject_token_range
from rome.pipeline.editors import ultraedit
from rome.pipeline.editors.factory import build_editor
from rome.pipeline.editors.ultraedit import LifelongStats, pseudo_targets, read_features, ridge_shift
from rome.pipeline.errors import UserError

REQUESTS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": "tennis"},
    {"prompt": "{} is in", "subject": "Madrid", "target_new": "Oslo"},
    {"prompt": "{} was born in", "subject": "Barack Obama", "target_new": "Paris"},
]


@pytest.mark.parametrize("m", [5, 40])  # fewer rows than d_ff (the m x m solve) and more (the d_ff x d_ff one)
def test_ridge_shift_solves_its_normal_equations(m):
    g = torch.Generator().manual_seed(m)
    h = torch.randn(m, 24, generator=g, dtype=torch.float64) * 3 + 1
    v = torch.randn(m, 8, generator=g, dtype=torch.float64)
    for ridge in (1.0, 1e-3):
        shift = ridge_shift(h, v, ridge)
        dw = shift.left @ shift.right.T  # [d_model, d_ff]
        normal = dw @ (h.T @ h + ridge * torch.eye(24, dtype=torch.float64))
        torch.testing.assert_close(normal, v.T @ h, rtol=1e-9, atol=1e-9)
        assert shift.left.is_contiguous() and shift.right.is_contiguous()
    small = ridge_shift(h, v, 1e-9)  # lambda -> 0 with m < d_ff: the keys map exactly onto the shifts
    if m < 24:
        torch.testing.assert_close(h @ (small.left @ small.right.T).T, v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m", [5, 40])
def test_covariance_preserving_shift_solves_memits_normal_equations(m):
    """preserve=covariance: ΔW (HᵀH + μC + λI) = VᵀH, through the Woodbury form (an m x m system) for any m."""
    from rome.pipeline.editors.rank_one import KeySolver

    g = torch.Generator().manual_seed(m)
    h = torch.randn(m, 24, generator=g, dtype=torch.float64) * 3 + 1
    v = torch.randn(m, 8, generator=g, dtype=torch.float64)
    k = torch.randn(200, 24, generator=g, dtype=torch.float64)
    c = k.T @ k / 200
    for mu, ridge in ((10.0, 1.0), (1e3, 1e-3)):
        shift = ridge_shift(h, v, ridge, KeySolver(mu * c, ridge))
        dw = shift.left @ shift.right.T
        normal = dw @ (h.T @ h + mu * c + ridge * torch.eye(24, dtype=torch.float64))
        torch.testing.assert_close(normal, v.T @ h, rtol=1e-9, atol=1e-9)


def test_lifelong_statistics_after_n_batches_equal_all_batches_at_once():
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(n, 6, generator=g, dtype=torch.float64) * s + o
        for n, s, o in [(7, 1, 1e3), (1, 5, 0), (30, 0.1, -2)]
    ]
    stats = LifelongStats(6)
    for b in batches:
        stats.update(b.float() if b.shape[0] == 1 else b)  # float32 rows are taken in float64
    whole = torch.cat([batches[0], batches[1].float().double(), batches[2]])
    assert stats.count == 38
    torch.testing.assert_close(stats.mean, whole.mean(0), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(stats.m2, (whole - whole.mean(0)).square().sum(0), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(stats.std(), whole.std(0), rtol=1e-10, atol=1e-9)
    z = torch.randn(3, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(stats.normalise(z, 1e-7), (z - whole.mean(0)) / (whole.std(0) + 1e-7))
    again = LifelongStats.from_state(stats.state("s"), "s")  # what the ledger stores restores bitwise
    assert again.count == stats.count and torch.equal(again.mean, stats.mean) and torch.equal(again.m2, stats.m2)


def _teacher_forced_loss(model, tok, request):
    """The summed target NLL of one request the plain way (the full model's logits) and the position
    predicting its first target token."""
    prompt = tok(request.text)["input_ids"]
    target = target_token_ids(tok, request.target_new)
    ids = torch.tensor([prompt + target[:-1]])
    logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return -sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(target)), len(prompt) - 1


def _numeric_gradient(model, tok, spec, request, layer, position, j, eps=1e-4):
    """∂L/∂(layer's down-projection output)[position, j] of one request's target loss, by central differences."""

    def shifted(s):
        def add(out):
            out = out.clone()
            out[0, position, j] += s
            return out

        with Trace(get_module(model, spec.down_proj_name(layer)), edit_output=add):
            return float(_teacher_forced_loss(model, tok, request)[0])

    return (shifted(eps) - shifted(-eps)) / (2 * eps)


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])  # Conv1D; soft-capped logits
def test_features_are_keys_and_output_gradients_at_the_target_positions(tiny_model_dir, family):
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    model, tok, spec = loaded.model.double(), loaded.tokenizer, loaded.spec
    requests = parse_requests(REQUESTS[:3])
    f = read_features(model, tok, spec, requests, [1, 2], rows_per_pass=2)  # two passes
    first = len(target_token_ids(tok, requests[0].target_new))
    assert f.owner[:first] == [0] * first and len(f.owner) == f.keys[1].shape[0] == f.grads[2].shape[0]
    loss, p = _teacher_forced_loss(model, tok, requests[0])
    with Trace(get_module(model, spec.down_proj_name(2)), retain_input=True) as t:
        _teacher_forced_loss(model, tok, requests[0])
    torch.testing.assert_close(f.keys[2][:first].double(), t.input[0, p : p + first].double(), rtol=1e-5, atol=1e-6)
    for layer in (1, 2):  # ∂L/∂(output) at the first target position, by central differences
        j = int(f.grads[layer][0].abs().argmax())
        numeric = _numeric_gradient(model, tok, spec, requests[0], layer, p, j)
        assert numeric == pytest.approx(float(f.grads[layer][0, j]), rel=1e-3)


def test_subject_position_reads_one_row_per_request_at_the_subjects_last_token(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")  # float64 throughout (llama's rotary is not)
    model, tok, spec = loaded.model.double(), loaded.tokenizer, loaded.spec
    requests = parse_requests(REQUESTS[:3])
    f = read_features(model, tok, spec, requests, [1], rows_per_pass=2, position="subject")
    answer = read_features(model, tok, spec, requests, [1], rows_per_pass=2)
    assert f.owner == [0, 1, 2] and f.keys[1].shape[0] == 3 and f.loss == pytest.approx(answer.loss)
    text, start, end = fill_prompt(requests[1].prompt, requests[1].subject)
    last = subject_token_range(tok, text, start, end)[1] - 1  # "Danielle Darrieux": mid-prompt
    loss, _ = _teacher_forced_loss(model, tok, requests[1])
    with Trace(get_module(model, spec.down_proj_name(1)), retain_input=True) as t:
        _teacher_forced_loss(model, tok, requests[1])
    torch.testing.assert_close(f.keys[1][1].double(), t.input[0, last].double(), rtol=1e-5, atol=1e-6)
    j = int(f.grads[1][1].abs().argmax())  # ∂L/∂(output) at the subject's last token, by central differences
    numeric = _numeric_gradient(model, tok, spec, requests[1], 1, last, j)
    assert numeric == pytest.approx(float(f.grads[1][1, j]), rel=1e-3)
    with pytest.raises(UserError, match="edit.ultraedit.position=token must be one of answer, subject"):
        _editor(loaded, "edit.ultraedit.position=token")


def _editor(loaded, *overrides):
    cfg = configure(["edit.ultraedit.layers=[1,2]", *overrides])
    return build_editor(cfg, loaded, "ultraedit")  # from configs/method/ultraedit.yaml


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_editor_writes_the_ridge_shift_of_its_normalised_pseudo_targets(tiny_model_dir, family):
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    loaded.model.double()  # the weight difference then is ΔW itself (no float32 rounding)
    # verification off: about the shift written (one small step does not make a random model say the objects)
    editor = _editor(loaded, "edit.ultraedit.lr=0.01", "edit.batch_size=2", "edit.verify.enabled=false")
    assert isinstance(editor, ultraedit.UltraEditEditor) and editor.layers == [1, 2]
    requests = parse_requests(REQUESTS[:3])
    assert [len(u) for u in editor.units(requests)] == [2, 1]
    before = {layer: loaded.spec.down_proj_matrix(loaded.model, layer).detach().clone() for layer in (1, 2)}
    (edit,) = editor.edit(requests[:2])
    assert edit.optimisation is None and edit.status == "applied"
    f, hp = edit.features, editor.hp
    expected = LifelongStats(f.keys[1].shape[1] + f.grads[1].shape[1])  # shared: both layers' rows, one set
    expected.update(torch.cat([torch.cat([f.keys[layer], f.grads[layer]], 1) for layer in (1, 2)]))
    assert editor.stats["shared"].count == expected.count == 2 * f.keys[1].shape[0]
    torch.testing.assert_close(editor.stats["shared"].mean, expected.mean)
    for layer in (1, 2):
        h = f.keys[layer].double()
        z = (torch.cat([h, f.grads[layer].double()], 1) - expected.mean) / (expected.std() + float(hp.eps))
        h_hat, g_hat = z.split([h.shape[1], f.grads[layer].shape[1]], 1)
        v = -float(hp.lr) * (h_hat.square().sum(1, keepdim=True)) * g_hat
        torch.testing.assert_close(pseudo_targets(f.keys[layer], f.grads[layer], expected, hp.lr, hp.eps), v)
        dw = loaded.spec.down_proj_matrix(loaded.model, layer).detach() - before[layer]
        assert dw.norm() > 0
        normal = dw @ (h.T @ h + float(hp.ridge) * torch.eye(h.shape[1], dtype=torch.float64))
        torch.testing.assert_close(normal, v.T @ h, rtol=1e-7, atol=1e-9 * float((v.T @ h).abs().max()))
    (second,) = editor.edit(requests[2:])  # the statistics go on: both batches' rows
    assert editor.stats["shared"].count == expected.count + 2 * second.features.keys[1].shape[0]
    per_layer = _editor(loaded, "edit.ultraedit.statistics=per_layer")
    assert sorted(per_layer.stats) == ["layer1", "layer2"]


def test_edit_stage_continues_a_ledger_bitwise_reverts_and_saves(tiny_model_dir, tmp_path):
    from conftest import run_main
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = tiny_model_dir("llama")

    def cli(requests, out, saved, *extra):
        return run_main(
            "stage=edit",
            f"model.name={base}",
            f"model.cache_dir={tmp_path / 'cache'}",
            "trainer.accelerator=cpu",
            "model.device=cpu",
            "edit.method=ultraedit",
            "edit.ultraedit.layers=[1,2]",
            "edit.ultraedit.lr=0.01",
            "edit.batch_size=2",
            "edit.verify.enabled=false",  # about the ledger: one small step does not make a random model say them
            f"edit.out={out}",
            f"edit.save_to={saved}",
            f"request={json.dumps(requests)}",
            *extra,
            env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        )

    def weights(path):
        return load_file(next(path.glob("*.safetensors")))

    whole = cli(REQUESTS, tmp_path / "one", tmp_path / "m_one")  # 5 requests: batches of 2, 2, 1
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = cli(REQUESTS[:4], tmp_path / "two", tmp_path / "m_first")
    assert first.returncode == 0, first.stderr[-3000:]
    ledger = json.loads((tmp_path / "two" / "ledger.json").read_text())
    assert [(e["kind"], e["method"], len(e["requests"])) for e in ledger["entries"]] == [("batch", "ultraedit", 2)] * 2
    tensors = load_file(tmp_path / "two" / ledger["entries"][1]["file"])
    assert {"left.1", "right.2", "stats.shared.count", "stats.shared.mean", "stats.shared.m2"} <= set(tensors)
    rows = sum(e["rows"] for e in ledger["entries"])
    assert int(tensors["stats.shared.count"][0]) == 2 * rows  # after both batches, both layers' rows
    rest = cli(REQUESTS[4:], tmp_path / "two", tmp_path / "m_two")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "re-applying 2 earlier edit(s)" in rest.stdout and "continuing the lifelong normalisation" in rest.stdout
    one, two, after_first = weights(tmp_path / "m_one"), weights(tmp_path / "m_two"), weights(tmp_path / "m_first")
    assert all(torch.equal(one[k], two[k]) for k in one)  # two runs over one ledger = one run over all requests
    assert not torch.equal(
        one["model.layers.1.mlp.down_proj.weight"], after_first["model.layers.1.mlp.down_proj.weight"]
    )
    AutoModelForCausalLM.from_pretrained(tmp_path / "m_two")  # plain transformers loads it
    before = (tmp_path / "two" / "ledger.json").read_bytes()
    more = [{"prompt": "{} is a citizen of", "subject": "Pablo Picasso", "target_new": "Japan"}]
    other_site = cli(more, tmp_path / "two", tmp_path / "m_other", "edit.ultraedit.position=subject")
    assert other_site.returncode != 0 and "continue with edit.ultraedit.position=answer" in other_site.stderr
    assert (tmp_path / "two" / "ledger.json").read_bytes() == before and not (tmp_path / "m_other").exists()
    r = run_main("stage=revert", f"ledger={tmp_path / 'two'}", "edit_id=3", f"edit.save_to={tmp_path / 'rev'}")
    assert r.returncode == 0, r.stderr[-2000:]
    rev = weights(tmp_path / "rev")
    assert all(torch.equal(rev[k], after_first[k]) for k in after_first)  # bitwise the model after the first run
    r = run_main("stage=revert", f"ledger={tmp_path / 'two'}", "edit_id=all", f"edit.save_to={tmp_path / 'bare'}")
    assert r.returncode == 0, r.stderr[-2000:]
    bare, orig = weights(tmp_path / "bare"), weights(base)
    assert "model.layers.2.mlp.down_proj.weight" in set(bare) & set(orig)
    assert all(torch.equal(bare[k], orig[k]) for k in set(bare) & set(orig))  # every edit reverted: the base, bitwise
    # requests with their true objects, not verified: the summary scores every prompt after the edits
    known = [{**REQUESTS[0], "target_true": "Paris"}, {**REQUESTS[1], "target_true": "French"}]
    scored = cli(known, tmp_path / "three", tmp_path / "m_three")
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "after the edits: scoring P(new) against P(true) on 2 requests' prompts" in scored.stdout
    assert re.search(r"after the edits: P\(new\) > P\(true\) on [0-2] of 2 requests' prompts", scored.stdout)


def test_nullspace_preserving_shift_leaves_cs_frequent_keys_alone(tiny_model_dir, tmp_path):
    """edit.ultraedit.preserve=nullspace: ΔW is the ridge solve on the keys projected onto C's null space, so it
    maps every key in C's preserved (high-energy) subspace to zero; refused without C or with an unknown mode; and
    preserve=covariance on the same C solves MEMIT's normal equations."""
    from safetensors.torch import save_file

    from rome.pipeline.errors import UserError
    from rome.pipeline.stats.second_moment import LayerStats

    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    loaded.model.double()
    d_ff = loaded.spec.key_size(loaded.model, 1)
    g = torch.Generator().manual_seed(0)

    def provide(layers):  # a C with a few strong directions (eigenvalues 1e3) over a weak rest (1e-3)
        out = {}
        for layer in layers:
            q, _ = torch.linalg.qr(torch.randn(d_ff, d_ff, generator=g, dtype=torch.float64))
            c = q @ torch.diag(torch.where(torch.arange(d_ff) < d_ff // 4, 1e3, 1e-3).double()) @ q.T
            path = tmp_path / f"layer_{layer}.safetensors"
            save_file({"second_moment": c}, str(path))
            out[layer] = LayerStats(layer, loaded.spec.down_proj_name(layer), c, 100, path)
        return out

    cfg = configure(["edit.ultraedit.layers=[1,2]", "edit.ultraedit.preserve=nullspace", "edit.verify.enabled=false"])
    with pytest.raises(UserError, match="preserve=nullspace needs C"):
        build_editor(cfg, loaded, "ultraedit")
    with pytest.raises(UserError, match="edit.ultraedit.preserve=all must be one of none, nullspace"):
        build_editor(configure(["edit.ultraedit.layers=[1,2]", "edit.ultraedit.preserve=all"]), loaded, "ultraedit")
    stats = provide([1, 2])
    editor = build_editor(cfg, loaded, "ultraedit", statistics=lambda layers: {k: stats[k] for k in layers})
    assert editor.config()["stats"].keys() == {"1", "2"}  # C is part of what identifies its results
    before = {layer: loaded.spec.down_proj_matrix(loaded.model, layer).detach().clone() for layer in (1, 2)}
    (edit,) = editor.edit(parse_requests(REQUESTS[:2]))
    for layer in (1, 2):
        p = editor.projectors[layer]
        assert round(float(p.trace())) == d_ff - d_ff // 4  # the weak directions
        frequent = stats[layer].second_moment @ torch.randn(d_ff, 5, generator=g, dtype=torch.float64)
        dw = loaded.spec.down_proj_matrix(loaded.model, layer).detach() - before[layer]
        assert dw.norm() > 0
        assert float((dw @ frequent).norm()) < 1e-6 * float(dw.norm() * frequent.norm())
        h = edit.features.keys[layer].double() @ p
        v = pseudo_targets(
            edit.features.keys[layer], edit.features.grads[layer], editor.stats["shared"], editor.hp.lr, editor.hp.eps
        )
        normal = dw @ (h.T @ h + float(editor.hp.ridge) * torch.eye(d_ff, dtype=torch.float64))
        torch.testing.assert_close(normal, v.T @ h, rtol=1e-7, atol=1e-9 * float((v.T @ h).abs().max()))

    def provided(layers):
        return {k: stats[k] for k in layers}

    # preserve=covariance on the same C: the shift is MEMIT's trade-off, ΔW (HᵀH + μC + λI) = VᵀH on the raw keys
    overrides = ["edit.ultraedit.layers=[1,2]", "edit.ultraedit.preserve=covariance", "edit.verify.enabled=false"]
    with pytest.raises(UserError, match="covariance_weight=0.0 must be positive"):
        build_editor(
            configure([*overrides, "edit.ultraedit.covariance_weight=0"]), loaded, "ultraedit", statistics=provided
        )
    editor = build_editor(configure(overrides), loaded, "ultraedit", statistics=provided)
    before = {layer: loaded.spec.down_proj_matrix(loaded.model, layer).detach().clone() for layer in (1, 2)}
    (edit,) = editor.edit(parse_requests(REQUESTS[2:4]))
    mu, ridge = float(editor.hp.covariance_weight), float(editor.hp.ridge)
    for layer in (1, 2):
        dw = loaded.spec.down_proj_matrix(loaded.model, layer).detach() - before[layer]
        h = edit.features.keys[layer].double()
        v = pseudo_targets(
            edit.features.keys[layer], edit.features.grads[layer], editor.stats["shared"], editor.hp.lr, editor.hp.eps
        )
        system = h.T @ h + mu * stats[layer].second_moment + ridge * torch.eye(d_ff, dtype=torch.float64)
        torch.testing.assert_close(dw @ system, v.T @ h, rtol=1e-7, atol=1e-9 * float((v.T @ h).abs().max()))


def test_another_linear_module_is_edited_by_ultraedit_and_refused_by_the_value_methods(tiny_model_dir):
    """``model.arch.down_proj=mlp.up_proj`` (how docs/many-edits.md runs the release's Llama modules): UltraEdit
    reads its keys at the up-projection's input and writes its ridge shift there and nowhere else; ROME, MEMIT
    and AlphaEdit, whose values are optimised at the MLP's output, refuse it in one line before asking for C."""
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu", arch={"down_proj": "mlp.up_proj"})
    loaded.model.double()
    editor = _editor(loaded, "edit.ultraedit.lr=0.01", "edit.verify.enabled=false")
    assert editor.touched() == ["model.layers.1.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight"]
    before = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    (edit,) = editor.edit(parse_requests(REQUESTS[:2]))
    changed = [name for name, p in loaded.model.named_parameters() if not torch.equal(p, before[name])]
    assert changed == editor.touched()
    hp, stats = editor.hp, editor.stats["shared"]  # after the one batch: the statistics its shift was normalised by
    for layer in (1, 2):
        h, g = edit.features.keys[layer].double(), edit.features.grads[layer].double()
        assert (h.shape[1], g.shape[1]) == (64, 160)  # the up-projection's input (d_model) and output (d_ff)
        v = pseudo_targets(h, g, stats, hp.lr, hp.eps)
        dw = (
            loaded.spec.down_proj_matrix(loaded.model, layer).detach()
            - before[f"model.layers.{layer}.mlp.up_proj.weight"]
        )
        normal = dw @ (h.T @ h + float(hp.ridge) * torch.eye(h.shape[1], dtype=torch.float64))
        torch.testing.assert_close(normal, v.T @ h, rtol=1e-7, atol=1e-9 * float((v.T @ h).abs().max()))

    def statistics(layers):
        raise AssertionError("C asked for")

    for method in ("rome", "memit", "alphaedit"):
        cfg = configure([f"edit.method={method}", "edit.layer=1", "edit.layers=[1,2]"])
        with pytest.raises(UserError) as refused:
            build_editor(cfg, loaded, statistics=statistics)
        message = str(refused.value)
        assert message.startswith(f"{method} writes its value at the MLP's output (64 values)"), message
        assert "model.layers.1.mlp.up_proj returns 160" in message and "ultraedit" in message and "\n" not in message


def test_modules_named_per_layer_are_edited_recorded_and_rebuilt_without_the_setting(tiny_model_dir, tmp_path):
    """``model.arch.down_proj_by_layer`` (the release's Llama-3 set: gate_proj at some layers, up_proj at others):
    UltraEdit edits each layer's named module and nothing else; the ledger records the modules, so a model loaded
    without the setting is rebuilt onto them bitwise and ``ledger_applied`` restores them; modules of two shapes
    (a down- and an up-projection) get one normaliser each, as the release keys them by shape."""
    from rome.pipeline.editors.ledger import Ledger
    from rome.pipeline.evaluation.ask import ledger_applied

    path = str(tiny_model_dir("llama"))
    by_layer = {"mlp.gate_proj": [1], "mlp.up_proj": [2]}
    loaded = load_model(path, device="cpu", arch={"down_proj_by_layer": by_layer})
    editor = _editor(loaded, "edit.ultraedit.lr=0.01", "edit.verify.enabled=false")
    assert editor.touched() == ["model.layers.1.mlp.gate_proj.weight", "model.layers.2.mlp.up_proj.weight"]
    before = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    (edit,) = editor.edit(parse_requests(REQUESTS[:2]))
    edited = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    assert [name for name in edited if not torch.equal(edited[name], before[name])] == editor.touched()
    assert set(editor.stats) == {"shared"} and editor.stats["shared"].count == 2 * len(edit.features.owner)
    ledger = Ledger.open(tmp_path / "ledger", model=loaded.identity)
    editor.record(edit, ledger, loaded.identity)
    assert ledger.entries[0]["modules"] == ["model.layers.1.mlp.gate_proj", "model.layers.2.mlp.up_proj"]

    plain = load_model(path, device="cpu")  # the down-projections by default: the ledger says where its edits go
    opened = Ledger.open(tmp_path / "ledger", create=False)
    with ledger_applied(plain, opened) as n:
        assert n == 1
        assert all(torch.equal(p, edited[name]) for name, p in plain.model.named_parameters())
    assert all(torch.equal(p, before[name]) for name, p in plain.model.named_parameters())  # restored bitwise

    mixed = load_model(path, device="cpu", arch={"down_proj_by_layer": {"mlp.up_proj": [2]}})
    editor = _editor(mixed, "edit.ultraedit.lr=0.01", "edit.verify.enabled=false")
    (edit,) = editor.edit(parse_requests(REQUESTS[:2]))
    rows = len(edit.features.owner)
    assert {group: s.count for group, s in editor.stats.items()} == {"shared64x160": rows, "shared160x64": rows}


@pytest.mark.parametrize(
    ("by_layer", "message"),
    [
        ({"mlp.gate_proj": [1, 2], "mlp.up_proj": [2]}, "names layer 2 for both mlp.gate_proj and mlp.up_proj"),
        ({"mlp.up_proj": [4]}, "layer 4 of mlp.up_proj is out of range: this model has layers 0..3"),
        ({"mlp.nothing": [1]}, "has no module(s) model.layers.1.mlp.nothing"),
        (["mlp.up_proj"], "must map modules to their layers"),
    ],
)
def test_modules_named_per_layer_are_checked_in_one_line(tiny_model_dir, by_layer, message):
    with pytest.raises(UserError, match="^[^\n]*$") as refused:
        load_model(str(tiny_model_dir("llama")), device="cpu", arch={"down_proj_by_layer": by_layer})
    assert message in str(refused.value)
