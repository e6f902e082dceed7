"""Norm-Anchor Scaling (NAS, arXiv 2602.02543; ``pipeline/editors/value.py`` ``norm_anchor``) on tiny random
models: the value ROME writes and the MLP part of MEMIT's z get exactly the reference norm; off, the edits are
bitwise the optimiser's; AlphaEdit with it on still spares the keys C preserves."""

import pytest
import torch

from rome.pipeline.core.loading import configure, load_model
from rome.pipeline.core.requests import parse_requests
from rome.pipeline.editors import memit, rome
from rome.pipeline.editors.rank_one import KeySolver
from rome.pipeline.editors.value import NormReference, anchor_reference, norm_anchor
from rome.pipeline.errors import UserError
from rome.pipeline.stats.spectrum import eigendecomposition, null_space_projector

TEMPLATES = ["{}", "The cat sat on the mat. {}", "Therefore we went home. {}"]
REQUESTS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": "tennis"},
]
# no early stop and a loose clamp, so δ moves far enough that the anchor has something to change
LOOSE = ["lr=0.5", "steps=4", "early_stop_loss=0.0", "clamp_norm_factor=10.0"]
FAR = ["edit.nas.skip_factor=1e9"]  # the outlier rule is tested on its own below


def random_spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * d)


def test_norm_anchor_rescales_v_star_and_drops_outliers():
    v0 = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    delta = torch.tensor([[0.0, 4.0], [0.0, 4.0]])  # v* = (3, 4), ‖v*‖ = 5
    torch.testing.assert_close(norm_anchor(v0, delta, 10.0, 2.0), torch.tensor([[3.0, 8.0], [3.0, 8.0]]))  # (6, 8)
    torch.testing.assert_close(
        norm_anchor(v0, delta, 2.5, 2.0), torch.tensor([[-1.5, 2.0], [-1.5, 2.0]])
    )  # 5 = 2 x 2.5
    assert not norm_anchor(v0, delta, 2.0, 2.0).any()  # 5 > 2 x 2: dropped, v* = v₀
    assert norm_anchor(v0, delta, 10.0, 2.0).dtype == delta.dtype


def test_anchor_reference_is_the_trimmed_mean():
    norms = torch.arange(1.0, 21.0)  # 1..20: 5% of 20 drops the largest
    assert anchor_reference(norms, 0.05) == pytest.approx(10.0)  # mean of 1..19
    assert anchor_reference(norms, 0.0) == pytest.approx(10.5)
    assert anchor_reference(torch.tensor([7.0]), 0.05) == pytest.approx(7.0)  # one value: nothing to drop
    with pytest.raises(UserError, match="edit.nas.trim"):
        anchor_reference(norms, 1.0)


def test_the_reference_is_taken_over_the_first_units_until_enough_values_are_in():
    reference = NormReference(count=3, trim=0.0)
    assert reference.value is None and not reference.frozen
    assert reference.update(torch.tensor([4.0])) == 4.0  # the first unit is anchored to its own norm
    assert reference.update(torch.tensor([8.0])) == 6.0  # the next to the mean so far
    assert reference.update(torch.tensor([9.0])) == 7.0 and reference.frozen  # three values: set for good
    assert reference.update(torch.tensor([100.0])) == 7.0 and len(reference.norms) == 3
    batch = NormReference(count=3, trim=0.0)  # a unit is never cut: a first batch of five takes all five
    assert batch.update(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])) == 3.0 and batch.frozen
    assert NormReference(count=1, trim=0.0).update(torch.tensor([5.0, 7.0])) == 6.0  # NAS: the first unit's
    with pytest.raises(UserError, match="edit.nas.reference_values"):
        NormReference(count=0, trim=0.05)


def test_the_reference_resumes_from_its_state():
    """Stopped after two of three values and taken up from ``state()``: the references of an uninterrupted run;
    a state saved before this rule (the reference alone) is taken as set for good."""
    norms = [torch.tensor([4.0]), torch.tensor([8.0]), torch.tensor([9.0]), torch.tensor([1.0])]
    whole = NormReference(3, 0.0)
    expected = [whole.update(n) for n in norms]
    first = NormReference(3, 0.0)
    got = [first.update(n) for n in norms[:2]]
    resumed = NormReference(3, 0.0)
    resumed.load_state(first.state())
    got += [resumed.update(n) for n in norms[2:]]
    assert got == expected == [4.0, 6.0, 7.0, 7.0]
    old = NormReference(3, 0.0)
    old.load_state({"anchor_reference": torch.tensor([5.0], dtype=torch.float64)})
    assert old.frozen and old.update(torch.tensor([50.0])) == 5.0
    assert NormReference(3, 0.0).state() == {}  # nothing solved yet: nothing to save


