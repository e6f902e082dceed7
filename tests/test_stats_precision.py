"""The precision budget of the fast accumulation (float32 per-batch products into a float64 total): C within
1e-6 (relative Frobenius) of the all-float64 computation on real keys, and an edit made with either C the
same edit."""

import gzip
import json

import pytest
import torch
from conftest import WIKI, wiki_texts

from rome.pipeline.core.hooks import Trace, get_module
from rome.pipeline.core.loading import configure, load_model
from rome.pipeline.editors import rome
from rome.pipeline.stats.second_moment import accumulate_second_moment

BUDGET = 1e-6
TEMPLATES = ["{}", "The cat sat on the mat. {}", "Therefore we went home. {}"]
EIFFEL = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}


def stage_sums(keys: torch.Tensor, batch: int, product: str) -> torch.Tensor:
    total = torch.zeros(keys.shape[1], keys.shape[1], dtype=torch.float64)
    for part in keys.split(batch):
        accumulate_second_moment(total, part, product)
    return total


@pytest.mark.slow
def test_real_smollm2_keys_within_budget_in_float32_and_bfloat16():
    smol = load_model("smollm2-135m", device="cpu")
    rows = []
    with gzip.open(WIKI, "rt") as f:
        for line in f:
            ids = smol.tokenizer(json.loads(line)["text"][:8192], truncation=True, max_length=1024)["input_ids"]
            if len(ids) == 1024:
                rows.append(ids)
            if len(rows) == 4:
                break
    module = get_module(smol.model, smol.spec.down_proj_name(6))
    with torch.inference_mode(), Trace(module, retain_input=True, stop=True) as t:
        smol.model(input_ids=torch.tensor(rows), use_cache=False)
    keys = t.input.reshape(-1, t.input.shape[-1])  # 4096 real keys of layer 6
    for dtype in (torch.float32, torch.bfloat16):  # the keys of a float32 model, and of a bf16 one
        k = keys.to(dtype)
        exact = stage_sums(k, 4096, "exact")
        fast = stage_sums(k, 4096, "fp32")
        error = float((fast - exact).norm() / exact.norm())
        assert error < BUDGET, (dtype, error)  # measured: 1.0e-7 (float32), 2.4e-7 (bfloat16)


def test_edit_outcome_is_the_same_with_either_c(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    layer = 1
    parts = []
    for text in wiki_texts(12):  # real text through the tiny model, one text at a time (no padding)
        ids = loaded.tokenizer(text, return_tensors="pt", truncation=True, max_length=128).input_ids
        with (
            torch.inference_mode(),
            Trace(get_module(loaded.model, loaded.spec.down_proj_name(layer)), retain_input=True, stop=True) as t,
        ):
            loaded.model(input_ids=ids, use_cache=False)
        parts.append(t.input[0])
    keys = torch.cat(parts)
    c = {p: stage_sums(keys, 512, p) / keys.shape[0] for p in ("exact", "fp32")}
    assert float((c["fp32"] - c["exact"]).norm() / c["exact"].norm()) < BUDGET
    hp = configure(["edit.generate_tokens=0", "edit.v.steps=5", "edit.verify.rollback=false"]).edit
    results, weights = {}, {}
    original = loaded.spec.down_proj_matrix(loaded.model, layer).detach().clone()
    for p in ("exact", "fp32"):
        torch.manual_seed(0)
        results[p] = rome.edit(
            loaded.model, loaded.tokenizer, EIFFEL, layer=layer, hparams=hp, templates=TEMPLATES, second_moment=c[p]
        )
        w = loaded.spec.down_proj_matrix(loaded.model, layer)
        weights[p] = w.detach().clone()
        with torch.no_grad():
            w.copy_(original)
    a, b = results["exact"], results["fp32"]
    assert a.status == b.status and a.losses == b.losses  # v* does not depend on C
    assert float((b.update.u - a.update.u).norm() / a.update.u.norm()) < 1e-5  # measured: 6.7e-7
    delta = {p: (weights[p] - original).double() for p in weights}
    assert float((delta["fp32"] - delta["exact"]).norm() / delta["exact"].norm()) < 1e-5  # measured: 6.9e-7
    pa, pb = a.probs["post"]["prompt"], b.probs["post"]["prompt"]
    assert pa["new"][0] == pytest.approx(pb["new"][0], rel=1e-6) and pa["true"][0] == pytest.approx(
        pb["true"][0], rel=1e-6
    )
