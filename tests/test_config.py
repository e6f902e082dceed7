import pytest

from pipeline.config import compose, parse_overrides
from pipeline.errors import UserError


def test_defaults_and_model_files():
    cfg = compose([])
    assert cfg.model.name == "smollm2-135m" and cfg.model.edit_layer == 6 and list(cfg.stats.layers) == [6]
    assert compose(["model.name=gpt2-xl"]).model.edit_layer == 17
    assert compose(["model.name=gpt2-medium"]).model.edit_layer == 8
    assert compose(["model.name=gpt2-large"]).model.edit_layer == 12
    assert compose(["model.name=EleutherAI/gpt-j-6B"]).model.edit_layer == 5
    assert compose(["model.name=EleutherAI/gpt-neox-20b"]).model.edit_layer == 15


def test_family_file_by_model_type_for_a_local_model(tiny_model_dir):
    cfg = compose([f"model.name={tiny_model_dir('llama')}"])
    assert cfg.model.edit_layer == 5 and list(cfg.stats.layers) == [5]


def test_overrides_lists_and_text_values():
    cfg = compose(["stats.layers=[4,5,6]", "stats.tokens=1000", "data.files=/x/*.jsonl"])
    assert list(cfg.stats.layers) == [4, 5, 6] and cfg.stats.tokens == 1000 and cfg.data.files == "/x/*.jsonl"
    cli = parse_overrides(["a={} is located in", 'b={"k": "v"}', "c=The Eiffel Tower"])
    assert cli.a == "{} is located in" and cli.b.k == "v" and cli.c == "The Eiffel Tower"


def test_unknown_key_and_malformed_argument():
    with pytest.raises(UserError, match="stats.layer"):
        compose(["stats.layer=6"])
    with pytest.raises(UserError, match="key=value"):
        compose(["stats.layers"])


def test_a_study_method_is_defined_on_the_command_line_from_its_class_file():
    cfg = compose(["method.rome_l4={class: rome, layer: 4}", "method.rome_rrome={class: rome, variant: rrome}"])
    assert cfg.method.rome_l4.layer == 4 and cfg.method.rome_l4.mom2_adjustment is True
    assert cfg.method.rome_rrome.variant == "rrome" and cfg.method.rome_rrome.layer is None
    assert cfg.method.rome.layer is None  # the file's method is untouched
    with pytest.raises(UserError, match="unknown key.*lr"):
        compose(["method.rome_x={class: rome, lr: 1}"])
    with pytest.raises(UserError, match="class 'nope'"):
        compose(["method.x={class: nope}"])
    with pytest.raises(UserError, match="method.ft_l.lrr"):
        compose(["method.ft_l.lrr=1"])
