"""Llama 2's margin: rating -> margin mapping, pair checks, and the loss TRL's RewardTrainer computes with it."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from recipes.common.data import DataError
from recipes.common.reward import RATINGS, normalize_rating
from recipes.reward.data import MARGIN_SETS, prepare_pairs, rating_to_margin


def test_margin_sets_are_llama2_table_27() -> None:
    assert [rating_to_margin(r, "small") for r in RATINGS] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert [rating_to_margin(r, "large") for r in RATINGS] == [3.0, 2.0, 1.0, 0.0]
    assert [rating_to_margin(r, "none") for r in RATINGS] == [0.0] * 4
    assert set(MARGIN_SETS) == {"none", "small", "large"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Significantly Better", "significantly_better"),
        ("slightly-better", "slightly_better"),
        ("Negligibly Better / Unsure", "negligibly_better"),
        ("unsure", "negligibly_better"),
        (3, "significantly_better"),
        (0, "negligibly_better"),
        ("2", "better"),
    ],
)
def test_rating_spellings(value, expected: str) -> None:
    assert normalize_rating(value) == expected


@pytest.mark.parametrize("value", ["amazing", 4, -1, 1.5, True, None, ""])
def test_rating_outside_scale_is_an_error(value) -> None:
    with pytest.raises(ValueError, match="not on"):
        normalize_rating(value)
    with pytest.raises(ValueError):
        rating_to_margin(value, "large")


def test_unknown_margin_set() -> None:
    with pytest.raises(ValueError, match="margin_set 'huge'"):
        rating_to_margin("better", "huge")


def pairs(**columns) -> Dataset:
    base = {"prompt": ["a", "b", "c"], "chosen": [" good", " fine", " ok"], "rejected": [" bad", " poor", " no"]}
    return Dataset.from_dict({**base, **columns})


def test_prepare_pairs_adds_margin_column() -> None:
    prepared = prepare_pairs(pairs(rating=["better", "slightly_better", "unsure"]), "large", "rating", "test")
    assert prepared["margin"] == [2.0, 1.0, 0.0]
    assert "margin" not in prepare_pairs(pairs(rating=["better"] * 3), "none", "rating", "test").column_names


def test_existing_margin_column_is_replaced() -> None:
    data = pairs(rating=["better"] * 3, margin=[9.0, 9.0, 9.0])
    assert "margin" not in prepare_pairs(data, "none", "rating", "test").column_names
    assert prepare_pairs(data, "small", "rating", "test")["margin"] == pytest.approx([2 / 3] * 3)


def test_identical_pair_is_an_error() -> None:
    data = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": "hi"}]] * 2,
            "chosen": [[{"role": "assistant", "content": "hello"}], [{"role": "assistant", "content": "x"}]],
            "rejected": [[{"role": "assistant", "content": "bye"}], [{"role": "assistant", "content": "x"}]],
        }
    )
    with pytest.raises(DataError, match=r"identical chosen and rejected.*rows \[1\]"):
        prepare_pairs(data, "none", "rating", "test")


def test_missing_rating_with_margin_set_is_an_error() -> None:
    with pytest.raises(DataError, match="no 'rating' column"):
        prepare_pairs(pairs(), "small", "rating", "test")
    with pytest.raises(DataError, match="row 1 has no 'rating'"):
        prepare_pairs(pairs(rating=["better", None, "better"]), "small", "rating", "test")
    # Without a margin set, unrated rows are fine (they are left out of the per-bucket evaluation).
    assert len(prepare_pairs(pairs(rating=["better", None, "better"]), "none", "rating", "test")) == 3


def test_rating_outside_scale_in_data_is_an_error() -> None:
    with pytest.raises(DataError, match="row 2: rating 'meh' is not on Llama 2's scale"):
        prepare_pairs(pairs(rating=["better", "better", "meh"]), "none", "rating", "where")


class FixedRewards(torch.nn.Module):
    """Reward = a table lookup on the first token id, so the loss is known in closed form."""

    def __init__(self, table: dict[int, float]) -> None:
        super().__init__()
        self.table = table
        self.training = True

    def forward(self, input_ids: torch.Tensor, **kwargs) -> SimpleNamespace:
        logits = torch.tensor([[self.table[int(ids[0])]] for ids in input_ids])
        return SimpleNamespace(logits=logits)


def trl_loss(margins: list[float] | None) -> float:
    """TRL's own RewardTrainer.compute_loss on a collated batch of two pairs."""
    model = FixedRewards({1: 2.0, 2: 0.5, 3: -1.0, 4: 1.0})
    examples = [{"chosen_ids": [1, 9], "rejected_ids": [2, 9]}, {"chosen_ids": [3, 9], "rejected_ids": [4]}]
    if margins is not None:
        examples = [{**e, "margin": m} for e, m in zip(examples, margins)]
    batch = DataCollatorForPreference(pad_token_id=0)(examples)
    trainer = SimpleNamespace(
        model=model,
        args=SimpleNamespace(center_rewards_coefficient=None),
        accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,  # TRL >= 1.13: the token count is divided by the tensor-parallel size
    )
    return float(RewardTrainer.compute_loss(trainer, model, batch))


def test_margin_loss_matches_hand_computation() -> None:
    # Pair 1: r_c - r_r = 2.0 - 0.5 = 1.5; pair 2: -1.0 - 1.0 = -2.0.
    def nll(x: float) -> float:
        return math.log1p(math.exp(-x))  # -log sigmoid(x)

    assert trl_loss(None) == pytest.approx((nll(1.5) + nll(-2.0)) / 2, rel=1e-6)
    large = [rating_to_margin("significantly_better", "large"), rating_to_margin("slightly_better", "large")]
    assert large == [3.0, 1.0]
    # -log sigmoid(1.5 - 3) and -log sigmoid(-2 - 1): 1.70141... and 3.04859...
    expected = (nll(1.5 - 3.0) + nll(-2.0 - 1.0)) / 2
    assert expected == pytest.approx((1.7014132779827524 + 3.0485873515737420) / 2, rel=1e-9)
    assert trl_loss(large) == pytest.approx(expected, rel=1e-6)
    # A margin makes an already-correct pair cost more: it asks for a gap of at least m.
    assert trl_loss(large) > trl_loss(None)
