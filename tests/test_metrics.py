"""The evaluation's metric math on hand-made numbers."""

import math

import pytest

from rome.pipeline.evaluation.metrics import (
    TfIdf,
    counterfact_case,
    fluency,
    harmonic_mean,
    mean_ci,
    ngram_entropy,
    token_accuracy,
    words,
)


def test_counterfact_case_success_and_magnitude():
    probs = {
        "prompt": {"new": [0.6], "true": [0.3]},
        "paraphrases": {"new": [0.1, 0.5], "true": [0.2, 0.4]},
        "neighbours": {"new": [0.1, 0.4], "true": [0.3, 0.2]},
    }
    m = counterfact_case(probs)
    assert m["es"] == 1.0 and m["em"] == pytest.approx(0.3)
    assert m["ps"] == 0.5 and m["pm"] == pytest.approx(0.0)
    assert m["ns"] == 0.5 and m["nm"] == pytest.approx((0.2 - 0.2) / 2)
    # a tie is not a success; an empty prompt set gives no value (not a zero)
    m = counterfact_case({"prompt": {"new": [0.2], "true": [0.2]}, "paraphrases": {"new": [], "true": []}})
    assert m == {"es": 0.0, "em": 0.0}


def test_harmonic_mean():
    assert harmonic_mean([1.0, 1.0, 1.0]) == 1.0
    assert harmonic_mean([50.0, 100.0, 100.0]) == pytest.approx(75.0)
    assert harmonic_mean([0.0, 100.0, 100.0]) == 0.0


def test_mean_ci():
    m, ci = mean_ci([1.0, 0.0, 1.0, 0.0])
    assert m == 0.5 and ci == pytest.approx(1.959964 * math.sqrt(1 / 3) / 2, rel=1e-6)
    assert mean_ci([2.0, 2.0, 2.0]) == (2.0, 0.0)
    assert math.isnan(mean_ci([1.0])[1]) and math.isnan(mean_ci([])[0])


def test_ngram_entropy_repeated_vs_varied_text():
    assert words("Paris, France!") == ["Paris", ",", "France", "!"]
    assert ngram_entropy("the the the the the the") == 0.0  # one bigram, one trigram
    varied = "a b c d e f g h i j"  # 9 distinct bigrams, 8 distinct trigrams, each once
    assert ngram_entropy(varied) == pytest.approx((2 / 3 * math.log2(9) + 4 / 3 * 3) / 2)
    assert fluency(["the the the the", varied]) == pytest.approx(ngram_entropy(varied) / 2)


def test_tfidf_cosine():
    tfidf = TfIdf(["a b", "a c", "d"])
    idf_b = math.log(4 / 2) + 1  # N = 3 documents, b in one: ln((1 + 3) / (1 + 1)) + 1
    idf_a = math.log(4 / 3) + 1
    assert tfidf.similarity("a b", "a c") == pytest.approx(idf_a**2 / (idf_a**2 + idf_b**2))
    assert tfidf.similarity("A, b!", "b a") == pytest.approx(1.0)  # case and punctuation do not count
    assert tfidf.similarity("a", "d") == 0.0
    assert tfidf.similarity("", "a") == 0.0


def test_token_accuracy():
    assert token_accuracy([5, 7, 9], [5, 0, 9]) == pytest.approx(2 / 3)
    assert token_accuracy([1], [1]) == 1.0
