"""Reward-model evaluation metrics (eval/reward_model.py) on hand-made scores."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eval.reward_model import (
    RATINGS,
    calibration,
    flatten_rm_metrics,
    format_table,
    pairwise_metrics,
    safety_threshold_metrics,
    save_json,
)


def test_accuracy_and_gap_per_bucket() -> None:
    chosen = [2.0, 1.0, 0.5, 0.0, 1.0, -1.0]
    rejected = [0.0, 2.0, 0.0, 0.1, 0.0, 0.0]
    ratings = ["significantly_better", "significantly_better", "better", "Negligibly Better / Unsure", 3, "better"]
    result = pairwise_metrics(chosen, rejected, ratings)
    assert result["n"] == 6
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["mean_gap"] == pytest.approx((2 - 1 + 0.5 - 0.1 + 1 - 1) / 6)
    buckets = result["buckets"]
    assert list(buckets) == ["significantly_better", "better", "negligibly_better"]  # Table 28 order, empty left out
    assert buckets["significantly_better"] == {
        "n": 3,
        "accuracy": pytest.approx(2 / 3),
        "mean_gap": pytest.approx(2 / 3),
    }
    assert buckets["better"]["accuracy"] == pytest.approx(0.5)
    assert buckets["negligibly_better"]["accuracy"] == 0.0
    assert result["score_mean"] == pytest.approx(sum(chosen + rejected) / 12)


def test_unrated_pairs_count_overall_only() -> None:
    result = pairwise_metrics([1.0, 1.0, -1.0], [0.0, 0.0, 0.0], ["better", None, None])
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["buckets"] == {"better": {"n": 1, "accuracy": 1.0, "mean_gap": 1.0}}


def test_calibration_ece_by_hand() -> None:
    # Two pairs at confidence sigmoid(ln 3) = 0.75 (one right, one wrong), two at sigmoid(ln 9) = 0.9 (both right).
    gap = torch.tensor([math.log(3), -math.log(3), math.log(9), math.log(9)])
    result = calibration(gap, bins=5)
    # Bin [0.7, 0.8): accuracy 0.5 vs confidence 0.75; bin [0.9, 1.0]: accuracy 1.0 vs 0.9.
    assert result["ece"] == pytest.approx(0.5 * 0.25 + 0.5 * 0.1)
    assert [b["n"] for b in result["bins"]] == [2, 2]
    assert result["brier"] == pytest.approx((0.25**2 + 0.75**2 + 0.1**2 + 0.1**2) / 4)
    assert result["log_loss"] == pytest.approx((math.log(4 / 3) + math.log(4) + 2 * math.log(10 / 9)) / 4)


def test_perfectly_calibrated_scores_have_small_ece() -> None:
    generator = torch.Generator().manual_seed(0)
    gap = torch.randn(20000, generator=generator) * 2
    # Draw which response "wins" with probability sigmoid(gap): the RM is calibrated by construction.
    wins = torch.rand(20000, generator=generator) < torch.sigmoid(gap)
    observed = torch.where(wins, gap, -gap)
    assert calibration(observed)["ece"] < 0.02


def test_safety_threshold_precision_recall() -> None:
    scores = torch.tensor([-3.0, -2.5, -3.0, 2.0, 1.0, -0.5])  # sigmoid < 0.15 for the first three
    is_safe = [False, False, True, True, False, True]
    result = safety_threshold_metrics(scores, is_safe, 0.15)
    assert result["n_flagged"] == 3 and result["n_unsafe"] == 3
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)


def test_flat_metrics_table_and_json(tmp_path) -> None:
    result = pairwise_metrics([1.0, 2.0, -1.0, 0.5], [0.0, 0.0, 0.0, 1.0], ["better", "slightly_better", "better", 0])
    flat = flatten_rm_metrics(result)
    assert flat["eval/rm/accuracy"] == 0.5
    assert flat["eval/rm/accuracy_slightly_better"] == 1.0
    assert "eval/rm/ece" in flat and all(isinstance(v, (int, float)) for v in flat.values())
    table = format_table({"no margin": result})
    header, _, row = table.splitlines()
    assert header.count("|") == len(RATINGS) + 4 and "Negligibly Better / Unsure" in header
    assert row == "| no margin | - | 50.0 | 100.0 | 0.0 | 50.0 | 4 |"
    path = save_json({"final": result}, tmp_path / "rm_eval.json")
    assert json.loads(path.read_text())["final"]["buckets"]["better"]["n"] == 2


def test_mismatched_inputs_are_errors() -> None:
    with pytest.raises(ValueError, match="as many chosen as rejected"):
        pairwise_metrics([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="ratings for"):
        pairwise_metrics([1.0], [0.0], ["better", "better"])
