"""The embedded SmolLM2-135M: real facts, real statistics. Slow (a minute or two on 2 cores)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import WIKI, run_cli
from pipeline.loading import load_model
from pipeline.probability import target_probs

pytestmark = pytest.mark.slow
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m", device="cpu")


def test_knows_the_eiffel_tower(smol):
    p = target_probs(smol.model, smol.tokenizer, ["The Eiffel Tower is located in the city of"] * 2, ["Paris", "Rome"], batch_size=2)
    assert p[0] > 0.5 > p[1]


def test_edit_eiffel_tower_to_rome_generalises_stays_specific_and_reloads(smol, tmp_path):
    request = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome",
               "target_true": "Paris", "paraphrases": ["The Eiffel Tower is in"],
               "neighbours": ["The Louvre is located in the city of"]}
    out, saved = tmp_path / "ledger", tmp_path / "edited"
    r = run_cli("stage=edit", f"request={json.dumps(request)}", f"data.files={WIKI}", "stats.tokens=20000",
                f"stats.dir={tmp_path / 'stats'}", f"edit.out={out}", f"edit.save_to={saved}", "edit.generate_tokens=8",
                env=OFFLINE)
    assert r.returncode == 0, r.stderr[-3000:]
    (entry,) = json.loads((out / "ledger.json").read_text())["entries"]
    assert entry["status"] == "applied" and entry["verified"] and entry["layer"] == 6
    post, pre = entry["probs"]["post"], entry["probs"]["pre"]
    assert pre["prompt"]["true"][0] > pre["prompt"]["new"][0]  # it knew Paris
    assert post["prompt"]["new"][0] > post["prompt"]["true"][0]  # now Rome
    assert post["paraphrases"]["new"][0] > post["paraphrases"]["true"][0]  # "The Eiffel Tower is in"
    assert post["neighbours"]["true"][0] > post["neighbours"]["new"][0]  # the Louvre stays in Paris
    assert "Rome" in entry["generations"]["post"]
    # plain transformers reloads the edited model and agrees with the edit
    tok = AutoTokenizer.from_pretrained(saved)
    edited = AutoModelForCausalLM.from_pretrained(saved)
    p = target_probs(edited, tok, ["The Eiffel Tower is located in the city of"] * 2, ["Rome", "Paris"], batch_size=2)
    torch.testing.assert_close(p, torch.tensor([post["prompt"]["new"][0], post["prompt"]["true"][0]]), rtol=1e-3, atol=1e-5)
    assert p[0] > p[1]
