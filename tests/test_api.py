"""The Python API (``rome.py``) on a tiny random GPT-2: ``rome.edit`` by name or on a loaded model, statistics
from the cache (computed into it from ``data_files=``, refused in one line without data), a progress callback,
the edit stage's table as ``str(result)``, the batch methods through the same call."""

from __future__ import annotations

import pytest
import torch

import rome
from rome.pipeline.core.loading import load_model
from rome.pipeline.errors import UserError

TOWER = {"prompt": "The best tower is {}", "subject": "the Eiffel Tower", "target_new": "and", "target_true": "Paris"}


def _overrides(tmp_path, *extra):
    return [
        f"model.cache_dir={tmp_path / 'cache'}",
        f"stats.dir={tmp_path / 'stats'}",
        "stats.tokens=2000",
        "data.max_length=64",
        "data.batch_tokens=256",
        "edit.layer=2",
        "edit.v.steps=10",
        "edit.generate_tokens=0",
        "edit.verify.max_relative_update=10",  # C of 2000 tokens makes the tiny model's update large
        *extra,
    ]


def test_edit_by_name_computes_c_from_data_files_and_reports_like_the_edit_stage(tiny_model_dir, small_wiki, tmp_path):
    path = str(tiny_model_dir("gpt2"))
    with pytest.raises(UserError, match=r"C of layer\(s\) \[2\] of .* is not in the statistics cache .*stage=stats"):
        rome.edit(path, TOWER, overrides=_overrides(tmp_path, "model.device=cpu", "trainer.accelerator=cpu"))
    steps = []
    model, result = rome.edit(
        path,
        TOWER,
        data_files=small_wiki,
        overrides=_overrides(tmp_path, "model.device=cpu", "trainer.accelerator=cpu"),
        progress=steps.append,
    )
    assert (tmp_path / "stats").is_dir()  # C computed into the cache
    (edit,) = result
    assert result.status == edit.status == "applied" and result.method == "rome" and result.layers == [2]
    assert edit.checks[0]["took"] and result.warnings == edit.warnings and len(result.warnings) == 1
    assert str(result) == edit.table() and str(result).startswith("[-] The best tower is the Eiffel Tower -> and")
    assert [s.step for s in steps] == list(range(1, len(steps) + 1)) and {s.unit for s in steps} == {1}
    assert steps[-1].loss < steps[0].loss and steps[0].steps == 10
    assert model.spec.down_proj_weight(model.model, 2).requires_grad is False
    # without data_files, the cache's own statistics for this model serve (the ones just computed)
    loaded = load_model(path, device="cpu")
    before = loaded.spec.down_proj_weight(loaded.model, 2).detach().clone()
    again, second = rome.edit(loaded, TOWER, overrides=_overrides(tmp_path), progress=False)
    assert again is loaded and not torch.equal(loaded.spec.down_proj_weight(loaded.model, 2), before)
    assert second[0].update.denominator == pytest.approx(edit.update.denominator, rel=1e-6)  # the same C


def test_batch_methods_through_the_same_call(tiny_model_dir, small_wiki, tmp_path, capsys):
    path = str(tiny_model_dir("gpt2"))
    requests = [TOWER, {**TOWER, "subject": "the Big Ben", "target_new": "of"}]
    batch_args = ("model.device=cpu", "trainer.accelerator=cpu", "edit.layers=[1,2]", "edit.memit.v.steps=2")
    overrides = _overrides(tmp_path, *batch_args)
    _, result = rome.edit(path, requests, method="memit", data_files=small_wiki, overrides=overrides)
    (batch,) = result
    assert result.method == "memit" and result.layers == [1, 2] and len(batch.checks) == 2
    assert result.status == batch.status and str(result) == str(batch)
    assert str(result).startswith("[-] a batch of 2 request(s)")
    assert sum(line.startswith("warning: the model did not know") for line in capsys.readouterr().err.splitlines()) == 2
    # a configs/method/ file by its name: MEMIT's editor with ENCORE's settings
    _, encore = rome.edit(path, requests, method="encore", data_files=small_wiki, overrides=overrides)
    assert encore.method == "encore" and len(encore[0].checks) == 2
    with pytest.raises(UserError, match="method=romee is not one of .*encore"):
        rome.edit(path, TOWER, method="romee")


def test_the_package_offers_what_the_api_exports():
    """``rome/__init__.py`` names the API lazily (``import rome`` stays instant); the names are the API's own."""
    from rome import api

    assert list(rome._API) == api.__all__ and all(getattr(rome, name) is getattr(api, name) for name in api.__all__)
