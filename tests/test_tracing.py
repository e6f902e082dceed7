"""Causal tracing: the batched method against ROME's one-pass-per-cell method, its invariants, the
Figure-2 averaging, the layer recommendation and the ``stage=trace`` command line."""

import json
import signal

import numpy as np
import pytest
import torch
from conftest import DATA, FAMILIES, run_main, signal_run

from rome.pipeline.core.loading import load_model
from rome.pipeline.core.probability import greedy_tokens
from rome.pipeline.errors import UserError
from rome.pipeline.tracing.aie import BUCKETS, average_effects, bucket_rows, recommend_layer
from rome.pipeline.tracing.engine import KINDS, TraceResult, trace_fact
from rome.pipeline.tracing.facts import load_facts
from rome.pipeline.tracing.noise import fact_noise
from rome.pipeline.tracing.plots import fact_title
from rome.pipeline.tracing.prompt import make_prompt
from rome.pipeline.tracing.recommendation import latest_recommendation, save_recommendation
from rome.pipeline.tracing.reference import trace_fact_per_cell, trace_with_patch

PROMPT, SUBJECT = "In Paris, {} is in", "the Eiffel Tower"  # the subject mid-prompt: tokens before it too
WINDOW, BATCH = 10, 320  # trace.window and trace.batch_size of configs/config.yaml, where tests do not vary them


def bucket_scores(effect, subject):
    """The test's view of one fact's buckets: one [layers] row each, the mean of its tokens (None: no token)."""
    return [rows.mean(axis=0) if len(rows) else None for rows in bucket_rows(effect, subject)]


def _fact(model_dir):
    lm = load_model(str(model_dir), device="cpu")
    text = PROMPT.replace("{}", SUBJECT)
    answer = greedy_tokens(lm.model, torch.tensor([lm.tokenizer(text)["input_ids"]]), 1)[0]
    return lm, make_prompt(lm.tokenizer, PROMPT, SUBJECT, answer)


@pytest.mark.parametrize("family", FAMILIES)  # Gemma 2 / 3: the reused prefix must not be cut to the sliding window
def test_batched_equals_one_cell_at_a_time(tiny_model_dir, family):
    lm, p = _fact(tiny_model_dir(family))
    assert p.subject[0] > 1, "the prompt must have tokens before the subject"
    opts = dict(noise=1.0, samples=3, seed=7, window=2, kinds=KINDS)
    ref = trace_fact_per_cell(lm.model, lm.spec, p, **opts)
    assert max(np.abs(ref.effects[k]).max() for k in KINDS) > 1e-3  # real effects to compare
    # big passes with the KV prefix; small passes that cut tokens and layers apart; no prefix at all
    for batch_size, prefix in [(320, True), (6, True), (9, False)]:
        fast = trace_fact(lm.model, lm.spec, p, batch_size=batch_size, prefix=prefix, **opts)
        assert fast.p_clean == pytest.approx(ref.p_clean, abs=1e-7)
        assert fast.p_corrupted == pytest.approx(ref.p_corrupted, abs=1e-7)
        for k in KINDS:
            assert fast.effects[k].shape == (len(p.tokens), lm.spec.num_layers(lm.model))
            np.testing.assert_allclose(fast.effects[k], ref.effects[k], rtol=0, atol=5e-7, err_msg=k)
            assert (fast.effects[k][: p.subject[0]] == 0).all()  # before the subject: 0 without running


def test_restoring_every_hidden_state_gives_back_the_clean_probability(tiny_model_dir):
    lm, p = _fact(tiny_model_dir("llama"))
    n, T = lm.spec.num_layers(lm.model), len(p.tokens)
    noise = fact_noise(lm.model, lm.spec, p, 1.0, 4, seed=0)
    p_clean, p_corrupted = trace_with_patch(lm.model, lm.spec, p, noise, [])
    assert abs(p_clean - p_corrupted) > 1e-3
    everything = [(t, lm.spec.block_name(layer)) for t in range(T) for layer in range(n)]
    assert trace_with_patch(lm.model, lm.spec, p, noise, everything)[1] == pytest.approx(p_clean, abs=1e-7)
    for layer in range(n):  # one layer's hidden state at every token determines everything after it
        every_token = [(t, lm.spec.block_name(layer)) for t in range(T)]
        assert trace_with_patch(lm.model, lm.spec, p, noise, every_token)[1] == pytest.approx(p_clean, abs=1e-7)
    # batched: the last layer's state at the last token is the whole answer
    res = trace_fact(
        lm.model, lm.spec, p, noise=1.0, samples=4, seed=0, kinds=["hidden"], window=WINDOW, batch_size=BATCH
    )
    assert res.effects["hidden"][T - 1, n - 1] == pytest.approx(res.total_effect, abs=1e-7)
    assert np.abs(res.effects["hidden"][: T - 1, n - 1]).max() < 1e-7  # other tokens' last states: unused


