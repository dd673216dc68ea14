"""Response length: tokens and characters (mean, median, p90) and the fraction that hit the generation limit.

RLHF tends to lengthen responses (Singhal et al. 2023) and reward correlates with length, so length is tracked next to
reward. Tokens are counted by re-encoding the response without special tokens, so responses generated here and ones
scored from a predictions file are counted the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase


def _summary(values: Sequence[float], unit: str) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    return {
        f"mean_{unit}": float(array.mean()),
        f"median_{unit}": float(np.median(array)),
        f"p90_{unit}": float(np.percentile(array, 90)),  # linear interpolation, numpy's default
    }


def count_tokens(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def length_metrics(
    completions: Sequence[str],
    tokenizer: PreTrainedTokenizerBase | None = None,
    hit_limit: Sequence[bool] | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """`mean/median/p90_tokens` (with a tokenizer), `mean/median/p90_chars`, `frac_hit_limit` and `n`.

    `hit_limit` flags come from generation (stopped by max_new_tokens rather than EOS or a stop string). Without them,
    a response counts as hitting the limit when it has at least `max_new_tokens` tokens; with neither, the fraction
    is not reported.
    """
    if not completions:
        raise ValueError("length_metrics needs at least one completion.")
    metrics: dict[str, float] = {}
    tokens = count_tokens(tokenizer, completions) if tokenizer is not None else None
    if tokens is not None:
        metrics.update(_summary(tokens, "tokens"))
    metrics.update(_summary([len(c) for c in completions], "chars"))
    if hit_limit is not None:
        if len(hit_limit) != len(completions):
            raise ValueError(f"{len(hit_limit)} hit_limit flags for {len(completions)} completions.")
        metrics["frac_hit_limit"] = sum(bool(h) for h in hit_limit) / len(completions)
    elif max_new_tokens is not None and tokens is not None:
        metrics["frac_hit_limit"] = sum(t >= max_new_tokens for t in tokens) / len(completions)
    metrics["n"] = len(completions)
    return metrics
