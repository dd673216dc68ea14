"""Preference pairs for the reward recipe: validation, Llama 2's rating -> margin mapping, and tokenization.

    margin = rating_to_margin("better", "large")          # 2.0
    dataset = prepare_pairs(dataset, "small", "rating", where="...")   # checked, with a `margin` column
    tokenized = tokenize_pairs(dataset, tokenizer, max_length)         # + chosen_ids / rejected_ids

TRL 1.16's RewardTrainer reads an optional `margin` column: loss = -log sigmoid(r_chosen - r_rejected - margin).
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from recipes.common.data import DataError
from recipes.common.reward import RATINGS, normalize_rating, reward_tokenize

# Llama 2, Table 27: margin per rating (significantly better, better, slightly better, negligibly better / unsure).
MARGIN_SETS: dict[str, dict[str, float] | None] = {
    "none": None,
    "small": dict(zip(RATINGS, (1.0, 2 / 3, 1 / 3, 0.0))),
    "large": dict(zip(RATINGS, (3.0, 2.0, 1.0, 0.0))),
}
PAIR_FORMATS = [["chosen", "rejected"]]  # with or without `prompt`; conversational or plain text


def rating_to_margin(rating: Any, margin_set: str) -> float:
    """The margin m(r) of a rating under a named margin set ("none" gives 0)."""
    if margin_set not in MARGIN_SETS:
        raise ValueError(f"margin_set {margin_set!r} is not one of {list(MARGIN_SETS)}")
    margins = MARGIN_SETS[margin_set]
    return 0.0 if margins is None else margins[normalize_rating(rating)]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    return a == b


def prepare_pairs(dataset: Dataset, margin_set: str, rating_column: str | None, where: str) -> Dataset:
    """Check the pairs and add the `margin` column the margin set asks for; clear errors before any training.

    Errors: a pair whose chosen and rejected are identical (nothing to learn, and it would count as a tie), a rating
    outside the scale, a missing rating (column or value) when a margin set is asked for. Ratings are checked
    whenever the column is there, since the evaluation buckets by them.
    """
    identical = [i for i, (c, r) in enumerate(zip(dataset["chosen"], dataset["rejected"])) if _same(c, r)]
    if identical:
        raise DataError(
            f"{where}: {len(identical)} of {len(dataset)} pairs have identical chosen and rejected responses (rows "
            f"{identical[:5]}). A pair teaches the reward model only when the responses differ: drop those rows."
        )
    has_ratings = bool(rating_column) and rating_column in dataset.column_names
    if margin_set != "none" and not has_ratings:
        raise DataError(
            f"{where}: margin_set {margin_set!r} maps each pair's rating to a margin, but there is no "
            f"{rating_column!r} column (columns: {dataset.column_names}). Set `rating_column` to the column with the "
            "ratings, or use `margin_set: none`."
        )
    if has_ratings:
        for i, rating in enumerate(dataset[rating_column]):
            if rating is None:
                if margin_set == "none":
                    continue
                raise DataError(
                    f"{where}: row {i} has no {rating_column!r}, but margin_set {margin_set!r} needs a rating for "
                    "every pair. Fill in the ratings, drop unrated rows, or use `margin_set: none`."
                )
            try:
                normalize_rating(rating)
            except ValueError as err:
                raise DataError(f"{where}: row {i}: {err}. Fix the data or map its scale onto these four.") from err
    if "margin" in dataset.column_names:
        # TRL would use an existing column as is; the margin must come from the configured set.
        print(f"[reward] {where}: the existing `margin` column is replaced (margin_set {margin_set!r})", flush=True)
        dataset = dataset.remove_columns("margin")
    if margin_set == "none":
        return dataset
    margins = [rating_to_margin(r, margin_set) for r in dataset[rating_column]]
    return dataset.add_column("margin", margins)


def tokenize_pairs(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int | None, where: str) -> Dataset:
    """The pairs with `chosen_ids`/`rejected_ids` added by `recipes.common.reward.reward_tokenize`, the same rendering
    the RM is scored with later; pairs longer than `max_length` are dropped (and counted), as RewardTrainer would.
    The other columns stay (the trainer passes only ids and `margin` to the model), so that the RM evaluation reads
    the ratings and safety labels of exactly the pairs the trainer evaluates, in its order."""
    has_prompt = "prompt" in dataset.column_names

    def tokenize(row: dict) -> dict:
        prompt = row["prompt"] if has_prompt else None
        return {
            "chosen_ids": reward_tokenize(tokenizer, prompt, row["chosen"]),
            "rejected_ids": reward_tokenize(tokenizer, prompt, row["rejected"]),
        }

    tokenized = dataset.map(tokenize, desc=f"Tokenizing {where}")
    if max_length is None:
        return tokenized
    fits = [max(len(c), len(r)) <= max_length for c, r in zip(tokenized["chosen_ids"], tokenized["rejected_ids"])]
    if not any(fits):
        raise DataError(
            f"{where}: every pair is longer than max_length={max_length} tokens; raise `max_length` (the model's "
            "context allows it?) or shorten the responses."
        )
    if not all(fits):
        print(f"[reward] {where}: dropped {fits.count(False)} of {len(fits)} pairs longer than {max_length} tokens")
        tokenized = tokenized.select([i for i, ok in enumerate(fits) if ok])
    return tokenized
