"""Paired comparisons of evaluations, item by item: per-item values from `python -m eval --samples_output` files, a
bootstrap over items and seeds of the difference between two models, and the rule that turns an interval into a
verdict. `scripts/study_ppo_vs_dpo.py` builds its report with these.

Why paired: every model is evaluated on the same items (the same `--data_seed`), so the difference of two models on
one item removes that item's difficulty; an interval over items and seeds then holds the two sources of noise a
comparison has (which questions, which training run), and nothing else.

    values = per_item_values(read_jsonl("ppo-seed0.eval.samples.jsonl"))   # {metric: {item: value}}
    a, b = aligned([ppo_seed0, ppo_seed1], [sft], "eval/gsm8k/exact_match_flexible")  # (seeds, items) arrays
    difference = paired_bootstrap(a, b)        # mean of a - b, 95% interval, seed spreads
    verdict(difference, direction=+1)          # "reproduced" / "not reproduced" / "inconclusive"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from eval.diversity import NGRAM_ORDERS, distinct_n

# The report's metric keys that have a per-item value, from the records of one task.
PER_ITEM_METRICS = {
    "eval/gsm8k/exact_match_flexible": "gsm8k",  # 1/0 per question (greedy)
    "eval/gsm8k/exact_match_strict": "gsm8k",
    "eval/mmlu/accuracy": "mmlu",  # 1/0 per question
    "eval/length/mean_tokens": "sampled",  # mean tokens of the prompt's samples
    "eval/diversity/per_input_distinct_mean": "sampled",  # distinct-n (n = 1..5) of the prompt's samples
    "eval/reward/mean": "sampled",  # mean primary reward of the prompt's samples
}
BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95


def per_item_values(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, float]]:
    """`{metric key: {item: value}}` from the records of `python -m eval --samples_output` (each with `task` and
    `item`). The sampled responses of one prompt become one value per prompt (mean length, distinct-n of the group
    as `per_input_distinct_mean` averages it, mean of the first reward)."""
    values: dict[str, dict[int, float]] = {}
    groups: dict[int, list[Mapping[str, Any]]] = {}
    for record in records:
        if "item" not in record:
            raise ValueError(f"a {record.get('task')} record has no `item`: made by an older `python -m eval`")
        item = int(record["item"])
        if record["task"] == "gsm8k":
            values.setdefault("eval/gsm8k/exact_match_flexible", {})[item] = float(record["correct_flexible"])
            values.setdefault("eval/gsm8k/exact_match_strict", {})[item] = float(record["correct_strict"])
        elif record["task"] == "mmlu":
            values.setdefault("eval/mmlu/accuracy", {})[item] = float(record["correct"])
        elif record["task"] == "sampled":
            groups.setdefault(item, []).append(record)
    reward_key = next((k for r in records if r["task"] == "sampled" for k in r if k.startswith("reward/")), None)
    for item, group in groups.items():
        if all("n_tokens" in r for r in group):
            values.setdefault("eval/length/mean_tokens", {})[item] = float(np.mean([r["n_tokens"] for r in group]))
        if len(group) >= 2:
            texts = [r["completion"] for r in group]
            distinct = sum(distinct_n(texts, n) for n in NGRAM_ORDERS) / len(NGRAM_ORDERS)
            values.setdefault("eval/diversity/per_input_distinct_mean", {})[item] = distinct
        if reward_key is not None and all(reward_key in r for r in group):
            values.setdefault("eval/reward/mean", {})[item] = float(np.mean([r[reward_key] for r in group]))
    return values


def aligned(
    runs_a: Sequence[Mapping[str, Mapping[int, float]]], runs_b: Sequence[Mapping[str, Mapping[int, float]]], key: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """`(a, b)`, arrays (seeds, items) of metric `key` over the same items in the same order; None when a run lacks
    the metric. A ValueError when the runs were evaluated on different items (a pairing would then be wrong)."""
    runs = [*runs_a, *runs_b]
    if not runs or any(key not in run for run in runs):
        return None
    items = sorted(runs[0][key])
    for run in runs[1:]:
        if sorted(run[key]) != items:
            raise ValueError(
                f"{key}: the evaluations cover different items ({len(run[key])} vs {len(items)}, e.g. "
                f"{sorted(set(run[key]) ^ set(items))[:5]}); evaluate every model with the same data and data seed."
            )
    a = np.array([[run[key][i] for i in items] for run in runs_a], dtype=float)
    b = np.array([[run[key][i] for i in items] for run in runs_b], dtype=float)
    return a, b


@dataclass
class Difference:
    """a - b: the mean over seeds and items, its bootstrap interval, and each side's spread over seeds."""

    mean: float
    low: float
    high: float
    mean_a: float
    mean_b: float
    spread_a: float | None  # standard deviation over a's seeds of a's mean (None: one seed)
    spread_b: float | None
    seeds_a: int
    seeds_b: int
    items: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _spread(values: np.ndarray) -> float | None:
    return float(np.std(values.mean(axis=1), ddof=1)) if values.shape[0] > 1 else None


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE, seed: int = 0
) -> Difference:
    """The difference of means a - b, for `a` (seeds_a, items) and `b` (seeds_b, items) on the same items, with a
    percentile bootstrap interval: each replicate draws items with replacement (the same draw for a and b: paired)
    and, independently, the seeds of a and of b with replacement (training runs are a sample too). With one seed
    per side only items are drawn: the interval then holds question noise, not run-to-run noise."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"need (seeds, items) arrays over the same items, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    n_items = a.shape[1]
    items = rng.integers(0, n_items, size=(samples, n_items))
    seeds_a = rng.integers(0, a.shape[0], size=(samples, a.shape[0]))
    seeds_b = rng.integers(0, b.shape[0], size=(samples, b.shape[0]))
    # Mean over the drawn seeds of each seed's mean over the drawn items.
    item_means_a = a[:, items].mean(axis=2).T  # (samples, seeds_a): each seed's mean over the drawn items
    item_means_b = b[:, items].mean(axis=2).T
    drawn_a = np.take_along_axis(item_means_a, seeds_a, axis=1).mean(axis=1)
    drawn_b = np.take_along_axis(item_means_b, seeds_b, axis=1).mean(axis=1)
    replicates = drawn_a - drawn_b
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Difference(
        mean=float(a.mean() - b.mean()),
        low=float(low),
        high=float(high),
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        spread_a=_spread(a),
        spread_b=_spread(b),
        seeds_a=a.shape[0],
        seeds_b=b.shape[0],
        items=n_items,
    )


def mean_interval(values: np.ndarray, **kwargs: Any) -> Difference:
    """The mean of `values` (seeds, items) alone with its bootstrap interval (a difference to 0)."""
    values = np.asarray(values, dtype=float)
    return paired_bootstrap(values, np.zeros((1, values.shape[1])), **kwargs)


def verdict(difference: Difference, direction: int) -> str:
    """ "reproduced" when the interval excludes 0 on the published side (`direction` +1: a > b, -1: a < b), "not
    reproduced" when it excludes 0 on the other side, "inconclusive" when it holds 0."""
    if difference.low > 0:
        return "reproduced" if direction > 0 else "not reproduced"
    if difference.high < 0:
        return "reproduced" if direction < 0 else "not reproduced"
    return "inconclusive"


def equivalence_verdict(difference: Difference, margin: float) -> str:
    """For a published "no change": "reproduced" when the whole interval lies within ±margin, "not reproduced" when
    it lies wholly outside it, "inconclusive" otherwise (an interval too wide to tell)."""
    if -margin <= difference.low and difference.high <= margin:
        return "reproduced"
    if difference.low > margin or difference.high < -margin:
        return "not reproduced"
    return "inconclusive"
