"""The eval stage: schema detection and skipped cases, restoring the clean model, the CLI's outputs,
resuming (after a crash and after SIGTERM), the chart's intervals, and 2 DDP processes giving the summary of one."""

import json
import signal
import types

import pytest
import torch
from conftest import DATA, run_cli, run_main, signal_run, tiny_args

from rome.pipeline.core.loading import configure, load_model
from rome.pipeline.errors import UserError
from rome.pipeline.evaluation.cases import load_cases

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
NESTED = {
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Danielle Darrieux, a native", "Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
    "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is", "Where Danielle Darrieux is from, people speak"],
}
FLAT = {
    "case_id": 7,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Danielle Darrieux spoke",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}


def nested_case(case_id, subject, prompt, new, new_id, true):
    rec = json.loads(json.dumps(NESTED))
    rec["case_id"] = case_id
    rw = rec["requested_rewrite"]
    rw.update(
        subject=subject, prompt=prompt, target_new={"str": new, "id": new_id}, target_true={"str": true, "id": "Q0"}
    )
    rec["paraphrase_prompts"] = [f"{subject} is known for", f"Everyone says {subject}"]
    rec["generation_prompts"] = [f"{subject} is", f"People say that {subject}"]
    return rec


def test_schemas_detected_and_bad_records_skipped_with_reasons(tmp_path):
    bad = [
        {"foo": 1},  # unknown schema
        {**FLAT, "target_new": ""},  # missing field
        {**FLAT, "subject": "Edith Piaf"},  # subject not in its prompt
        {**FLAT, "target_new": "french"},  # not a change
        ["not", "a", "record"],
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([FLAT, *bad, NESTED, FLAT]))
    cases, skipped = load_cases(path)
    assert [c.index for c in cases] == [0, 7] and all(c.schema == "counterfact-flat" for c in cases)
    reasons = {s.index: s.reason for s in skipped}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6]  # every bad record is reported, none dropped
    assert "unknown schema" in reasons[1] and "target_new" in reasons[2] and "not in the prompt" in reasons[3]
    assert "must change the fact" in reasons[4] and "JSON object" in reasons[5]
    assert "differs from the file's counterfact-flat" in reasons[6]
    c = cases[0]
    assert c.request.neighbours == ("Michel Rocard is a native speaker of",) and c.neighbour_targets == ("French",)
    assert c.generation_prompts == (FLAT["prompt"], FLAT["rephrase_prompt"])  # the flat schema's stand-ins

    no_true = {**NESTED, "requested_rewrite": {**NESTED["requested_rewrite"], "target_true": None}}
    (nested,), (skip,) = load_cases(_write(tmp_path / "n.json", [NESTED, no_true]))
    assert skip.index == 1 and "target_true" in skip.reason
    assert nested.schema == "counterfact-nested" and nested.relation_id == "P103" and nested.target_new_id == "Q1860"
    assert len(nested.request.paraphrases) == 2 and nested.neighbour_targets == ("French", "French")
    assert nested.generation_prompts == tuple(NESTED["generation_prompts"])
    with pytest.raises(UserError, match="does not exist"):
        load_cases(tmp_path / "missing.json")


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_shared_counterfact_and_zsre_files():
    cases, skipped = load_cases(DATA / "counterfact" / "counterfact-edit.json", n=5)
    assert len(cases) == 5 and not skipped and cases[0].request.text == "The mother tongue of Danielle Darrieux is"
    zsre = DATA / "zsre" / "zsre_mend_train-1k.json"
    cases, skipped = load_cases(zsre, n=200)  # ROME's convention: the edit writes the true answer
    assert cases[0].schema == "zsre" and len(cases) == 200 and not skipped
    c = cases[0]
    assert c.request.target_new == "uniform" and c.request.target_true is None
    assert c.request.neighbours == ("nq question: john goodman's character in the big lebowski?",)
    assert c.neighbour_targets == ("Walter Sobchak",)
    cases, skipped = load_cases(zsre, n=200, zsre_target="alt")  # MEND's / EasyEdit's: towards alt
    assert len(cases) + len(skipped) == 200
    assert cases[0].request.target_new == "unmanned aircraft" and cases[0].request.target_true == "uniform"
    assert skipped and all("must change the fact" in s.reason for s in skipped)  # alt == answer