def rome_editor(loaded, *overrides):
    hp = configure([*(f"edit.v.{x}" for x in LOOSE), "edit.verify.enabled=false", "edit.generate_tokens=0", *overrides])
    c = random_spd(loaded.spec.key_size(loaded.model, 2))
    return rome.RomeEditor("rome", loaded.model, loaded.tokenizer, loaded.spec, hp.edit, 2, TEMPLATES, KeySolver(c))


def written_value(loaded, request) -> torch.Tensor:
    """What layer 2's down-projection outputs at the subject's last token, averaged over the templates (= W k̄ + b)."""
    return rome.keys_and_values(
        loaded.model, loaded.tokenizer, loaded.spec, 2, TEMPLATES, request.prompt, request.subject
    )[1].mean(0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rome_writes_v_star_at_the_reference_norm(tiny_model_dir, family):
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    editor = rome_editor(loaded, "edit.v.norm_anchor=true", "edit.nas.reference_values=1", *FAR)  # NAS's first unit
    results = []
    for request in parse_requests(REQUESTS[:2]):
        (result,) = editor.edit([request])
        # the value written at the subject (read before the next edit moves it) has the reference norm
        assert float(written_value(loaded, request).norm()) == pytest.approx(editor.anchor_reference, rel=1e-4)
        assert float((result.v0 + result.delta).norm()) == pytest.approx(editor.anchor_reference, rel=1e-5)
        results.append(result)
    first, second = results
    reference = editor.anchor_reference
    assert reference == pytest.approx(first.anchor["v_star_solved"], rel=1e-6)  # the first edit sets it
    assert second.anchor["anchor_reference"] == reference  # and it stays
    # the anchor changed the second value: its own ‖v*‖ was not the reference
    assert abs(second.anchor["v_star_solved"] / reference - 1) > 1e-3
    assert second.norms["anchor_reference"] == reference  # recorded with the edit's norms (the ledger's)


def test_rome_takes_the_reference_over_its_first_edits(tiny_model_dir):
    """``edit.nas.reference_values=2``: the first edit is anchored to its own ‖v*‖, the second to the mean of
    both solved norms, and that mean anchors the third."""
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    editor = rome_editor(loaded, "edit.v.norm_anchor=true", "edit.nas.reference_values=2", "edit.nas.trim=0", *FAR)
    results = [editor.edit([request])[0] for request in parse_requests(REQUESTS)]
    solved = [r.anchor["v_star_solved"] for r in results]
    assert results[0].anchor["anchor_reference"] == pytest.approx(solved[0], rel=1e-12)
    assert results[1].anchor["anchor_reference"] == pytest.approx((solved[0] + solved[1]) / 2, rel=1e-12)
    assert results[2].anchor["anchor_reference"] == results[1].anchor["anchor_reference"]
    assert abs(solved[1] / solved[0] - 1) > 1e-3  # two different norms: the mean is not either one's
    for result in results[1:]:
        assert float((result.v0 + result.delta).norm()) == pytest.approx(result.anchor["anchor_reference"], rel=1e-5)
    assert set(editor.state()) == {"anchor_reference", "anchor_norms"} and len(editor.state()["anchor_norms"]) == 2


def test_rome_with_the_anchor_off_is_the_optimiser_s_delta_bitwise(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    w0 = loaded.spec.down_proj_weight(loaded.model, 2).detach().clone()
    weights, deltas = [], []
    # off, the NAS settings cannot matter: two runs with different ones are bitwise the same
    for nas in (["edit.nas.skip_factor=2.0", "edit.nas.trim=0.05"], ["edit.nas.skip_factor=0.1", "edit.nas.trim=0.5"]):
        with torch.no_grad():
            loaded.spec.down_proj_weight(loaded.model, 2).copy_(w0)
        editor = rome_editor(loaded, "edit.v.norm_anchor=false", *nas)
        (result,) = editor.edit(parse_requests(REQUESTS[:1]))
        assert torch.equal(result.delta, result.optimisation.result()[0])  # written as optimised
        assert editor.anchor_reference is None and "anchor_reference" not in result.norms
        weights.append(loaded.spec.down_proj_weight(loaded.model, 2).detach().clone())
        deltas.append(result.delta)
    assert torch.equal(weights[0], weights[1]) and torch.equal(deltas[0], deltas[1])
    assert not torch.equal(weights[0], w0)


def batch_editor(loaded, method, layers, *overrides, c=None):
    hp = configure([*(f"edit.memit.v.{x}" for x in LOOSE), *overrides]).edit
    c = random_spd(loaded.spec.key_size(loaded.model, layers[0])) if c is None else c
    editor = memit.AlphaEditEditor if method == "alphaedit" else memit.MemitEditor
    ctx = editor(method, loaded.model, loaded.tokenizer, loaded.spec, hp, layers, TEMPLATES, batch_size=100)
    for layer in layers:
        ctx.solvers[layer] = KeySolver(c)
        ctx.projectors[layer] = null_space_projector(*eigendecomposition(c), float(hp.alphaedit.nullspace_threshold))[0]
    return ctx


def mlp_values(loaded, layer, requests) -> torch.Tensor:
    """v₀ of every request: the MLP's output at ``layer`` at the subject's last token, averaged over the templates."""
    return torch.stack(
        [
            rome.keys_and_values(loaded.model, loaded.tokenizer, loaded.spec, layer, TEMPLATES, r.prompt, r.subject)[
                1
            ].mean(0)
            for r in requests
        ]
    )


def check_anchored_targets(loaded, ctx, edit, v0):
    """z = (h̄ − v₀) + v*: every v* = z − h̄ + v₀ has the reference norm, the first batch's mean ‖v*‖ as solved."""
    v_star = edit.result.z - edit.h0 + v0
    solved = torch.tensor(edit.anchor["v_star_solved"])
    torch.testing.assert_close(v_star.norm(dim=-1), torch.full((len(v0),), ctx.anchor_reference), rtol=1e-5, atol=0)
    assert ctx.anchor_reference == pytest.approx(float(solved.mean()), rel=1e-6)  # 3 values: 5% drops none
    assert float((solved / ctx.anchor_reference - 1).abs().max()) > 1e-3  # the anchor changed something
    assert edit.anchor["dropped"] == 0 and ctx.info(edit)["norm_anchor"] == edit.anchor


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_memit_batch_targets_have_the_reference_norm(tiny_model_dir, family):
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    ctx = batch_editor(loaded, "memit", [1, 2], "edit.memit.norm_anchor=true", *FAR)
    requests = parse_requests(REQUESTS)
    v0 = mlp_values(loaded, 2, requests)  # read before the batch is written
    (edit,) = ctx.edit(requests)
    check_anchored_targets(loaded, ctx, edit, v0)
    assert edit.result.norms[2]["delta_w"] > 0


def test_the_defaults_anchor_memit_and_alphaedit_not_rome(tiny_model_dir):
    """NAS is on by default where two record ranges measured it to help (MEMIT, AlphaEdit), off where not (ROME)."""
    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    assert batch_editor(loaded, "memit", [1, 2]).norm_anchor
    assert batch_editor(loaded, "alphaedit", [1, 2]).norm_anchor
    assert not configure([]).edit.v.norm_anchor


def test_memit_with_the_anchor_off_is_bitwise_unchanged(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    layers = [1, 2]
    w0 = {layer: loaded.spec.down_proj_weight(loaded.model, layer).detach().clone() for layer in layers}
    runs = []
    for nas in (["edit.nas.skip_factor=2.0"], ["edit.nas.skip_factor=0.1", "edit.nas.trim=0.5"]):
        with torch.no_grad():
            for layer in layers:
                loaded.spec.down_proj_weight(loaded.model, layer).copy_(w0[layer])
        # alphaedit.norm_anchor is AlphaEdit's switch, not MEMIT's
        ctx = batch_editor(
            loaded, "memit", layers, "edit.memit.norm_anchor=false", "edit.alphaedit.norm_anchor=true", *nas
        )
        (edit,) = ctx.edit(parse_requests(REQUESTS))
        assert torch.equal(edit.result.z, edit.h0 + edit.optimisation.result())  # z = h̄ + δ as optimised
        assert ctx.anchor_reference is None and "norm_anchor" not in ctx.info(edit)
        runs.append({layer: loaded.spec.down_proj_weight(loaded.model, layer).detach().clone() for layer in layers})
    for layer in layers:
        assert torch.equal(runs[0][layer], runs[1][layer]) and not torch.equal(runs[0][layer], w0[layer])


def test_alphaedit_with_the_anchor_keeps_its_null_space_property(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    d = loaded.spec.key_size(loaded.model, 2)
    g = torch.Generator().manual_seed(1)  # a C with a clear null space: rank d/2
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    spectrum = torch.cat([torch.linspace(1.0, 2.0, d // 2), torch.full((d - d // 2,), 1e-6)]).double()
    c = basis @ torch.diag(spectrum) @ basis.T
    ctx = batch_editor(loaded, "alphaedit", [1, 2], "edit.alphaedit.norm_anchor=true", *FAR, c=c)
    assert ctx.norm_anchor
    requests = parse_requests(REQUESTS)
    before = {layer: loaded.spec.down_proj_matrix(loaded.model, layer).detach().double().clone() for layer in (1, 2)}
    v0 = mlp_values(loaded, 2, requests)
    (edit,) = ctx.edit(requests)
    check_anchored_targets(loaded, ctx, edit, v0)
    kept = basis[:, : d // 2] @ torch.randn(d // 2, 5, generator=g, dtype=torch.float64)  # keys C preserves
    for layer in (1, 2):
        w = loaded.spec.down_proj_matrix(loaded.model, layer).detach().double()
        assert edit.result.norms[layer]["delta_w"] > 0
        change = (w - before[layer]) @ kept
        assert float(change.norm() / (before[layer] @ kept).norm()) < 1e-6
