"""Selecting K of a behaviour's N candidates (DAT spec §2.2 step 5 and its optional diversity
filter), and the similarity measure the filter and the summary use.

Rules (every tie broken by the draw index, ascending, so the result is fully deterministic):

* `judge` (default): candidates whose judge score passes the threshold (`score >= threshold`,
  the judges' own labelling rule) come first, ordered by score descending, then target loss
  ascending; when fewer than K pass, the rest is filled with the non-passing candidates ordered
  by target loss ascending (the spec's fill rule: "fill with the lowest-L_tgt candidates" — the
  sub-threshold judge score does not order the fill);
* `likelihood`: target loss ascending (the most likely to elicit the target);
* `low_likelihood`: target loss descending (the paper's ablation).

Diversity filter (`diversity_threshold` > 0): walking the rule's order, a candidate whose
similarity to an already kept one exceeds the threshold is skipped; if fewer than K remain, the
skipped ones fill the rest in the same order (K is always kept).

Similarity: the spec's measure is SBERT cosine similarity, which needs a model this project does
not ship offline. Here it is model-free: the cosine of word unigram + bigram count vectors
(lower-cased `\\w+` and single punctuation tokens). 1 = the same bag of n-grams, 0 = nothing in
common. `mean_pairwise_similarity` is its mean over all unordered pairs.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

SELECTIONS = ("judge", "likelihood", "low_likelihood")
SIMILARITY_MEASURE = "cosine of lower-cased word unigram+bigram count vectors (model-free)"
_TOKEN = re.compile(r"\w+|[^\w\s]")


def ngrams(text: str) -> Counter:
    words = _TOKEN.findall(text.lower())
    return Counter(words) + Counter(zip(words, words[1:], strict=False))


def ngram_vectors(texts: Sequence[str]) -> np.ndarray:
    """Unit-norm n-gram count vectors [n, V] (an all-zero row for a text without tokens)."""
    counts = [ngrams(t) for t in texts]
    vocab: dict = {}
    for c in counts:
        for g in c:
            vocab.setdefault(g, len(vocab))
    vec = np.zeros((len(texts), max(1, len(vocab))), np.float64)
    for i, c in enumerate(counts):
        for g, k in c.items():
            vec[i, vocab[g]] = k
    norm = np.linalg.norm(vec, axis=1, keepdims=True)
    return vec / np.where(norm > 0, norm, 1.0)


def similarity_matrix(texts: Sequence[str]) -> np.ndarray:
    v = ngram_vectors(texts)
    return v @ v.T


def mean_pairwise_similarity(texts: Sequence[str]) -> float | None:
    """Mean similarity over all unordered pairs (None for fewer than two texts)."""
    n = len(texts)
    if n < 2:
        return None
    s = similarity_matrix(texts)
    return float((s.sum() - np.trace(s)) / (n * (n - 1)))


def rule_order(
    scores: Sequence[float],
    losses: Sequence[float],
    draws: Sequence[int],
    *,
    rule: str,
    threshold: float,
) -> list[int]:
    """Every candidate index in the order the rule prefers (see module doc)."""
    idx = range(len(draws))
    if rule == "judge":
        passing = [i for i in idx if scores[i] >= threshold]
        rest = [i for i in idx if scores[i] < threshold]
        passing.sort(key=lambda i: (-scores[i], losses[i], draws[i]))
        rest.sort(key=lambda i: (losses[i], draws[i]))
        return passing + rest
    if rule == "likelihood":
        return sorted(idx, key=lambda i: (losses[i], draws[i]))
    if rule == "low_likelihood":
        return sorted(idx, key=lambda i: (-losses[i], draws[i]))
    raise ValueError(f"unknown selection {rule!r}; use one of {'|'.join(SELECTIONS)}")


def select(
    scores: Sequence[float],
    losses: Sequence[float],
    draws: Sequence[int],
    prompts: Sequence[str],
    *,
    rule: str,
    k: int,
    threshold: float = 0.5,
    diversity_threshold: float = 0.0,
) -> list[int]:
    """Indices of the K kept candidates of one behaviour, in selection order."""
    n = len(draws)
    if not len(scores) == len(losses) == len(prompts) == n:
        raise ValueError("select: scores, losses, draws and prompts must have one entry each")
    if not 1 <= k <= n:
        raise ValueError(f"select: cannot keep K={k} of {n} candidates; keep 1 <= K <= N")
    order = rule_order(scores, losses, draws, rule=rule, threshold=threshold)
    if diversity_threshold <= 0.0:
        return order[:k]
    vec = ngram_vectors(prompts)
    kept: list[int] = []
    skipped: list[int] = []
    for i in order:
        if len(kept) == k:
            break
        if kept and float(np.max(vec[kept] @ vec[i])) > diversity_threshold:
            skipped.append(i)
        else:
            kept.append(i)
    return kept + skipped[: k - len(kept)]
