"""The edit core (pipeline/editors/rome.py) and its Lightning wrapper: the model is never moved or copied, the
layering rule holds, batched v* equals one request at a time, bf16 edits, the Python API."""

import ast
import types

import pytest
import torch
from conftest import ROOT
from torch import nn

from rome.pipeline.core.loading import configure, load_model
from rome.pipeline.core.requests import parse_requests
from rome.pipeline.editors import rome
from rome.pipeline.editors.rank_one import KeySolver
from rome.pipeline.editors.settings import edit_defaults
from rome.pipeline.editors.value import ValueBatch, ValueOptimisation, build_rows

TEMPLATES = ["{}", "The cat sat on the mat. {}", "Therefore we went home. {}"]
EIFFEL = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
    "paraphrases": ["The Eiffel Tower is in"],
    "neighbours": ["The Louvre is in"],
}
DARRIEUX = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"}


def test_no_library_module_imports_recipes():
    offenders = []
    for folder in ("pipeline", "modules", "datamodules"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                if any(n == "recipes" or n.startswith("recipes.") for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
    for path in (ROOT / "recipes").glob("*.py"):  # no recipe imports another recipe (torchtune's rule)
        tree = ast.parse(path.read_text())
        relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
        assert not relative, f"{path.name} imports another recipe"


class _ApplySpy:
    """Records every ``nn.Module._apply`` (what .to/.cuda/.half/.float run) that reaches ``model``."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = {id(m) for m in model.modules()}
        self.calls: list[str] = []

    def __enter__(self):
        self.original = nn.Module._apply
        spy = self

        def apply(module, fn, *args, **kwargs):
            if id(module) in spy.modules:
                spy.calls.append(type(module).__name__)
            return spy.original(module, fn, *args, **kwargs)

        nn.Module._apply = apply
        return self

    def __exit__(self, *exc):
        nn.Module._apply = self.original


def _params(model):
    return {name: (p.device, p.data_ptr(), p.dtype) for name, p in model.named_parameters()}


def test_an_edit_never_moves_or_copies_the_model(tiny_model_dir):
    from rome.modules.edit_loop import fit_edits

    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    cfg = configure(
        [
            f"model.name={tiny_model_dir('llama')}",
            "edit.layer=2",
            "edit.generate_tokens=0",
            "edit.verify.enabled=false",
            "edit.v.steps=3",
        ]
    )
    ctx = rome.RomeEditor("rome", loaded.model, loaded.tokenizer, loaded.spec, cfg.edit, 2, TEMPLATES, KeySolver(None))
    before = _params(loaded.model)
    weight = loaded.spec.down_proj_weight(loaded.model, 2)
    w0 = weight.detach().clone()
    with _ApplySpy(loaded.model) as spy:
        results = fit_edits(ctx, parse_requests([EIFFEL, DARRIEUX]), cfg, progress=False)
        rome.edit(loaded.model, loaded.tokenizer, EIFFEL, layer=2, hparams=cfg.edit, templates=TEMPLATES)
    assert spy.calls == [], f"Module._apply reached the model: {spy.calls[:5]}"
    assert _params(loaded.model) == before  # same devices, same storage, same dtypes
    assert [r.status for r in results] == ["applied", "applied"] and not torch.equal(weight, w0)  # edited in place
    assert not loaded.model.training  # the Trainer's train() never reached it


def test_batched_v_star_equals_one_request_at_a_time(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    model, tok, spec = loaded.model, loaded.tokenizer, loaded.spec
    hp = configure(["edit.v.steps=6"]).edit.v
    requests = [parse_requests(r)[0] for r in (EIFFEL, DARRIEUX, {**EIFFEL, "target_new": "Tokyo"})]
    rows = [
        build_rows(tok, TEMPLATES, r.prompt, r.subject, r.target_new, ["{} is a", "{} is known for"]) for r in requests
    ]
    v0 = torch.randn(len(requests), model.config.n_embd, generator=torch.Generator().manual_seed(0))
    mlp = spec.mlp_name(1)
    alone = []
    for i, r in enumerate(rows):
        opt = ValueOptimisation(
            model, spec, mlp, ValueBatch.build(model, spec, [r], tok.pad_token_id), v0[i : i + 1], hp
        )
        while not opt.step():
            pass
        alone.append((opt.result()[0], opt.losses[0]))
    together = ValueOptimisation(model, spec, mlp, ValueBatch.build(model, spec, rows, tok.pad_token_id), v0, hp)
    while not together.step():
        pass
    for i, (delta, losses) in enumerate(alone):
        torch.testing.assert_close(together.result()[i], delta, rtol=1e-4, atol=1e-5)
        assert together.losses[i] == pytest.approx(losses, rel=1e-4, abs=1e-5)
        assert float(delta.norm()) > 0


def test_bf16_edit_keeps_dtype_follows_float32_and_writes_v_star(tiny_model_dir):
    hp = configure(["edit.generate_tokens=0", "edit.verify.enabled=false"]).edit
    runs = {}
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(str(tiny_model_dir("llama")), device="cpu", dtype=dtype)
        w = loaded.spec.down_proj_weight(loaded.model, 2)
        runs[dtype] = rome.edit(loaded.model, loaded.tokenizer, EIFFEL, layer=2, hparams=hp, templates=TEMPLATES), w
    result, w = runs["bfloat16"]
    assert w.dtype == torch.bfloat16 and result.status == "applied"
    assert result.update.u.dtype == torch.float64 and result.delta.dtype == torch.float32
    # the loss is computed in float32 from bf16 activations: it follows the float32 run closely
    assert result.losses == pytest.approx(runs["float32"][0].losses, rel=2e-2)
    # W' k* = v* up to the bf16 rounding of W'
    got = w.detach().double() @ result.k_star.double()
    v_star = result.v0.double() + result.delta.double()
    assert float((got - v_star).norm() / v_star.norm()) < 2e-2


def test_python_api_defaults_come_from_configs(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    hp = edit_defaults(loaded.model, ["edit.layer=1", "edit.generate_tokens=3", "edit.v.steps=4"])
    assert hp.v.lr == configure([]).edit.v.lr and hp.layer == 1
    result = rome.edit(
        loaded.model,
        loaded.tokenizer,
        EIFFEL,
        hparams=hp,
        templates=TEMPLATES,
        second_moment=torch.eye(loaded.spec.key_size(loaded.model, 1)) * 2,
    )
    assert result.layer == 1 and result.module == "transformer.h.1.mlp.c_proj"
    assert {"pre", "post"} <= set(result.probs) and set(result.probs["post"]) == {"prompt", "paraphrases", "neighbours"}
    if result.status == "rolled_back":  # the table and ledger show the restored (= unedited) model's numbers
        assert result.probs["post"] == result.probs["pre"] and result.probs["rejected"] != result.probs["pre"]
    assert len(result.losses) <= 4 and {"pre", "keys", "v_star", "solve", "apply", "verify"} <= set(result.timings)
    assert result.status in ("applied", "rolled_back") and result.generations["pre"]
    # C = 2I solves to u = k*/2: the update's factors are what the docstring says
    torch.testing.assert_close(result.update.u, result.k_star.double() / 2)
    # the embedded model's defaults: the layer of its own model file
    assert (
        edit_defaults(
            types.SimpleNamespace(config=types.SimpleNamespace(name_or_path="smollm2-135m", model_type="llama"))
        ).layer
        == 6
    )
    assert edit_defaults("gpt2-xl").layer == 17


@pytest.mark.parametrize("variant", ["averaged", "rrome", "original"])
def test_key_variants_write_v_star_at_their_key_along_the_averaged_direction(tiny_model_dir, variant):
    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    spec, layer = loaded.spec, 1
    keys, values = rome.keys_and_values(
        loaded.model, loaded.tokenizer, spec, layer, TEMPLATES, EIFFEL["prompt"], EIFFEL["subject"]
    )
    hp = configure(
        ["edit.generate_tokens=0", "edit.verify.enabled=false", "edit.v.steps=3", f"edit.variant={variant}"]
    ).edit
    d = spec.key_size(loaded.model, layer)
    c = torch.eye(d, dtype=torch.float64) + 0.1 * torch.ones(d, d, dtype=torch.float64) / d
    result = rome.edit(
        loaded.model, loaded.tokenizer, EIFFEL, layer=layer, hparams=hp, templates=TEMPLATES, second_moment=c
    )
    bare, mean = {"averaged": (False, False), "rrome": (False, True), "original": (True, True)}[variant]
    torch.testing.assert_close(result.k_star, keys[0] if bare else keys.mean(0))
    torch.testing.assert_close(result.v0, values[0] if mean else values.mean(0))
    torch.testing.assert_close(result.update.u, torch.linalg.solve(c, keys.mean(0).double()))
    bias = get_bias(loaded, layer)
    w = spec.down_proj_matrix(loaded.model, layer).detach().double()
    v_star = result.v0.double() + result.delta.double() - bias
    assert float((w @ result.k_star.double() - v_star).norm() / v_star.norm()) < 1e-5


def get_bias(loaded, layer):
    from rome.pipeline.core.hooks import get_module

    b = getattr(get_module(loaded.model, loaded.spec.down_proj_name(layer)), "bias", None)
    return b.detach().double() if b is not None else 0
