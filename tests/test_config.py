import pytest
import yaml

from rome.pipeline.config import compose, parse_overrides
from rome.pipeline.core.loading import configure
from rome.pipeline.errors import UserError


def test_defaults_and_model_files():
    cfg = compose([])
    assert cfg.model.name == "smollm2-135m" and cfg.model.edit_layer == 6 and list(cfg.stats.layers) == [6]
    assert compose(["model.name=gpt2-xl"]).model.edit_layer == 17
    assert compose(["model.name=gpt2-medium"]).model.edit_layer == 8
    assert compose(["model.name=gpt2-large"]).model.edit_layer == 12
    assert compose(["model.name=EleutherAI/gpt-j-6B"]).model.edit_layer == 5
    assert compose(["model.name=EleutherAI/gpt-neox-20b"]).model.edit_layer == 15


def test_family_file_by_model_type_for_a_local_model(tiny_model_dir):
    cfg = configure([f"model.name={tiny_model_dir('llama')}"])
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


def test_a_variant_of_a_method_file_is_defined_from_that_file_and_runs_under_its_own_name():
    from rome.pipeline.editors.factory import method_class
    from rome.pipeline.editors.settings import method_hparams

    cfg = compose(["method.encore_keys_off={class: encore, memit: {preserve_edits: false}}"])
    name, conf = method_class(cfg, "encore_keys_off")
    variant, encore = method_hparams(cfg, conf, True).memit, method_hparams(cfg, cfg.method.encore, True).memit
    assert name == "memit" and conf["class"] == "memit"
    assert (variant.preserve_edits, encore.preserve_edits) == (False, True)
    assert variant.norm_constraint == encore.norm_constraint > 0 and variant.v.most_probable_stop == 2
    with pytest.raises(UserError, match=r"e2.memit.preserve_edit' \(did you mean method.e2.memit.preserve_edits"):
        compose(["method.e2={class: encore, memit: {preserve_edit: false}}"])
    with pytest.raises(UserError, match="method.e2.memit.v.most_probable_stp"):
        compose(["method.e2={class: encore, memit: {v: {most_probable_stp: 3}}}"])


def test_model_files_set_the_releases_edit_and_method_hyperparameters(tmp_path):
    from omegaconf import OmegaConf

    from rome.pipeline.editors.settings import edit_defaults

    clamp = {
        m: compose([f"model.name={m}"]).edit.v.clamp_norm_factor
        for m in ("gpt2-medium", "gpt2-large", "gpt2-xl", "EleutherAI/gpt-j-6B", "smollm2-135m")
    }
    assert clamp == {
        "gpt2-medium": 3.0,
        "gpt2-large": 4.0,
        "gpt2-xl": 4.0,
        "EleutherAI/gpt-j-6B": 4.0,
        "smollm2-135m": 4.0,
    }
    eps = {
        m: compose([f"model.name={m}"]).method.ft_l.norm_constraint
        for m in ("gpt2-medium", "gpt2-large", "gpt2-xl", "gpt-j-6b", "smollm2-135m")
    }
    assert eps == {"gpt2-medium": 2e-3, "gpt2-large": 1e-3, "gpt2-xl": 5e-4, "gpt-j-6b": 5e-5, "smollm2-135m": 5e-4}
    medium = compose(["model.name=gpt2-medium"])
    assert (
        medium.model.edit_layer == 8 and medium.edit.v.steps == 20 and "edit" not in medium.model
    )  # only what it sets
    assert medium.method.ft_l.lr == 5e-4 and medium.method.ft_l.layer == 0
    # the command line still wins; a study method starts from its class's values for this model
    cfg = compose(["model.name=gpt2-medium", "edit.v.clamp_norm_factor=5", "method.ft_l_l6={class: ft_l, layer: 6}"])
    assert (
        cfg.edit.v.clamp_norm_factor == 5
        and cfg.method.ft_l_l6.norm_constraint == 2e-3
        and cfg.method.ft_l_l6.layer == 6
    )
    assert edit_defaults("gpt2-medium").v.clamp_norm_factor == 3.0  # the Python API's defaults too
    # a key configs/ does not have is an error of the model file
    with pytest.raises(UserError, match=r"model/ file of mine: unknown key 'edit.v.clamp'"):
        compose([], model_file=OmegaConf.create({"name": "mine", "edit": {"v": {"clamp": 3}}}))
    with pytest.raises(UserError, match="unknown key 'method.nosuch"):
        compose([], model_file=OmegaConf.create({"name": "mine", "method": {"nosuch": {"lr": 1}}}))


