"""The editor interface: one factory builds every method; the plain loop and the Lightning loop give the same
weights; the edit stage's callbacks give the same edits and ledger in any order; a new method is one class."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from rome.modules.callbacks import ApplyEdit, EditProgress, RecordEdit, VerifyEdit
from rome.modules.edit_loop import EditLoop, fit_edits
from rome.modules.trainer import single_device_trainer
from rome.pipeline.core.loading import configure, load_model
from rome.pipeline.core.requests import parse_requests
from rome.pipeline.editors.base import REGISTRY, Edit, Editor, register
from rome.pipeline.editors.factory import build_editor
from rome.pipeline.editors.ledger import Ledger
from rome.pipeline.errors import UserError

EIFFEL = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}
RIVIERA = {"prompt": "{} plays for the club", "subject": "Riviera", "target_new": "Barcelona", "target_true": "Milan"}


def setup(tiny_model_dir, tmp_path, *overrides):
    path = str(tiny_model_dir("gpt2"))
    cfg = configure(
        [
            f"model.name={path}",
            f"model.cache_dir={tmp_path / 'cache'}",
            "edit.layer=2",
            "edit.layers=[1,2]",
            "edit.mom2_adjustment=false",
            "edit.v.steps=3",
            "edit.memit.v.steps=3",
            "edit.generate_tokens=0",
            "edit.batch_size=2",
            "trainer.accelerator=cpu",
            *overrides,
        ]
    )
    return cfg, load_model(path, device="cpu")


def identity_statistics(loaded):
    """C = I as statistics (MEMIT needs a C; the tests need no streaming pass)."""
    from pathlib import Path

    from rome.pipeline.stats.store import LayerStats

    def provide(layers):
        return {
            layer: LayerStats(
                layer,
                loaded.spec.down_proj_name(layer),
                torch.eye(loaded.spec.key_size(loaded.model, layer), dtype=torch.float64),
                1,
                Path(f"identity-{layer}"),
            )
            for layer in layers
        }

    return provide


def weights(loaded, layers):
    return {layer: loaded.spec.down_proj_weight(loaded.model, layer).detach().clone() for layer in layers}


def test_the_factory_builds_every_configured_method_and_refuses_unknown_classes(tiny_model_dir, tmp_path):
    cfg, loaded = setup(tiny_model_dir, tmp_path)
    for name in ("none", "rome", "rome_identity_cov", "ft_l"):
        editor = build_editor(cfg, loaded, name, identity_statistics(loaded), measure_only=True)
        assert isinstance(editor, REGISTRY[cfg.method[name]["class"]]) and editor.name == name
    assert build_editor(cfg, loaded, "ft_l").layers == [0] and build_editor(
        cfg, loaded, "rome_identity_cov"
    ).layers == [2]
    memit = build_editor(cfg, loaded, "memit", statistics=identity_statistics(loaded))
    assert memit.layers == [1, 2]
    assert [len(u) for u in memit.units(parse_requests([EIFFEL, RIVIERA, EIFFEL]))] == [2, 1]
    with pytest.raises(UserError, match="unknown method 'rome_x'"):
        build_editor(cfg, loaded, "rome_x")
    with pytest.raises(UserError, match="no statistics were given"):
        build_editor(configure([f"model.name={tiny_model_dir('gpt2')}", "edit.layer=2", "edit.method=rome"]), loaded)
    measured = build_editor(cfg, loaded, "rome", identity_statistics(loaded), measure_only=True)
    assert not measured.hp.verify.enabled and measured.hp.generate_tokens == 0  # the eval measures edits as made


def test_hyperparameters_are_typed_and_read_only(tiny_model_dir, tmp_path):
    cfg, loaded = setup(tiny_model_dir, tmp_path)
    editor = build_editor(cfg, loaded)
    assert isinstance(editor.hp.v.lr, float) and editor.hp.layer == 2
    with pytest.raises(Exception, match="read-only|ReadonlyConfigError"):
        editor.hp.v.lr = 1.0
    from rome.pipeline.editors.hparams import FineTuneHparams, typed

    conf = dict(cfg.method.ft_l)  # the command line's values are checked by configure; a config built in code here
    with pytest.raises(UserError, match="method.ft_l.lr: .*'fast'"):
        typed(FineTuneHparams, {**conf, "lr": "fast"}, "method.ft_l")
    with pytest.raises(UserError, match="method.ft_l.steps missing"):
        typed(FineTuneHparams, {k: v for k, v in conf.items() if k != "steps"}, "method.ft_l")


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_the_plain_loop_and_the_lightning_loop_write_the_same_weights(tiny_model_dir, tmp_path, method):
    # verification off: 3 v* steps do not make a random model say the objects, and a rolled-back edit writes nothing
    cfg, loaded = setup(tiny_model_dir, tmp_path, f"edit.method={method}", "edit.verify.enabled=false")
    requests = parse_requests([EIFFEL, RIVIERA])
    clean = weights(loaded, [1, 2])
    torch.manual_seed(0)
    plain = build_editor(cfg, loaded, statistics=identity_statistics(loaded)).edit(requests)
    after_plain = weights(loaded, [1, 2])
    with torch.no_grad():
        for layer, w in clean.items():
            loaded.spec.down_proj_weight(loaded.model, layer).copy_(w)
    torch.manual_seed(0)
    looped = fit_edits(build_editor(cfg, loaded, statistics=identity_statistics(loaded)), requests, cfg, progress=False)
    after_loop = weights(loaded, [1, 2])
    assert [e.status for e in plain] == [e.status for e in looped] and len(plain) == (2 if method == "rome" else 1)
    assert all(torch.equal(after_plain[layer], after_loop[layer]) for layer in (1, 2))
    assert not all(torch.equal(after_plain[layer], clean[layer]) for layer in (1, 2))


def _entries(ledger_dir):
    entries = json.loads((ledger_dir / "ledger.json").read_text())["entries"]
    for e in entries:
        e.pop("timings"), e.pop("file")
    return entries


def test_the_callbacks_give_the_same_edits_and_ledger_in_any_order(tiny_model_dir, tmp_path):
    requests = parse_requests([EIFFEL, RIVIERA])
    runs = []
    for i, order in enumerate(itertools.islice(itertools.permutations(range(4)), 0, None, 7)):
        cfg, loaded = setup(tiny_model_dir, tmp_path, "edit.verify.enabled=true")
        editor = build_editor(cfg, loaded)
        ledger = Ledger.open(tmp_path / f"ledger{i}", loaded.identity, "float32")
        callbacks = [ApplyEdit(), VerifyEdit(), RecordEdit(ledger, loaded.identity), EditProgress(enabled=False)]
        module = EditLoop(editor, requests)
        torch.manual_seed(0)
        single_device_trainer(cfg, loaded.model, [callbacks[j] for j in order]).fit(module)
        runs.append((order, [e.status for e in module.finished()], weights(loaded, [2])[2], _entries(ledger.dir)))
    assert len(runs) == 4
    first = runs[0]
    assert len(first[3]) == 2 and all(e["sha256"] for e in first[3])
    for order, statuses, w, entries in runs[1:]:
        assert statuses == first[1] and torch.equal(w, first[2]), order
        assert [e["sha256"] for e in entries] == [e["sha256"] for e in first[3]], order  # the same factors, bitwise
        assert entries == first[3], order


def test_a_new_method_is_one_class_and_runs_through_every_loop(tiny_model_dir, tmp_path):
    """A toy method (adds a constant to one layer's weight): registered, built by the factory from a method
    file defined on the command line, run by the plain loop and by the Lightning loop with the same result."""

    @dataclasses.dataclass
    class ShiftEdit(Edit):
        requests: list

    @register("shift_test")
    class Shift(Editor):
        @classmethod
        def from_config(cls, name, cfg, loaded, conf, statistics, measure_only):
            return cls(name, loaded.model, loaded.tokenizer, loaded.spec, conf, [int(conf.layer)])

        def begin(self, requests):
            return ShiftEdit(list(requests))

        def apply(self, edit):
            with torch.no_grad():
                self.spec.down_proj_weight(self.model, self.layers[0]).add_(1.0)
            edit.status = "applied"

    try:
        cfg, loaded = setup(tiny_model_dir, tmp_path, "method.shift={class: rome, layer: 1}")
        cfg.method.shift["class"] = "shift_test"
        before = weights(loaded, [1])[1]
        editor = build_editor(cfg, loaded, "shift")
        assert isinstance(editor, Shift) and editor.touched() == [
            "transformer.h.1.mlp.c_proj.weight",
            "transformer.h.1.mlp.c_proj.bias",
        ]
        editor.edit(parse_requests([EIFFEL]))
        fit_edits(editor, parse_requests([EIFFEL, RIVIERA]), cfg, progress=False)
        torch.testing.assert_close(weights(loaded, [1])[1], before + 3.0)  # three units, each +1
    finally:
        REGISTRY.pop("shift_test")