def test_methods_restore_the_clean_model_and_bad_cases_are_skipped(tiny_model_dir, tmp_path):
    from rome.modules.evaluator import CaseEvaluator, EvalContext
    from rome.pipeline.editors.factory import build_editor
    from rome.pipeline.editors.none import NoEditor
    from rome.pipeline.evaluation.case_log import CaseLog
    from rome.pipeline.evaluation.scoring import Generation

    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    cfg = configure(
        [
            f"model.name={tiny_model_dir('llama')}",
            f"model.cache_dir={tmp_path}",
            "edit.layer=2",
            "eval.methods=[none,rome_identity_cov,ft_l]",
        ]
    )

    class Breaks(NoEditor):  # edits, then finds the case impossible
        edits_weights = True

        def begin(self, requests):
            with torch.no_grad():
                self.spec.down_proj_weight(self.model, 2).add_(1.0)
            raise UserError("cannot edit this one")

    methods = [build_editor(cfg, loaded, m, measure_only=True) for m in cfg.eval.methods]
    methods.append(Breaks("breaks", loaded.model, loaded.tokenizer, loaded.spec, cfg.method.none, [2]))
    ctx = EvalContext(cfg, loaded, 2)
    cases, _ = load_cases(_write(tmp_path / "c.json", [FLAT]))
    ev = CaseEvaluator(
        ctx,
        {0: cases[0]},
        {0: methods},
        [],
        CaseLog(tmp_path),
        Generation(tokens=4, top_k=5, do_sample=True),
        None,
        0,
        "counterfact",
        methods,
    )
    recs = ev.evaluate(cases[0], methods)
    assert [r["status"] for r in recs] == ["ok", "ok", "ok", "skipped"] and recs[-1]["reason"] == "cannot edit this one"
    assert recs[0]["post"] == recs[0]["pre"]  # none
    assert recs[1]["post_probs"] != recs[1]["pre_probs"] and recs[2]["info"]["linf"] <= 5e-4 + 1e-7
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise the clean model again
    with torch.no_grad():
        loaded.spec.down_proj_weight(loaded.model, 2)[0, 0] += 1
    with pytest.raises(RuntimeError, match="not the clean parameter"):
        ev.evaluate(cases[0], methods[:1])