def test_zero_noise_gives_zero_effect_everywhere(tiny_model_dir):
    lm, p = _fact(tiny_model_dir("gpt2"))
    res = trace_fact(lm.model, lm.spec, p, noise=0.0, samples=3, seed=0, window=2, kinds=KINDS, batch_size=BATCH)
    assert res.p_corrupted == pytest.approx(res.p_clean, abs=1e-7)
    for k in KINDS:
        assert np.abs(res.effects[k]).max() < 1e-7


def test_same_seed_same_scores(tiny_model_dir):
    lm, p = _fact(tiny_model_dir("qwen2"))
    run = lambda seed, bs=BATCH: trace_fact(
        lm.model,
        lm.spec,
        p,
        noise=1.0,
        samples=3,
        seed=seed,  # noqa: E731
        kinds=KINDS,
        window=WINDOW,
        batch_size=bs,
    )
    a, b, c, small = run(3), run(3), run(4), run(3, bs=3)
    for k in KINDS:
        assert np.array_equal(a.effects[k], b.effects[k])
        np.testing.assert_allclose(small.effects[k], a.effects[k], rtol=0, atol=5e-8)  # chunking: same noise
    assert a.p_corrupted == b.p_corrupted != c.p_corrupted
    assert not np.allclose(a.effects["hidden"], c.effects["hidden"], atol=1e-6)


def test_scores_file_round_trip(tmp_path, tiny_model_dir):
    lm, p = _fact(tiny_model_dir("gpt2"))
    res = trace_fact(
        lm.model, lm.spec, p, noise=1.0, samples=2, seed=0, window=2, kinds=["mlp", "hidden"], batch_size=BATCH
    )
    res.save(tmp_path / "scores.npz", settings={"a": 1})
    back, meta = TraceResult.load(tmp_path / "scores.npz")
    assert meta["settings"] == {"a": 1} and back.tokens == p.tokens and back.subject == p.subject
    assert back.total_effect == pytest.approx(res.total_effect)
    for k in ("mlp", "hidden"):
        assert np.array_equal(back.effects[k], res.effects[k])


def _result(effect, subject, p_corrupted=0.0):
    return TraceResult(
        ["t"] * effect.shape[0], subject, "a", 0, 1.0, p_corrupted, {"mlp": effect, "hidden": effect}, 1.0, 1, 1
    )


def test_buckets_follow_figure_2():
    e = np.arange(8 * 3, dtype=float).reshape(8, 3)  # 8 tokens, 3 layers; subject = tokens 2..4
    first, mid, last, nxt, further, final = bucket_scores(e, (2, 5))
    assert np.array_equal(first, e[2]) and np.array_equal(mid, e[3]) and np.array_equal(last, e[4])
    assert np.array_equal(nxt, e[5]) and np.array_equal(further, e[6]) and np.array_equal(final, e[7])
    one = bucket_scores(e, (0, 1))  # one-token subject: first = last, no middle
    assert one[1] is None and np.array_equal(one[0], one[2]) and np.array_equal(one[4], e[2:7].mean(0))


def test_average_effects_and_recommended_layer():
    a, b = np.zeros((6, 4)), np.zeros((6, 4))
    a[2, 1], b[2, 1], b[2, 3] = 0.5, 0.3, 0.35  # last subject token (subject 0..2): layer 1 on average
    aie = average_effects([_result(a, (0, 3)), _result(b, (0, 3))], mode="per_fact")
    row = aie["mlp"]["mean"][BUCKETS.index("last subject token")]
    np.testing.assert_allclose(row, [0, 0.4, 0, 0.175])
    assert aie["mlp"]["ci95"][2, 1] == pytest.approx(1.96 * np.std([0.5, 0.3], ddof=1) / np.sqrt(2))
    assert list(aie["mlp"]["count"]) == [2, 2, 2, 2, 2, 2]
    assert recommend_layer(aie) == 1


