import torch
from conftest import FAMILIES


def test_every_family_builds_and_runs(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for fam in FAMILIES:
        d = tiny_model_dir(fam)
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d)
        out = model(**tok("The Eiffel Tower is in", return_tensors="pt"))
        assert out.logits.shape[-1] == len(tok)
        assert torch.isfinite(out.logits).all()
