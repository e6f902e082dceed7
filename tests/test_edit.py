"""ROME's update on tiny random models: the algebra, the fast loss, the CLI, revert and bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, check_fast_value_loss, run_cli
from pipeline.config import compose
from pipeline.hooks import get_module
from pipeline.loading import load_model
from pipeline.requests import parse_requests
from pipeline import rome

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TEMPLATES = ["{}", "The cat sat on the mat. {}", "Therefore we went home. {}"]
EIFFEL = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
          "target_true": "Paris"}


def random_spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 4 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (4 * d)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_update_writes_v_star_is_rank_one_and_spares_orthogonal_keys(tiny_model_dir, family):
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    spec, layer = loaded.spec, 2
    c = random_spd(spec.key_size(loaded.model, layer))
    module = get_module(loaded.model, spec.down_proj_name(layer))
    w_before = spec.down_proj_matrix(loaded.model, layer).detach().clone()
    hp = compose(["edit.generate_tokens=0"]).edit
    job = rome.edit(loaded.model, loaded.tokenizer, EIFFEL, layer=layer, second_moment=c, hparams=hp, templates=TEMPLATES)
    assert job.status in ("applied", "rolled_back")
    if job.status == "rolled_back":  # a random model may fail verification; redo without checks
        hp = compose(["edit.generate_tokens=0", "edit.verify.enabled=false"]).edit
        job = rome.edit(loaded.model, loaded.tokenizer, parse_requests(EIFFEL)[0], layer=layer, second_moment=c,
                        hparams=hp, templates=TEMPLATES)
    w_after = spec.down_proj_matrix(loaded.model, layer).detach()
    delta_w = (w_after - w_before).double()
    # W' k* = v* (bias excluded), to 1e-5 relative
    bias = module.bias.detach().double() if getattr(module, "bias", None) is not None else 0
    v_star = job.v0.double() + job.delta.double() - bias
    got = w_after.double() @ job.k_star.double()
    assert float((got - v_star).norm() / v_star.norm()) < 1e-5
    # rank one: one singular value carries everything
    s = torch.linalg.svdvals(delta_w)
    assert s[0] > 0 and float(s[1] / s[0]) < 1e-5
    # a key k with kᵀ C⁻¹ k* = 0 gives the same output as before
    u = torch.linalg.solve(c, job.k_star.double())
    k = torch.randn(u.shape[0], dtype=torch.float64)
    k = k - (k @ u) / (u @ u) * u
    assert abs(float(k @ u)) < 1e-9
    out_before = w_before.double() @ k
    out_after = w_after.double() @ k
    assert float((out_after - out_before).norm() / out_before.norm()) < 1e-5
    # and through the module itself (in its own orientation, Conv1D or Linear)
    with torch.no_grad():
        y = module(k.float()[None])[0].double() - bias
    torch.testing.assert_close(y, out_after, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_value_loss_equals_full_forward_reference(tiny_model_dir, family):
    loaded = load_model(str(tiny_model_dir(family)), device="cpu")
    fast0, fast = check_fast_value_loss(loaded, layer=1, delta_scale=0.5, v0_norm=3.0, atol=1e-6)
    assert float(fast.kl) > 0 and abs(float(fast.nll - fast0.nll)) > 1e-3
    model, spec = loaded.model, loaded.spec
    if getattr(model.config, "final_logit_softcapping", None):  # the soft-cap matters: the bare head is off
        h = torch.randn(4, model.config.hidden_size)
        bare = torch.log_softmax(get_module(model, spec.lm_head)(h), -1)
        assert float((bare - torch.log_softmax(spec.logits(model, h), -1)).abs().max()) > 0.1


def edit_cli(model_dir, data, tmp, *extra):
    return run_cli("stage=edit", f"model.name={model_dir}", f"data.files={data}", f"stats.dir={tmp / 'stats'}",
                   f"model.cache_dir={tmp / 'cache'}", "stats.tokens=2000", "data.max_length=64",
                   "data.batch_tokens=256", "edit.layer=2", "edit.verify.enabled=false", "trainer.accelerator=cpu",
                   "edit.generate_tokens=4", *extra, env=OFFLINE)


def weights(d):
    return load_file(next(d.glob("*.safetensors")))


def test_sequential_edits_ledger_and_bitwise_revert(tiny_model_dir, small_wiki, tmp_path):
    base = tiny_model_dir("gpt2")
    out, m1, m2 = tmp_path / "ledger", tmp_path / "m1", tmp_path / "m2"
    r1 = edit_cli(base, small_wiki, tmp_path, f"request={json.dumps(EIFFEL)}", f"edit.out={out}", f"edit.save_to={m1}")
    assert r1.returncode == 0, r1.stderr
    assert "P(new) after" in r1.stdout and "before:" in r1.stdout and "keys" in r1.stdout
    second = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}
    r2 = edit_cli(base, small_wiki, tmp_path, f"request={json.dumps(second)}", f"edit.out={out}", f"edit.save_to={m2}")
    assert r2.returncode == 0, r2.stderr
    assert "re-applying 1 earlier edit" in r2.stdout
    ledger = json.loads((out / "ledger.json").read_text())
    assert [e["status"] for e in ledger["entries"]] == ["applied", "applied"]
    e = ledger["entries"][0]
    assert e["module"] == "transformer.h.2.mlp.c_proj" and e["conv1d"] is True and e["stats"]["tokens"] == 2000
    assert {"pre", "keys", "v_star", "solve", "apply", "verify", "ledger"} <= set(e["timings"])
    assert set(load_file(out / e["file"])) == {"u", "lam"}
    w0, w1, w2 = weights(base), weights(m1), weights(m2)
    name = "transformer.h.2.mlp.c_proj.weight"
    assert not torch.equal(w0[name], w1[name]) and not torch.equal(w1[name], w2[name])
    # the edited model loads with plain transformers, no code of ours
    AutoModelForCausalLM.from_pretrained(m2)

    r = run_cli("stage=revert", f"ledger={out}", "edit_id=2", f"edit.save_to={tmp_path / 'rev2'}", env=OFFLINE)
    assert r.returncode == 0, r.stderr
    rev2 = weights(tmp_path / "rev2")
    assert all(torch.equal(rev2[k], w1[k]) for k in w1)  # bitwise: the model after edit 1 only
    r = run_cli("stage=revert", f"ledger={out}", "edit_id=all", f"edit.save_to={tmp_path / 'rev'}", env=OFFLINE)
    assert r.returncode == 0, r.stderr
    rev = weights(tmp_path / "rev")
    assert all(torch.equal(rev[k], w0[k]) for k in w0)  # bitwise the original
    assert [e["status"] for e in json.loads((out / "ledger.json").read_text())["entries"]] == ["reverted", "reverted"]


def test_bad_edit_input_leaves_model_on_disk_untouched(tiny_model_dir, small_wiki, tmp_path):
    base = tiny_model_dir("gpt2")
    saved = tmp_path / "saved"
    ok = edit_cli(base, small_wiki, tmp_path, f"request={json.dumps(EIFFEL)}", f"edit.out={tmp_path / 'l'}",
                  f"edit.save_to={saved}")
    assert ok.returncode == 0, ok.stderr
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    other = tiny_model_dir("llama")
    stats_other = run_cli("stage=stats", f"model.name={other}", f"data.files={small_wiki}", f"stats.dir={tmp_path / 'so'}",
                          "stats.layers=[2]", "stats.tokens=500", "trainer.accelerator=cpu", env=OFFLINE)
    assert stats_other.returncode == 0, stats_other.stderr
    other_entry = next((tmp_path / "so").iterdir())
    cases = {
        "not in the prompt": [f"request={json.dumps({**EIFFEL, 'prompt': 'The Louvre is in', 'subject': 'X'})}"],
        "target_new": [f"request={json.dumps({**EIFFEL, 'target_new': ''})}"],
        "equals the true object": [f"request={json.dumps({**EIFFEL, 'target_new': 'Paris'})}"],
        "not valid JSON": ['request={"prompt": "{} is", "subject"'],
        "out of range": [f"request={json.dumps(EIFFEL)}", "edit.layer=7"],
        "are for model": [f"request={json.dumps(EIFFEL)}", f"edit.stats={other_entry}"],
    }
    for expect, extra in cases.items():
        r = edit_cli(base, small_wiki, tmp_path, *extra, f"edit.out={tmp_path / 'l'}", f"edit.save_to={saved}")
        errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and expect in errors[0], (expect, r.stderr[-2000:])
        assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert len(json.loads((tmp_path / "l" / "ledger.json").read_text())["entries"]) == 1
