"""The embedded SmolLM2-135M: real facts, real statistics. Slow (a minute or two on 2 cores)."""

import pytest
import torch

from rome.pipeline.core.loading import load_model
from rome.pipeline.core.probability import target_probs

pytestmark = pytest.mark.slow
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m", device="cpu")


def test_knows_the_eiffel_tower(smol):
    p = target_probs(
        smol.model, smol.tokenizer, ["The Eiffel Tower is located in the city of"] * 2, ["Paris", "Rome"], batch_size=2
    )
    assert p[0] > 0.5 > p[1]


@pytest.mark.slow
def test_without_target_true_a_short_edit_fails_against_the_models_own_answer_and_is_rolled_back(smol, capsys):
    """The issue's case: 3 v* steps leave P(Rome) below P(Paris); with no target_true given, the model's own
    answer (Paris) is what verification compares against, so the edit fails and is undone bitwise."""
    from rome.pipeline.core.loading import configure
    from rome.pipeline.editors import rome
    from rome.recipes.edit import print_table

    request = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}
    weight = smol.spec.down_proj_weight(smol.model, 6)
    before = weight.detach().clone()
    hp = configure(["edit.v.steps=3", "edit.generate_tokens=5"]).edit
    result = rome.edit(
        smol.model,
        smol.tokenizer,
        request,
        layer=6,
        second_moment=None,
        hparams=hp,
        templates=["{}", "The cat sat on the mat. {}", "Therefore we went home. {}"],
    )
    assert result.true_from_model and result.request.target_true == "Paris"
    rejected = result.probs["rejected"]["prompt"]
    assert rejected["new"][0] < rejected["true"][0]  # the edit moved P(Rome) up, not past P(Paris)
    assert result.status == "rolled_back" and "P(new) > P(true) fails on 1 of 1 prompt" in result.reason
    assert torch.equal(weight, before)
    assert result.probs["post"] == result.probs["pre"] and result.generations["post"] == result.generations["pre"]
    print_table(result)
    out = capsys.readouterr().out
    assert "(was Paris, the model’s own answer)" in out and "P(new) rolled back" in out and "status: rolled_back" in out