@pytest.mark.parametrize(
    "override, expect",
    [
        ("stats.tokens=abc", "stats.tokens=abc is not valid: it expects an integer (default: 200000)"),
        ("stats.tokens=1.5", "stats.tokens=1.5 is not valid: it expects an integer"),
        ("stats.tokens=null", "stats.tokens=null is not allowed: it expects an integer"),
        ("stats.layers=6", "stats.layers=6 is not valid: it expects a list"),
        ("stats.layers=[4,x]", "stats.layers[1]=x is not valid: it expects an integer"),
        ("edit.verify.enabled=maybe", "edit.verify.enabled=maybe is not valid: it expects true or false"),
        ("edit.v=3", "edit.v is a group of keys (lr, steps"),
        ("edit.layer=first", "edit.layer=first is not valid: it expects an integer or auto"),
        ("stats.dtype=int8", "stats.dtype=int8 is not one of"),
        ("model.dtype=int8", "model.dtype=int8 is not one of"),
        ("data.max_length=0", "data.max_length=0 must be positive"),
        ("seed=-1", "seed=-1 must be zero or more"),
        ("edit.layr=3", "unknown config key 'edit.layr' (did you mean edit.layer?)"),
        ("edt.layer=3", "unknown config key 'edt.layer' (did you mean edit.layer?)"),
        ("trace.sample=3", "(did you mean trace.samples?)"),
    ],
)
def test_a_bad_value_names_its_key_and_what_it_expects(override, expect):
    with pytest.raises(UserError) as err:
        compose([override])
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_values_are_converted_to_the_type_of_their_default():
    cfg = compose(
        [
            "edit.ridge=1e-3",
            "stats.tokens=2e4",
            "answer=1889",
            "edit.layer=auto",
            "trainer.devices=[0,1]",
            "eval.n=null",
            "model.revision=20240101",
            "stats.layers=[2,'${seed}']",
            "seed=4",
        ]
    )
    assert cfg.edit.ridge == 0.001 and cfg.stats.tokens == 20000 and isinstance(cfg.stats.tokens, int)
    assert cfg.answer == "1889" and cfg.edit.layer == "auto" and list(cfg.trainer.devices) == [0, 1]
    assert cfg.eval.n is None and cfg.model.revision == 20240101  # a null default takes any value
    assert list(cfg.stats.layers) == [2, 4]  # an interpolation is taken as written


def test_devices_this_machine_does_not_have_are_refused_up_front(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for override in ("model.device=cuda", "model.device=cuda:1", "trainer.accelerator=gpu", "trainer.accelerator=cuda"):
        with pytest.raises(UserError, match="no CUDA device is visible here"):
            configure([override])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"model.device=cuda:3 but this machine has 1 CUDA device\(s\)"):
        configure(["model.device=cuda:3"])
    with pytest.raises(UserError, match="is not a device"):
        configure(["model.device=gpu0"])
    from rome.modules.trainer import make_trainer

    with pytest.raises(UserError, match="trainer.. settings .*strategy=nope"):
        make_trainer(configure(["trainer.accelerator=cpu", "trainer.strategy=nope"]))


def test_help_print_config_and_the_nearest_stage(capsys):
    from rome import cli

    for word in ("--help", "-h", "help"):
        assert cli.main([word]) == 0
        out = capsys.readouterr().out
        assert all(f"  {stage} " in out for stage in cli.STAGES) and "edit.*" in out and "configs/config.yaml" in out
    assert cli.main(["print_config=true", "stage=edit", "edit.layer=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["stage"] == "edit" and printed["edit"]["layer"] == 3 and printed["model"]["edit_layer"] == 6
    assert cli.main(["stage=edt"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: stage=edt is not one of {', '.join(cli.STAGES)} (did you mean edit?)"  # every stage, in order
    )


def test_a_date_like_value_stays_text():
    from rome.pipeline.config import parse_overrides

    assert parse_overrides(["edit.out=2024-01-01", "report.dir=2026-12-04_10:00"]).edit.out == "2024-01-01"


def test_results_tables_name_the_edit_and_adapter_settings_a_run_changed():
    """A run that edits other modules (``model.arch.down_proj_by_layer``) or with another lr measured another
    method: the tables' note names both; a run on configs/' settings names nothing."""
    from rome.pipeline.editors.settings import changed_edit_settings

    by_layer = "model.arch.down_proj_by_layer={mlp.gate_proj: [10, 11], mlp.up_proj: [17]}"
    assert changed_edit_settings(compose([by_layer, "edit.ultraedit.lr=5e-5"])) == [
        "edit.ultraedit.lr=5e-05",
        'model.arch.down_proj_by_layer={"mlp.gate_proj": [10, 11], "mlp.up_proj": [17]}',
    ]
    assert changed_edit_settings(compose(["model.arch.down_proj=mlp.up_proj"])) == ["model.arch.down_proj=mlp.up_proj"]
    assert changed_edit_settings(compose([])) == []
    # a method file's value changed, or a method defined on the command line: named too (a value of a method file
    # that points at edit.*, as encore's ${edit.encore.*}, once, as the edit key)
    assert changed_edit_settings(compose(["method.encore.memit.preserve_edits=false"])) == [
        "method.encore.memit.preserve_edits=false"
    ]
    assert changed_edit_settings(compose(["edit.encore.norm_constraint=20"])) == ["edit.encore.norm_constraint=20"]
    assert changed_edit_settings(compose(["method.rome_l4={class: rome, layer: 4}"])) == [
        "method.rome_l4.class=rome",
        "method.rome_l4.layer=4",
    ]
