"""Rejection-sampling selection on fixed scores: best of round, best of all rounds, ties, thresholds, dedupe, DPO
pairs, the best-of-N estimator and the scorer checks."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from recipes.rejection_sampling.selection import (
    ScorerError,
    best_of_n_curve,
    check_scores,
    expected_best_of_n,
    kl_best_of_n,
    sample_stats,
    select_best,
    select_pairs,
    selection_stats,
)


def sample(prompt_id: int, sample_id: int, reward: float, round: int = 1, text: str | None = None, cut=False) -> dict:
    return {
        "prompt_id": prompt_id,
        "sample_id": sample_id,
        "round": round,
        "reward": reward,
        "completion": text if text is not None else f"p{prompt_id}-r{round}-s{sample_id}",
        "hit_limit": cut,
    }


def ids(selected: list[dict]) -> list[tuple[int, int, int]]:
    return [(s["prompt_id"], s["round"], s["sample_id"]) for s in selected]


def test_best_of_round_keeps_the_highest_reward_per_prompt() -> None:
    pool = [sample(0, 0, 0.1), sample(0, 1, 0.9), sample(0, 2, 0.5), sample(1, 0, -1.0), sample(1, 1, -0.5)]
    assert ids(select_best(pool)) == [(0, 1, 1), (1, 1, 1)]
    assert ids(select_best(pool, keep_per_prompt=2)) == [(0, 1, 1), (0, 1, 2), (1, 1, 1), (1, 1, 0)]


def test_ties_go_to_the_latest_round_then_the_lowest_sample_id() -> None:
    pool = [sample(0, 3, 1.0, round=1), sample(0, 2, 1.0, round=2), sample(0, 1, 1.0, round=2), sample(0, 0, 0.0)]
    assert ids(select_best(pool)) == [(0, 2, 1)]
    assert ids(select_best(list(reversed(pool)))) == [(0, 2, 1)]  # input order does not matter


def test_best_of_all_rounds_keeps_an_earlier_round_after_a_regression() -> None:
    round1 = [sample(0, 0, 0.8, round=1), sample(0, 1, 0.2, round=1), sample(1, 0, 0.1, round=1)]
    round2 = [sample(0, 0, 0.4, round=2), sample(0, 1, 0.3, round=2), sample(1, 0, 0.6, round=2)]
    assert ids(select_best(round2)) == [(0, 2, 0), (1, 2, 0)]  # best of this round
    best_all = select_best(round1 + round2)
    assert ids(best_all) == [(0, 1, 0), (1, 2, 0)]  # prompt 0 regressed in round 2: round 1's sample is kept
    stats = selection_stats(best_all, num_prompts=2, current_round=2)
    assert stats["frac_from_earlier_rounds"] == 0.5 and stats["acceptance_rate"] == 1.0


def test_reward_threshold_drops_samples_and_lowers_acceptance() -> None:
    pool = [sample(0, 0, 1.0), sample(0, 1, 0.0), sample(1, 0, 0.0), sample(1, 1, 0.0), sample(2, 0, 0.5)]
    selected = select_best(pool, keep_per_prompt=2, reward_threshold=0.5)
    assert ids(selected) == [(0, 1, 0), (2, 1, 0)]  # >= threshold is kept, prompt 1 has nothing
    stats = selection_stats(selected, num_prompts=3, current_round=1)
    assert stats["acceptance_rate"] == pytest.approx(2 / 3)
    assert stats["reward_min"] == 0.5 and stats["num_selected"] == 2
    assert select_best(pool, reward_threshold=2.0) == []


def test_dedupe_keeps_one_copy_of_identical_texts() -> None:
    pool = [sample(0, 0, 1.0, text="42"), sample(0, 1, 1.0, text="42"), sample(0, 2, 0.5, text="41")]
    assert [s["completion"] for s in select_best(pool, keep_per_prompt=2)] == ["42", "41"]
    assert [s["completion"] for s in select_best(pool, keep_per_prompt=2, dedupe=False)] == ["42", "42"]
    assert sample_stats(pool)["duplicate_rate"] == pytest.approx(1 / 3)


def test_truncated_samples_are_skipped_unless_kept() -> None:
    pool = [sample(0, 0, 0.9, cut=True), sample(0, 1, 0.3)]
    assert ids(select_best(pool)) == [(0, 1, 1)]
    assert ids(select_best(pool, keep_truncated=True)) == [(0, 1, 0)]


def test_keep_per_prompt_must_be_positive() -> None:
    with pytest.raises(ValueError, match="keep_per_prompt"):
        select_best([sample(0, 0, 1.0)], keep_per_prompt=0)


def test_dpo_pairs_best_against_worst_only_with_a_strict_margin() -> None:
    pool = [
        *[sample(0, j, r) for j, r in enumerate([0.2, 0.9, -0.4, 0.9])],  # chosen s1 (tie with s3: lower id)
        *[sample(1, j, 0.5) for j in range(3)],  # all alike: no preference, no pair
        sample(2, 0, 1.0, text="same"),
        sample(2, 1, 0.0, text="same"),  # same text, different scores: dedupe leaves one, no pair
        sample(3, 0, 0.3),
        sample(3, 1, 0.1),
    ]
    pairs = select_pairs(pool)
    assert [(p["prompt_id"], p["chosen"]["sample_id"], p["rejected"]["sample_id"]) for p in pairs] == [
        (0, 1, 2),
        (3, 0, 1),
    ]
    assert [p["prompt_id"] for p in select_pairs(pool, reward_threshold=0.5)] == [0]


def test_sample_stats_gives_the_figure_7_view() -> None:
    pool = [sample(0, j, r) for j, r in enumerate([0.0, 1.0, 2.0])] + [
        sample(1, j, r) for j, r in enumerate([4.0, 6.0])
    ]
    stats = sample_stats(pool)
    assert stats["prompt_max_mean"] == pytest.approx((2.0 + 6.0) / 2)
    assert stats["prompt_median_mean"] == pytest.approx((1.0 + 5.0) / 2)
    assert stats["reward_median"] == 2.0 and stats["reward_max"] == 6.0 and stats["num_prompts"] == 2


def brute_force_best_of_n(proxy: list[float], gold: list[float], n: int) -> float:
    values = []
    for subset in itertools.combinations(range(len(proxy)), n):
        best = max(proxy[i] for i in subset)
        values.append(statistics.fmean(gold[i] for i in subset if proxy[i] == best))
    return statistics.fmean(values)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_expected_best_of_n_matches_enumerating_every_subset(n: int) -> None:
    proxy = [0.3, 1.0, 0.3, -2.0, 1.0, 0.7]  # ties at 0.3 and 1.0
    gold = [1.0, 0.0, 0.5, 2.0, 1.0, -1.0]
    assert expected_best_of_n(proxy, n) == pytest.approx(brute_force_best_of_n(proxy, proxy, n))
    assert expected_best_of_n(proxy, n, gold) == pytest.approx(brute_force_best_of_n(proxy, gold, n))


def test_best_of_n_curve_runs_from_the_mean_to_the_max() -> None:
    rewards = [[0.0, 1.0, 0.0, 0.0], [0.5, 0.25, 0.75, 1.0]]
    curve = best_of_n_curve(rewards)
    assert list(curve) == [1, 2, 3, 4]
    assert curve[1] == pytest.approx((0.25 + 0.625) / 2)
    assert curve[4] == pytest.approx(1.0)
    assert all(curve[n] <= curve[n + 1] for n in (1, 2, 3))
    with pytest.raises(ValueError, match="1 <= n"):
        expected_best_of_n([1.0, 2.0], 3)


def test_kl_of_best_of_n() -> None:
    assert kl_best_of_n(1) == 0.0
    assert kl_best_of_n(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_best_of_n(64) == pytest.approx(math.log(64) - 63 / 64)


@pytest.mark.parametrize(
    ("scores", "match"),
    [
        ([1.0, float("nan"), 0.0], "returned nan for sample 1"),
        ([1.0, 0.0], "returned 2 scores for 3 samples"),
        ([1.0, "high", 0.0], "'high' for sample 1: not a number"),
        (None, "not a list of floats"),
        ([1.0, float("inf"), 0.0], "returned inf"),
    ],
)
def test_bad_scores_are_clear_errors(scores, match: str) -> None:
    with pytest.raises(ScorerError, match=match):
        check_scores(scores, 3, "round_1/samples.jsonl", "reward_model")


def test_good_scores_come_back_as_floats() -> None:
    assert check_scores([1, True, 0.5], 3, "x", "gsm8k") == [1.0, 1.0, 0.5]
