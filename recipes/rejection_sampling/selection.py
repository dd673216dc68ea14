"""What rejection sampling keeps, and the statistics that show why: pure functions over scored sample records.

A sample record is a dict with at least `prompt_id`, `round`, `sample_id`, `completion`, `reward` and `hit_limit`
(generation ran into `max_new_tokens`). Selection is deterministic: among equal rewards the sample of the latest
round wins (the freshest policy's phrasing), then the lowest `sample_id`.

    select_best(pool, keep_per_prompt=1, reward_threshold=None, dedupe=True, keep_truncated=False)  # SFT set
    select_pairs(pool, reward_threshold=None, dedupe=True, keep_truncated=False)                    # DPO pairs
    expected_best_of_n(proxy, n, gold=None)   # E[reward of the proxy-best of n drawn from these samples]
    best_of_n_curve(rewards_by_prompt, ns)    # the best-of-N curve, averaged over prompts
    kl_best_of_n(n) = log n - (n - 1) / n     # Gao et al. 2022, the KL of best-of-n to the sampling policy
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from recipes.common.errors import UserError

SELECTIONS = ("best_of_round", "best_of_all_rounds")


class ScorerError(UserError):
    """A scorer returned something unusable (wrong count, NaN, not a number); the message says which sample."""


def check_scores(scores: Any, expected: int, where: str, scorer: str) -> list[float]:
    """The scores as floats, or a ScorerError naming the first bad one: one finite number per sample, nothing else."""
    try:
        values = list(scores)
    except TypeError as err:
        raise ScorerError(
            f"{where}: scorer {scorer!r} returned {type(scores).__name__}, not a list of floats."
        ) from err
    if len(values) != expected:
        raise ScorerError(
            f"{where}: scorer {scorer!r} returned {len(values)} scores for {expected} samples; a scorer must return "
            "exactly one score per (prompt, completion) it is given, in order."
        )
    checked = []
    for index, value in enumerate(values):
        try:
            number = float(value)
        except (TypeError, ValueError) as err:
            raise ScorerError(
                f"{where}: scorer {scorer!r} returned {value!r} for sample {index}: not a number."
            ) from err
        if not math.isfinite(number):
            raise ScorerError(
                f"{where}: scorer {scorer!r} returned {number} for sample {index}. Scores must be finite: check the "
                "reward model (a NaN usually means fp16 overflow or an empty response) before selecting on them."
            )
        checked.append(number)
    return checked


def by_prompt(samples: Iterable[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for sample in samples:
        groups[sample["prompt_id"]].append(sample)
    return dict(sorted(groups.items()))


def _rank_key(sample: dict[str, Any]) -> tuple[float, int, int]:
    return (-sample["reward"], -sample["round"], sample["sample_id"])


def _candidates(group: Sequence[dict[str, Any]], dedupe: bool, keep_truncated: bool) -> list[dict[str, Any]]:
    """A prompt's samples best first, without truncated ones (unless kept) and, with `dedupe`, one per text."""
    ranked = sorted((s for s in group if keep_truncated or not s["hit_limit"]), key=_rank_key)
    if not dedupe:
        return ranked
    seen: set[str] = set()
    unique = []
    for sample in ranked:  # best first, so a duplicate keeps its best-ranked copy
        if sample["completion"] not in seen:
            seen.add(sample["completion"])
            unique.append(sample)
    return unique


def select_best(
    pool: Iterable[dict[str, Any]],
    keep_per_prompt: int = 1,
    reward_threshold: float | None = None,
    dedupe: bool = True,
    keep_truncated: bool = False,
) -> list[dict[str, Any]]:
    """The SFT set: per prompt, the `keep_per_prompt` highest-reward samples whose reward is >= `reward_threshold`.

    `pool` is this round's samples (best of round) or every round's so far (best of all rounds, Llama 2's guard
    against a regressing round). Without `dedupe`, identical texts can be kept twice (which up-weights them).
    """
    if keep_per_prompt < 1:
        raise ValueError(f"keep_per_prompt must be >= 1, got {keep_per_prompt}.")
    selected = []
    for group in by_prompt(pool).values():
        ranked = _candidates(group, dedupe, keep_truncated)
        if reward_threshold is not None:
            ranked = [s for s in ranked if s["reward"] >= reward_threshold]
        selected.extend(ranked[:keep_per_prompt])
    return selected


def select_pairs(
    pool: Iterable[dict[str, Any]],
    reward_threshold: float | None = None,
    dedupe: bool = True,
    keep_truncated: bool = False,
) -> list[dict[str, Any]]:
    """DPO pairs: per prompt, the best sample (chosen) against the worst (rejected), when the best beats the worst
    strictly and clears `reward_threshold`. Prompts whose samples all score alike give no pair (no preference)."""
    pairs = []
    for prompt_id, group in by_prompt(pool).items():
        ranked = _candidates(group, dedupe, keep_truncated)
        if len(ranked) < 2:
            continue
        chosen = ranked[0]
        rejected = min(ranked[1:], key=lambda s: (s["reward"], -s["round"], s["sample_id"]))
        if rejected["reward"] >= chosen["reward"] or rejected["completion"] == chosen["completion"]:
            continue
        if reward_threshold is not None and chosen["reward"] < reward_threshold:
            continue
        pairs.append({"prompt_id": prompt_id, "chosen": chosen, "rejected": rejected})
    return pairs


