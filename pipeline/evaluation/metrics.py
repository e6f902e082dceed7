"""The evaluation's metric math, as the paper defines it (no model, no Lightning).

CounterFact, per case (probabilities P(x | prompt) = exp(mean log p of the tokens of " " + x)):
    ES = [P(new) > P(true)] on the rewrite prompt,    EM = P(new) - P(true)
    PS, PM: the same, averaged over the case's paraphrase prompts
    NS = [P(true) > P(new)], NM = P(true) - P(new), averaged over the neighbourhood prompts
    GE = mean over generated texts of (2/3 H2 + 4/3 H3) / 2, H_n the entropy in bits of the word n-grams
    RS = TF-IDF cosine between the generated texts and the reference snippets of (relation, new object)
Over cases: the mean with a 95% confidence interval; S = harmonic mean of ES, PS and NS.
zsRE, per case: teacher-forced top-1 accuracy of the answer's tokens (``token_accuracy``).
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "counterfact_case",
    "ngram_entropy",
    "fluency",
    "harmonic_mean",
    "mean_ci",
    "TfIdf",
    "words",
    "token_accuracy",
]

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def counterfact_case(probs: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, float]:
    """ES/EM, PS/PM, NS/NM of one case from ``{"prompt"|"paraphrases"|"neighbours": {"new": [...], "true": [...]}}``
    (a prompt set that is missing or empty gives no value, not a zero)."""
    out: dict[str, float] = {}
    for name, (success, magnitude), new_wins in (
        ("prompt", ("es", "em"), True),
        ("paraphrases", ("ps", "pm"), True),
        ("neighbours", ("ns", "nm"), False),
    ):
        p = probs.get(name)
        if not p or not p["new"] or not p["true"]:
            continue
        diffs = [(n - t) if new_wins else (t - n) for n, t in zip(p["new"], p["true"])]
        out[success] = _mean([float(d > 0) for d in diffs])
        out[magnitude] = _mean(diffs)
    return out


_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Word-level tokens: runs of word characters and single punctuation marks (close to nltk's
    ``word_tokenize``, which the paper's code uses, without its contraction rules)."""
    return _WORD.findall(text)


def _entropy_bits(counts: Iterable[int]) -> float:
    counts = list(counts)
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts) if total else 0.0


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """The paper's ``compute_n_gram_entropy``: mean over n of weight_n x (entropy in bits of the n-grams)."""
    toks = words(text)
    parts = [
        w * _entropy_bits(collections.Counter(zip(*(toks[i:] for i in range(n)))).values()) for n, w in zip(ns, weights)
    ]
    return _mean(parts)


def fluency(texts: Sequence[str]) -> float:
    """GE of one case: the n-gram entropy averaged over its generated texts."""
    return _mean([ngram_entropy(t) for t in texts])


def harmonic_mean(values: Sequence[float]) -> float:
    """0 when any value is 0 (the paper's Score S of ES, PS, NS)."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (normal approximation, sample std)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = _mean(values)
    if n == 1:
        return m, math.nan
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, Z95 * math.sqrt(var / n)


class TfIdf:
    """A small TF-IDF vectoriser: lower-cased word tokens, raw term counts, smoothed idf
    ln((1 + N) / (1 + df)) + 1 (scikit-learn's default), l2-normalised vectors."""

    def __init__(self, documents: Iterable[str]) -> None:
        df: collections.Counter = collections.Counter()
        n = 0
        for doc in documents:
            df.update(set(self._terms(doc)))
            n += 1
        self.n_docs = n
        self.idf = {t: math.log((1 + n) / (1 + c)) + 1 for t, c in df.items()}
        self.default_idf = math.log(1 + n) + 1  # a term no document holds

    @staticmethod
    def _terms(text: str) -> list[str]:
        return [w.lower() for w in words(text) if w[0].isalnum() or w[0] == "_"]

    def vector(self, text: str) -> dict[str, float]:
        tf = collections.Counter(self._terms(text))
        v = {t: c * self.idf.get(t, self.default_idf) for t, c in tf.items()}
        norm = math.sqrt(sum(x * x for x in v.values()))
        return {t: x / norm for t, x in v.items()} if norm else {}

    def similarity(self, a: str, b: str) -> float:
        va, vb = self.vector(a), self.vector(b)
        return sum(x * vb.get(t, 0.0) for t, x in va.items())


def token_accuracy(predicted: Sequence[int], target: Sequence[int]) -> float:
    """Share of target tokens that are the teacher-forced argmax (zsRE's efficacy/paraphrase/specificity)."""
    return _mean([float(p == t) for p, t in zip(predicted, target)])