def test_ft_l_as_released_tunes_layer_0_weight_and_bias_and_a_study_method_edits_its_own_layer(
    tiny_model_dir, tmp_path
):
    from rome.modules.evaluator import CaseEvaluator, EvalContext
    from rome.pipeline.editors.factory import build_editor
    from rome.pipeline.evaluation.case_log import CaseLog
    from rome.pipeline.evaluation.scoring import Generation

    loaded = load_model(str(tiny_model_dir("gpt2")), device="cpu")  # GPT-2's c_proj has a bias
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    cfg = configure(
        [
            f"model.name={tiny_model_dir('gpt2')}",
            f"model.cache_dir={tmp_path}",
            "edit.layer=2",
            "eval.methods=[ft_l,rome_l1]",
            "method.rome_l1={class: rome, mom2_adjustment: false, layer: 1}",
            "method.ft_l.norm_constraint=1e-2",
        ]
    )
    methods = [build_editor(cfg, loaded, m, measure_only=True) for m in cfg.eval.methods]
    ctx = EvalContext(cfg, loaded, 2)
    assert [m.layers[0] for m in methods] == [0, 1]
    assert methods[0].touched() == ["transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias"]
    cases, _ = load_cases(_write(tmp_path / "c.json", [FLAT]))
    ev = CaseEvaluator(
        ctx,
        {0: cases[0]},
        {0: methods},
        [],
        CaseLog(tmp_path),
        Generation(tokens=0, top_k=5, do_sample=True),
        None,
        0,
        "counterfact",
        methods,
    )
    seen = {}
    original_edit = [m.edit for m in methods]

    def watch(i, m):
        def edit(requests, on_step=None):
            out = original_edit[i](requests, on_step=on_step)
            seen[m.name] = {k for k, v in loaded.model.state_dict().items() if not torch.equal(v, before[k])}
            return out

        return edit

    for i, m in enumerate(methods):
        m.edit = watch(i, m)
    recs = ev.evaluate(cases[0], methods)
    assert [r["status"] for r in recs] == ["ok", "ok"] and 0 < recs[0]["info"]["linf"] <= 1e-2 + 1e-6
    assert seen["ft_l"] == {"transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias"}
    assert seen["rome_l1"] == {"transformer.h.1.mlp.c_proj.weight"}
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_case_is_scored_as_if_edited_alone(tiny_model_dir, tmp_path):
    """Case mode edits every case from the clean weights: the methods' sequential state (NAS's reference,
    UltraEdit's lifelong statistics, AlphaEdit's preserved keys) must not carry from one case to the next, so a
    case scores the same after another case as alone."""
    from rome.modules.evaluator import CaseEvaluator, EvalContext
    from rome.pipeline.editors.factory import build_editor
    from rome.pipeline.evaluation.case_log import CaseLog
    from rome.pipeline.evaluation.scoring import Generation

    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    cfg = configure(
        [
            f"model.name={tiny_model_dir('llama')}",
            f"model.cache_dir={tmp_path}",
            "edit.layer=2",
            "edit.v.steps=4",
            "edit.v.norm_anchor=true",
            "edit.nas.skip_factor=1e9",
            "edit.ultraedit.layers=[2,3]",
            "edit.ultraedit.lr=0.01",
            "eval.methods=[rome_identity_cov,ultraedit]",
        ]
    )
    records = [
        nested_case(0, "Danielle Darrieux", "The mother tongue of {} is", "English", "Q1860", "French"),
        nested_case(1, "Michael Jordan", "{} plays the sport of", "tennis", "Q847", "basketball"),
    ]
    cases, _ = load_cases(_write(tmp_path / "c.json", records))

    def scores(order):
        methods = [build_editor(cfg, loaded, m, measure_only=True) for m in cfg.eval.methods]
        ev = CaseEvaluator(
            EvalContext(cfg, loaded, 2),
            dict(enumerate(cases)),
            {i: methods for i in range(len(cases))},
            [],
            CaseLog(tmp_path / "log"),
            Generation(tokens=0, top_k=5, do_sample=False),
            None,
            0,
            "counterfact",
            methods,
        )
        out = {}
        for i in order:
            for rec in ev.evaluate(cases[i], methods):
                assert rec["status"] == "ok", rec
                out[(i, rec["method"])] = rec["post_probs"]
        return out

    after_another, alone = scores([0, 1]), scores([1])
    for method in cfg.eval.methods:
        assert after_another[(1, method)] == alone[(1, method)], method


def eval_cli(model_dir, tmp, *extra, env=None):
    """The eval stage on a tiny model: in this process, or with ``env`` (thread counts) in a process of its own."""
    args = ("stage=eval", *tiny_args(model_dir, tmp / "wiki.jsonl", tmp), "eval.generation.tokens=6")
    args += ("edit.v.steps=5", "method.ft_l.steps=5", *extra)
    return run_cli(*args, env=env) if env else run_main(*args)


def _dataset_with_snippets(tmp_path):
    recs = [
        nested_case(10, "Danielle Darrieux", "The mother tongue of {} is", "English", "Q1860", "French"),
        nested_case(11, "Edwin of Northumbria", "The official religion of {} is", "Islam", "Q432", "Christianity"),
        nested_case(12, "Toko Yasuda", "{} plays the", "piano", "Q5994", "guitar"),
        {"foo": "bar"},
        nested_case(14, "Autonomous University of Madrid", "{}, located in", "Sweden", "Q34", "Spain"),
    ]
    snippets = [
        {
            "relation_id": "P103",
            "target_id": "Q1860",
            "samples": [{"name": "X", "text": "He spoke English in London."}],
        },
        {"relation_id": "P103", "target_id": "Q432", "samples": [{"name": "Y", "text": "Islam is a religion."}]},
    ]
    return _write(tmp_path / "cf.json", recs), _write(tmp_path / "snips.json", snippets)