def summarize(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "max": max(values),
        "min": min(values),
        "std": statistics.pstdev(values),
        "n": len(values),
    }


def sample_stats(samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """All samples of a round: reward summary, the per-prompt max and median averaged over prompts (Llama 2,
    Figure 7: the gap between them is what rejection sampling harvests), truncation and duplicate rates."""
    groups = by_prompt(samples)
    stats = {f"reward_{k}": v for k, v in summarize([s["reward"] for s in samples]).items()}
    if groups:
        stats["prompt_max_mean"] = statistics.fmean(max(s["reward"] for s in g) for g in groups.values())
        stats["prompt_median_mean"] = statistics.fmean(
            statistics.median(s["reward"] for s in g) for g in groups.values()
        )
        unique = sum(len({s["completion"] for s in g}) for g in groups.values())
        stats["duplicate_rate"] = 1.0 - unique / len(samples)
        stats["frac_hit_limit"] = sum(bool(s["hit_limit"]) for s in samples) / len(samples)
        stats["num_prompts"] = len(groups)
    return stats


def selection_stats(selected: Sequence[dict[str, Any]], num_prompts: int, current_round: int) -> dict[str, float]:
    """The kept set: reward summary, the acceptance rate (prompts with at least one kept sample) and how many kept
    samples come from earlier rounds (best of all rounds)."""
    stats = {f"reward_{k}": v for k, v in summarize([s["reward"] for s in selected]).items()}
    accepted = len({s["prompt_id"] for s in selected})
    stats["acceptance_rate"] = accepted / num_prompts if num_prompts else 0.0
    stats["num_prompts_accepted"] = accepted
    stats["num_selected"] = len(selected)
    stats["frac_from_earlier_rounds"] = (
        sum(s["round"] < current_round for s in selected) / len(selected) if selected else 0.0
    )
    return stats


def _tie_averaged(proxy: Sequence[float], gold: Sequence[float]) -> tuple[list[float], list[float]]:
    """Sort by proxy ascending; each gold value replaced by the mean over its proxy tie group (ties broken at random
    in expectation)."""
    order = sorted(range(len(proxy)), key=lambda i: proxy[i])
    sorted_proxy = [proxy[i] for i in order]
    sorted_gold = [gold[i] for i in order]
    averaged = list(sorted_gold)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and sorted_proxy[end + 1] == sorted_proxy[start]:
            end += 1
        mean = statistics.fmean(sorted_gold[start : end + 1])
        averaged[start : end + 1] = [mean] * (end + 1 - start)
        start = end + 1
    return sorted_proxy, averaged


def expected_best_of_n(proxy: Sequence[float], n: int, gold: Sequence[float] | None = None) -> float:
    """Expected reward of the proxy-best of `n` samples drawn without replacement from these samples (unbiased for
    the best of n fresh samples; Nakano et al. 2021). With `gold`, the gold reward of that proxy-best sample.

    The i-th smallest of N (1-based) is the best of a random n-subset with probability C(i-1, n-1) / C(N, n).
    """
    total = len(proxy)
    if not 1 <= n <= total:
        raise ValueError(f"best-of-{n} needs 1 <= n <= the {total} samples given.")
    gold = proxy if gold is None else gold
    if len(gold) != total:
        raise ValueError(f"{len(gold)} gold rewards for {total} proxy rewards.")
    _, values = _tie_averaged(proxy, gold)
    denominator = math.comb(total, n)
    return sum(math.comb(i, n - 1) * values[i] for i in range(n - 1, total)) / denominator


def best_of_n_curve(
    rewards_by_prompt: Sequence[Sequence[float]],
    ns: Sequence[int] | None = None,
    gold_by_prompt: Sequence[Sequence[float]] | None = None,
) -> dict[int, float]:
    """Expected best-of-n reward for each n (default 1..N), averaged over prompts; prompts with fewer than n samples
    are left out of that n's average."""
    if not rewards_by_prompt:
        return {}
    largest = max(len(r) for r in rewards_by_prompt)
    ns = list(ns) if ns is not None else list(range(1, largest + 1))
    curve = {}
    for n in ns:
        values = [
            expected_best_of_n(proxy, n, None if gold_by_prompt is None else gold_by_prompt[i])
            for i, proxy in enumerate(rewards_by_prompt)
            if len(proxy) >= n
        ]
        if values:
            curve[n] = statistics.fmean(values)
    return curve


def kl_best_of_n(n: int) -> float:
    """KL(best-of-n || policy) = log n - (n - 1) / n (Gao et al. 2022; an upper bound per Beirami et al. 2024)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    return math.log(n) - (n - 1) / n