def test_paper_averages_pool_the_tokens_of_a_bucket_and_subtract_the_mean_corrupted_probability():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(-0.1, 0.5, (6, 3)), rng.uniform(-0.1, 0.5, (7, 3))  # effects, 3 layers
    facts = [_result(a, (0, 3), p_corrupted=0.1), _result(b, (0, 4), p_corrupted=0.3)]  # 1 and 2 middle tokens
    paper, per_fact = average_effects(facts, mode="paper"), average_effects(facts, mode="per_fact")
    mid, last_subj = BUCKETS.index("middle subject tokens"), BUCKETS.index("last subject token")
    # ROME's notebook: mean of the restored probabilities of all three middle tokens - mean P(corrupted)
    scores = np.stack([a[1] + 0.1, b[1] + 0.3, b[2] + 0.3])
    np.testing.assert_allclose(paper["mlp"]["mean"][mid], scores.mean(0) - 0.2)
    np.testing.assert_allclose(per_fact["mlp"]["mean"][mid], (a[1] + (b[1] + b[2]) / 2) / 2)
    assert not np.allclose(paper["mlp"]["mean"][mid], per_fact["mlp"]["mean"][mid])
    assert list(paper["mlp"]["rows"]) == [2, 3, 2, 2, 2, 2] and list(paper["mlp"]["count"]) == [2] * 6
    # one-token buckets: the same averages (so the same recommended layer), the notebook's CI
    np.testing.assert_allclose(paper["mlp"]["mean"][last_subj], (a[2] + b[3]) / 2)
    np.testing.assert_allclose(per_fact["mlp"]["mean"][last_subj], (a[2] + b[3]) / 2)
    np.testing.assert_allclose(
        paper["mlp"]["ci95"][last_subj], 1.96 * np.std([a[2] + 0.1, b[3] + 0.3], axis=0) / np.sqrt(2)
    )
    assert recommend_layer(paper) == recommend_layer(per_fact)
    with pytest.raises(UserError, match="trace.aie=mean"):
        average_effects(facts, mode="mean")


def test_recommendation_lookup(tmp_path):
    ident = {"name": "some/model", "revision": "abc"}
    with pytest.raises(UserError, match="stage=trace"):
        latest_recommendation(tmp_path, ident)
    path = save_recommendation(tmp_path, ident, 7, 120, tmp_path / "summary.json")
    assert latest_recommendation(tmp_path, ident) == (7, path)
    with pytest.raises(UserError):
        latest_recommendation(tmp_path, {"name": "some/model", "revision": "other"})


def test_known_facts_file():
    facts = load_facts(DATA / "known_1000.json", n=3)
    assert [f.subject for f in facts] == ["Vinson Massif", "Beats Music", "Audible.com"]
    assert facts[0].prompt == "{} is located in the continent of"  # the prompt, not the shorter template
    assert facts[0].answer == "Antarctica"
    # a later slice keeps each record's index in the file, so its noise seed matches a run from 0
    later = load_facts(DATA / "known_1000.json", n=2, start=1)
    assert [(f.index, f.subject) for f in later] == [(1, "Beats Music"), (2, "Audible.com")]
    with pytest.raises(UserError, match="trace.start=5000 is outside"):
        load_facts(DATA / "known_1000.json", start=5000)


