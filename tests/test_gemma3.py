"""The embedded Gemma 3 270M: a second real model, of another family (gemma3_text). Slow: the first use
converts its GGUF (about a minute), then each test takes well under two minutes on 2 cores."""

import json

import pytest
import torch
from conftest import WIKI, check_fast_value_loss, run_main
from transformers import AutoModelForCausalLM, AutoTokenizer

from rome.pipeline.core.loading import load_model
from rome.pipeline.core.probability import target_probs
from rome.pipeline.editors.templates import start_text

pytestmark = pytest.mark.slow
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma3-270m", device="cpu")


def test_loads_through_the_adapter_and_knows_the_eiffel_tower(gemma):
    model, spec = gemma.model, gemma.spec
    assert model.config.model_type == "gemma3_text" and spec.num_layers(model) == 18
    assert spec.down_proj_matrix(model, 4).shape == (640, 2048) and model.config.vocab_size == 262144
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert gemma.identity == {"name": "gemma3-270m", "revision": "gguf-sha256:a5fd3b62230aa5ec"}
    assert start_text(gemma.tokenizer) == "<bos>"  # no <|endoftext|> in this vocabulary
    p = target_probs(model, gemma.tokenizer, [PROMPT] * 2, ["Paris", "Rome"], batch_size=2)
    assert p[0] > 0.5 > 0.01 > p[1]


def test_fast_value_loss_equals_the_full_model_loss(gemma):
    assert gemma.model.config.final_logit_softcapping is None  # Gemma 3 has no soft-cap (Gemma 2 has: tiny tests)
    fast0, fast = check_fast_value_loss(gemma, layer=4, delta_scale=20.0, v0_norm=60.0, atol=1e-4)
    # δ moved the loss (little: Gemma 3 normalises the MLP output again, so even a large δ only turns it)
    assert float(fast.kl) > 1e-3 and abs(float(fast.nll - fast0.nll)) > 1e-3


def test_edit_eiffel_tower_to_rome_verifies_and_reloads(gemma, tmp_path):
    request = {
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
        "target_true": "Paris",
        "paraphrases": ["The Eiffel Tower is in"],
        "neighbours": ["The Louvre is located in the city of"],
    }
    out, saved = tmp_path / "ledger", tmp_path / "edited"
    r = run_main(
        "stage=edit",
        "model.name=gemma3-270m",
        f"request={json.dumps(request)}",
        f"data.files={WIKI}",
        "stats.tokens=10000",
        f"stats.dir={tmp_path / 'stats'}",
        f"edit.out={out}",
        f"edit.save_to={saved}",
        "edit.generate_tokens=6",
        "model.device=cpu",
        "trainer.accelerator=cpu",
        env=OFFLINE,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (entry,) = json.loads((out / "ledger.json").read_text())["entries"]
    assert entry["status"] == "applied" and entry["verified"] and entry["layer"] == 4
    post, pre = entry["probs"]["post"], entry["probs"]["pre"]
    assert pre["prompt"]["true"][0] > pre["prompt"]["new"][0]  # it knew Paris
    assert post["prompt"]["new"][0] > post["prompt"]["true"][0]  # now Rome
    assert post["neighbours"]["true"][0] > post["neighbours"]["new"][0]  # the Louvre stays in Paris
    # plain transformers reloads the edited model and agrees with the edit
    tok = AutoTokenizer.from_pretrained(saved)
    edited = AutoModelForCausalLM.from_pretrained(saved)
    p = target_probs(edited, tok, [PROMPT] * 2, ["Rome", "Paris"], batch_size=2)
    torch.testing.assert_close(
        p, torch.tensor([post["prompt"]["new"][0], post["prompt"]["true"][0]]), rtol=1e-3, atol=1e-5
    )
    assert p[0] > p[1]