def test_cli_outputs_resume_and_bad_config(tiny_model_dir, small_wiki, tmp_path):
    (tmp_path / "wiki.jsonl").symlink_to(small_wiki)
    data, snips = _dataset_with_snippets(tmp_path)
    out = tmp_path / "out"
    args = (
        f"eval.dataset={data}",
        f"eval.snippets={snips}",
        "eval.n=null",
        f"eval.out={out}",
        "eval.methods=[none,rome,ft_l]",
    )
    r = eval_cli(tiny_model_dir("gpt2"), tmp_path, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "counterfact" and summary["schema"] == "counterfact-nested"
    assert summary["cases"] == {"usable": 4, "skipped_at_load": 1}
    assert any(n.startswith("edit settings other than configs/ sets for this model: ") for n in summary["notes"])
    assert any("edit.layer=2" in n.split(": ", 1)[1].split("; ") for n in summary["notes"] if n.startswith("edit s"))
    assert summary["skipped"][0]["index"] == 3 and "unknown schema" in summary["skipped"][0]["reason"]
    rows = summary["methods"]
    assert summary["order"] == ["none", "rome", "ft_l"] and all(rows[m]["n"] == 4 for m in summary["order"])
    assert {"es", "em", "ps", "pm", "ns", "nm", "ge", "rs"} <= set(rows["rome"]["metrics"])
    assert rows["rome"]["metrics"]["rs"]["n"] == 2  # only two cases have snippets for their (relation, target)
    lines = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert [(line["index"], line["method"]) for line in lines] == [
        (i, m) for i in (0, 1, 2, 4) for m in ("none", "rome", "ft_l")
    ]
    assert all(line["timings"]["edit"] > 0 for line in lines if line["method"] != "none")
    table = (out / "table.md").read_text()
    assert "| Method | n | S | ES | EM | PS | PM | NS | NM | GE | RS |" in table and "Protocol: paper" in table
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"

    # after a crash: the last case lost and its successor's line cut mid-write; the rerun skips the
    # finished cases, redoes case 4 only, and writes the same summary
    first = (out / "summary.json").read_text()
    log = out / "cases.rank0.jsonl"
    kept = log.read_text().splitlines(keepends=True)
    log.write_text("".join(kept[:-3]) + kept[-3][:40])
    r = eval_cli(tiny_model_dir("gpt2"), tmp_path, *args)
    assert r.returncode == 0 and "1 to run, 3 already done" in r.stdout, r.stderr[-2000:]
    assert (out / "summary.json").read_text() == first
    assert len(log.read_text().splitlines()) == 12

    r = eval_cli(tiny_model_dir("gpt2"), tmp_path, *args, "eval.methods=[none,nosuch]")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "unknown method 'nosuch'" in errors[0], r.stderr[-2000:]
    # a batch method in the one-case-at-a-time protocol names the protocol that runs it
    r = eval_cli(tiny_model_dir("gpt2"), tmp_path, *args, "eval.methods=[none,memit]")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "eval.mode=sequential" in errors[0], r.stderr[-2000:]


def test_results_of_another_run_are_refused(tmp_path):
    from rome.recipes.eval import _check_run

    cfg = configure([])
    methods = {"none": dict(cfg.method.none), "ft_l": dict(cfg.method.ft_l)}
    identity = {"model": {"name": "m", "revision": "r"}, "generation": {"tokens": 50}}
    run = _check_run(tmp_path, identity, methods)
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert (
        _check_run(tmp_path, identity, {"none": methods["none"]}) == run
    )  # fewer methods: fine, the record keeps them all
    with pytest.raises(UserError, match="another run .different generation"):
        _check_run(tmp_path, {**identity, "generation": {"tokens": 3}}, methods)
    other = configure(["method.ft_l.lr=0.1"])
    with pytest.raises(UserError, match="'ft_l' results made with another configuration"):
        _check_run(tmp_path, identity, {"ft_l": dict(other.method.ft_l)})


def test_cli_zsre_token_accuracy(tiny_model_dir, small_wiki, tmp_path):
    (tmp_path / "wiki.jsonl").symlink_to(small_wiki)
    out = tmp_path / "z"
    r = eval_cli(
        tiny_model_dir("llama"),
        tmp_path,
        f"eval.dataset={DATA / 'zsre' / 'zsre_mend_train-1k.json'}",
        "eval.n=3",
        f"eval.out={out}",
        "eval.methods=[none,rome_identity_cov]",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "zsre"
    for m in summary["methods"].values():
        assert set(m["metrics"]) == {"efficacy", "paraphrase", "specificity"} and m["n"] == 3
        assert all(0 <= s["mean"] <= 100 for s in m["metrics"].values())
    table = (out / "table.md").read_text()
    assert "| Method | n | Efficacy | Paraphrase | Specificity |" in table
    rome_convention = "zsRE (edits write the true answer answers[0] (ROME's dsets/zsre.py)): 3 cases"
    assert summary["title"].startswith(rome_convention) and table.startswith(f"**{rome_convention}")
    assert summary["run"]["identity"]["zsre_target"] == "answer"


def test_the_zsre_title_names_either_convention():
    import types

    from rome.recipes.eval import _title

    cases, _ = load_cases(DATA / "zsre" / "zsre_mend_train-1k.json", n=2)
    ctx = types.SimpleNamespace(loaded=types.SimpleNamespace(identity={"name": "m"}), layer=3)
    titles = {t: _title(configure([f"eval.zsre_target={t}"]), cases, 0, ctx) for t in ("answer", "alt")}
    assert titles["answer"].startswith("zsRE (edits write the true answer answers[0] (ROME's dsets/zsre.py)): 2 cases")
    assert titles["alt"].startswith("zsRE (edits write alt (MEND's and EasyEdit's convention)): 2 cases")


@pytest.mark.slow
def test_two_ddp_processes_give_the_summary_of_one(tiny_model_dir, small_wiki, tmp_path):
    (tmp_path / "wiki.jsonl").symlink_to(small_wiki)
    common = ("eval.n=5", "eval.methods=[none,rome,rome_identity_cov,ft_l]")
    # CPU processes with one thread each: a float32 reduction's order (and so its rounding) depends on the
    # thread count, which Lightning sets to cores // processes in DDP unless OMP_NUM_THREADS is given
    threads = {**OFFLINE, "OMP_NUM_THREADS": "1"}
    one = eval_cli(tiny_model_dir("gpt2"), tmp_path, *common, f"eval.out={tmp_path / 'one'}", env=threads)
    assert one.returncode == 0, one.stderr[-3000:]
    two = eval_cli(
        tiny_model_dir("gpt2"),
        tmp_path,
        *common,
        f"eval.out={tmp_path / 'two'}",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        env=threads,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    # both ranks evaluated cases: 3 on rank 0, 2 on rank 1, none twice
    per_rank = [
        {json.loads(line)["index"] for line in (tmp_path / "two" / f"cases.rank{r}.jsonl").read_text().splitlines()}
        for r in (0, 1)
    ]
    assert per_rank == [{0, 2, 4}, {1, 3}]
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two")]
    # the same numbers; only the record of what made them differs: the process count (the threads: 1 each)
    environments = [s.pop("environment") for s in summaries]
    assert summaries[0] == summaries[1]
    assert [(e["processes"], e["threads"]) for e in environments] == [(1, 1), (2, 1)]
    assert environments[0]["torch"] == torch.__version__ and environments[0]["cpu"]


def test_sigterm_stops_after_the_case_in_progress_and_the_same_command_resumes(tiny_model_dir, small_wiki, tmp_path):
    (tmp_path / "wiki.jsonl").symlink_to(small_wiki)
    data, _ = _dataset_with_snippets(tmp_path)
    out = tmp_path / "out"
    args = (
        f"eval.dataset={data}",
        "eval.n=null",
        f"eval.out={out}",
        "eval.methods=[none,rome_identity_cov]",
        "edit.v.steps=10",
        "edit.v.early_stop_loss=0",
    )
    log = out / "cases.rank0.jsonl"

    def first_case_recorded(_lines):
        return log.exists() and len(log.read_text().splitlines()) >= 2

    common = (
        "stage=eval",
        f"model.name={tiny_model_dir('gpt2')}",
        f"model.cache_dir={tmp_path / 'cache'}",
        f"stats.dir={tmp_path / 'stats'}",
        f"data.files={tmp_path / 'wiki.jsonl'}",
        "stats.tokens=2000",
        "data.max_length=64",
        "data.batch_tokens=256",
        "edit.layer=2",
        "trainer.accelerator=cpu",
        "model.device=cpu",
        "eval.generation.tokens=6",
        *args,
    )
    code, lines = signal_run(common, signal.SIGTERM, first_case_recorded, env=OFFLINE)
    assert code == 143, "\n".join(lines[-30:])
    (hint,) = [line for line in lines if line.startswith("interrupted:")]
    recorded = [json.loads(line) for line in log.read_text().splitlines()]
    pairs = [(r["index"], r["method"]) for r in recorded]
    assert (
        len(pairs) in (2, 4)
        and pairs == [(i, m) for i in (0, 1, 2, 4) for m in ("none", "rome_identity_cov")][: len(pairs)]
    )
    assert f"{len(pairs)} of 8 (case, method) results are recorded in {out}/cases.rank*.jsonl" in hint
    assert hint.endswith("to resume, run the same command") and not (out / "summary.json").exists()

    resumed = eval_cli(tiny_model_dir("gpt2"), tmp_path, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{4 - len(pairs) // 2} to run, {len(pairs) // 2} already done" in resumed.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert all(summary["methods"][m]["n"] == 4 for m in ("none", "rome_identity_cov"))
    assert len(log.read_text().splitlines()) == 8  # no case evaluated twice


def test_an_empty_paraphrase_skips_the_case_with_its_reason(tmp_path):
    cases, skipped = load_cases(_write(tmp_path / "c.json", [FLAT, {**FLAT, "case_id": 8, "rephrase_prompt": ""}]))
    assert [c.case_id for c in cases] == [7] and [s.case_id for s in skipped] == [8]
    assert "'rephrase_prompt' holds an empty or non-text prompt" in skipped[0].reason


def test_chart_clips_rate_intervals_to_0_100_and_shows_n(tmp_path, monkeypatch):
    import matplotlib.axes

    from rome.pipeline.evaluation.report import bar_chart, summarize

    values = {
        "rome": {
            "es": [1.0, 0.0],
            "em": [0.9, -0.95],
            "ps": [1.0, 1.0],
            "pm": [0.2, 0.1],
            "ns": [0.0, 1.0],
            "nm": [0.1, -0.1],
            "ge": [5.5, 4.0],
            "rs": [0.3],
        }
    }
    summary = {
        "kind": "counterfact",
        "title": "t",
        "methods": summarize("counterfact", values, {"rome": 2}),
        "order": ["rome"],
    }
    es = summary["methods"]["rome"]["metrics"]["es"]
    assert es["mean"] == 50.0 and es["ci95"] > 50  # the normal approximation at n = 2 runs past 0 and 100
    drawn = {}
    bar = matplotlib.axes.Axes.bar

    def record(self, x, height, *a, yerr=None, label=None, **k):
        drawn.setdefault(label, []).append((list(height), [list(e) for e in yerr]))
        return bar(self, x, height, *a, yerr=yerr, label=label, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", record)
    bar_chart(summary, tmp_path / "chart.png")
    assert list(drawn) == ["rome (n=2)"] and (tmp_path / "chart.png").stat().st_size > 0
    (rates, rate_err), (margins, margin_err), (ge, ge_err) = drawn["rome (n=2)"][:3]
    for mean, below, above in zip(rates, *rate_err):  # S, ES, PS, NS (and RS): within [0, 100]
        if mean == mean:
            assert 0 <= mean - below and mean + above <= 100
    assert rate_err[0][1] == rate_err[1][1] == 50.0  # ES 50 ± 98 drawn as 0..100
    m = summary["methods"]["rome"]["metrics"]
    assert margin_err[0] == margin_err[1] == [m[k]["ci95"] for k in ("em", "pm", "nm")]  # signed: as computed
    assert ge_err[0] == ge_err[1] == [m["ge"]["ci95"]]


@pytest.mark.slow
def test_zsre_scores_batched_across_cases_are_each_cases_own():
    """The many-edit runs score zsRE cases with their prompts batched across cases; on SmolLM2 every case gets
    what it gets scored alone (token accuracy: the argmax per answer token), and the scores are not all 0."""
    from rome.pipeline.evaluation.scoring import score_case, teacher_forced_scores

    loaded = load_model("smollm2-135m", device="cpu")
    cases, _ = load_cases(DATA / "zsre" / "zsre_mend_train-1k.json", n=12)
    batched = teacher_forced_scores(loaded.model, loaded.tokenizer, cases, batch_size=16)
    no_text = types.SimpleNamespace(tokens=0)
    alone = [score_case(loaded.model, loaded.tokenizer, c, no_text, 0, 4)["metrics"] for c in cases]
    assert batched == alone
    assert {k for s in batched for k in s} == {"efficacy", "paraphrase", "specificity"}
    assert sum(s["efficacy"] for s in batched) > 0 and sum(s["specificity"] for s in batched) > 0