def test_bad_fact_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_facts(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON: .* line 1, column 2"):
        load_facts(tmp_path / "bad.json")
    (tmp_path / "keys.json").write_text(json.dumps([{"subject": "x"}]))
    with pytest.raises(UserError, match="lacks"):
        load_facts(tmp_path / "keys.json")


# ----------------------------------------------------------------------------------- command line


def _cli(model_dir, tmp_path, *args):
    return run_main(
        "stage=trace",
        f"model.name={model_dir}",
        "model.device=cpu",
        f"model.cache_dir={tmp_path / 'cache'}",
        f"trace.out={tmp_path / 'out'}",
        "trace.samples=2",
        "trace.window=2",
        *args,
    )


def test_cli_one_fact_and_bad_input(tiny_model_dir, tmp_path):
    d = tiny_model_dir("gpt2")
    r = _cli(d, tmp_path, "prompt={} is located in the city of", "subject=The Eiffel Tower", "answer=Paris")
    assert r.returncode == 0, r.stderr
    (fact_dir,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]  # the output marker and report.html aside
    assert sorted(p.name for p in fact_dir.iterdir()) == sorted(
        ["scores.npz"] + [f"{k}.{e}" for k in KINDS for e in ("png", "pdf")]
    )
    assert "clean" in r.stdout and "note: the model predicts" in r.stdout
    res, _ = TraceResult.load(fact_dir / "scores.npz")
    assert res.p_clean < 0.05  # a random model does not know it: flagged in the output and the titles
    assert f"warning: P({res.answer.strip()}) is only {res.p_clean:.4f}" in r.stdout + r.stderr
    assert "cell" in r.stderr  # progress while one fact is traced
    title = fact_title(res, 0.05)
    assert title.startswith(f"The Eiffel Tower is located in the city of -> {res.answer.strip()}\n")
    assert f"P(clean) {res.p_clean:.3f}, P(corrupted) {res.p_corrupted:.3f}" in title and "LOW P(clean) < 0.05" in title
    assert "LOW" not in fact_title(res, res.p_clean / 2)

    r = _cli(d, tmp_path, "prompt={} is in Paris", "subject=The Louvre", "trace.noise=0.1", "prompt=Paris is nice")
    assert r.returncode == 2 and "error: subject 'The Louvre' is not in the prompt" in r.stderr
    r = _cli(d, tmp_path, f"trace.dataset={tmp_path / 'nope.json'}")
    assert r.returncode == 2 and "error: fact file" in r.stderr and "does not exist" in r.stderr

    lm = load_model(str(d), device="cpu")
    for tpl in ("{} and the", "{} and", "{},", "{} (", "{} -"):
        text = tpl.replace("{}", "The Eiffel Tower")
        word = lm.tokenizer.decode(greedy_tokens(lm.model, torch.tensor([lm.tokenizer(text)["input_ids"]]), 1))
        if not any(ch.isalnum() for ch in word):
            r = _cli(d, tmp_path, f"prompt={tpl}", "subject=The Eiffel Tower", "trace.noise=0.1")
            assert r.returncode == 2 and "error: the model does not know this fact" in r.stderr
            break
    else:
        pytest.fail("no prompt found where the tiny model predicts no word")


def test_cli_dataset_summary_and_recommendation(tiny_model_dir, tmp_path):
    d = tiny_model_dir("llama")
    lm = load_model(str(d), device="cpu")
    records = []
    for i, (tpl, subject) in enumerate(
        [
            ("{} is located in the city of", "The Eiffel Tower"),
            ("The capital of {} is", "France"),
            ("{} was born in", "Albert Einstein"),
        ]
        * 3
    ):
        text = tpl.replace("{}", subject)
        answer = lm.tokenizer.decode(greedy_tokens(lm.model, torch.tensor([lm.tokenizer(text)["input_ids"]]), 2))
        records.append(
            {"known_id": i, "subject": subject, "template": tpl, "prompt": text, "attribute": answer.strip()}
        )
    records.append({"known_id": 9, "subject": "Miles Davis", "prompt": "Miles Davis plays the", "attribute": "qqqq"})
    records.append({"known_id": 10, "subject": "Mars", "prompt": "The moon of Jupiter is", "attribute": "Io"})
    (tmp_path / "facts.json").write_text(json.dumps(records))
    out = tmp_path / "out"

    # SIGINT once the run is under way (the noise level is printed just before the facts): it stops before the
    # next fact, says how to resume, and the same command then finishes the job, reusing the facts traced
    args = (
        "stage=trace",
        f"model.name={d}",
        "model.device=cpu",
        f"model.cache_dir={tmp_path / 'cache'}",
        f"trace.out={out}",
        "trace.samples=2",
        "trace.window=2",
        f"trace.dataset={tmp_path / 'facts.json'}",
        "trace.plots=false",
    )
    code, lines = signal_run(args, signal.SIGINT, lambda lines: any(x.startswith("noise: nu =") for x in lines))
    assert code == 130, "\n".join(lines[-20:])
    traced = {p: p.stat().st_mtime_ns for p in (out / "facts").glob("*/scores.npz")} if (out / "facts").exists() else {}
    assert len(traced) < 9 and [x for x in lines if x.startswith("interrupted:")] == [
        f"interrupted: {len(traced)} fact(s) traced so far are kept in {out / 'facts'}; to resume, run the same command"
    ]
    assert not (out / "summary.json").exists()
    r = _cli(d, tmp_path, f"trace.dataset={tmp_path / 'facts.json'}", "trace.plots=false")
    assert r.returncode == 0, r.stderr
    assert "kept 9 of 11 facts" in r.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in traced.items())  # reused, not traced again
    summary = json.loads((out / "summary.json").read_text())
    assert summary["known"] == 9 and summary["records"] == 11
    reasons = {s["subject"]: s["reason"] for s in summary["skipped"]}
    assert "not 'qqqq'" in reasons["Miles Davis"] and "not in the prompt" in reasons["Mars"]
    mlp = np.array(summary["average_indirect_effect"]["mlp"]["mean"], dtype=float)
    assert mlp.shape == (len(BUCKETS), 4) and summary["aie"] == "paper"
    per_bucket = summary["average_indirect_effect"]["mlp"]["facts_per_bucket"]
    assert per_bucket[BUCKETS.index("last token")] == summary["known"]
    assert summary["recommended_layer"] == int(np.argmax(mlp[BUCKETS.index("last subject token")]))
    for stem in ("aie_hidden", "aie_mlp", "aie_attn", "aie_lines"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.pdf").stat().st_size > 0
    layer, path = latest_recommendation(tmp_path / "cache", lm.identity)
    assert layer == summary["recommended_layer"] and path.name == "recommended_layer.json"
    assert json.loads((out / "recommendation.json").read_text())["layer"] == layer
