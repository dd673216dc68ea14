"""The reward recipe scores its eval pairs once per evaluation: TRL's eval metrics and the per-bucket RM evaluation
(eval/reward_model.py) come from one forward pass, with the metrics the separate scoring pass gave."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import load_dataset

from eval.reward_model import evaluate_reward_model
from recipes.common.reward import RATINGS
from recipes.reward.train import main

REPO_ROOT = Path(__file__).resolve().parents[2]
EVAL_PAIRS = 40  # not a multiple of the eval batch: the last batch is smaller
EVAL_BATCH = 16


class EvalRowCounter:
    """Counts the rows that go through a transformers sequence classifier's forward in eval mode (any instance),
    with a global forward hook: the RM's real forward calls, wherever they come from."""

    def __init__(self) -> None:
        self.rows = 0
        self.calls = 0

    def __call__(self, module: torch.nn.Module, args, output) -> None:
        name = type(module).__name__
        if name.endswith("ForSequenceClassification") and not name.startswith("Peft") and not module.training:
            self.calls += 1
            self.rows += output.logits.shape[0]


@pytest.fixture(scope="module")
def counted_run(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    output_dir = tmp_path_factory.mktemp("reward-single-pass") / "run"
    counter = EvalRowCounter()
    args = [
        "--config", str(REPO_ROOT / "recipes" / "reward" / "config.yaml"),
        "--model_name_or_path", str(demo_dir / "base"),
        "--dataset_name", str(demo_dir / "data" / "preferences"),
        "--output_dir", str(output_dir),
        "--max_steps", "8", "--logging_steps", "4", "--eval_steps", "4", "--save_steps", "8",
        "--max_train_samples", "128", "--max_eval_samples", str(EVAL_PAIRS),
        "--per_device_eval_batch_size", str(EVAL_BATCH), "--report_to", "none",
    ]  # fmt: skip
    handle = torch.nn.modules.module.register_module_forward_hook(counter)
    try:
        trainer = main(args)
    finally:
        handle.remove()
    return trainer, output_dir, counter


def test_each_evaluation_scores_each_pair_once(counted_run: tuple) -> None:
    trainer, output_dir, counter = counted_run
    result = json.loads((output_dir / "rm_eval.json").read_text())
    assert [entry["step"] for entry in result["history"]] == [4, 8]
    # Two evaluations (steps 4 and 8; the final one reuses step 8's) x 40 pairs x (chosen + rejected): one pass each.
    # The RM evaluation scoring the pairs again would make it 320.
    assert counter.rows == 2 * EVAL_PAIRS * 2, (counter.rows, counter.calls)
    assert counter.calls == 2 * math.ceil(EVAL_PAIRS / EVAL_BATCH)
    # TRL's own eval metrics are still there, from the same pass.
    trl_eval = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in trl_eval] == [4, 8]
    assert all(math.isfinite(entry["eval_loss"]) and "eval_accuracy" in entry for entry in trl_eval)
    # Same pairs, same scores: TRL's batch accuracy (mean over its batches) agrees with ours when batches are equal.
    assert result["final"]["n"] == EVAL_PAIRS and result["final"]["runtime_s"] > 0


def test_metrics_equal_the_separate_scoring_pass(counted_run: tuple, demo_dir: Path) -> None:
    """What the callback logged from the trainer's scores is what `evaluate_reward_model` (its own scoring, the
    callback's path before) gives on the same model and pairs."""
    trainer, output_dir, _ = counted_run
    final = json.loads((output_dir / "rm_eval.json").read_text())["final"]
    pairs = load_dataset("json", data_files=str(demo_dir / "data" / "preferences" / "test.jsonl"), split="train")
    pairs = pairs.shuffle(seed=0).select(range(EVAL_PAIRS))  # the recipe's `take` (seeded shuffle, seed 0)
    separate = evaluate_reward_model(trainer.model, trainer.processing_class, pairs, batch_size=EVAL_BATCH)
    assert final["n"] == separate["n"] == EVAL_PAIRS
    assert set(final["buckets"]) == set(RATINGS)
    for rating in RATINGS:
        assert final["buckets"][rating]["n"] == separate["buckets"][rating]["n"]
        assert final["buckets"][rating]["accuracy"] == separate["buckets"][rating]["accuracy"], rating
        assert final["buckets"][rating]["mean_gap"] == pytest.approx(separate["buckets"][rating]["mean_gap"], abs=1e-4)
    assert final["accuracy"] == separate["accuracy"]
    assert final["tasks"] == separate["tasks"]
    assert final["mean_chosen"] == pytest.approx(separate["mean_chosen"], abs=1e-4)
    assert final["calibration"]["ece"] == pytest.approx(separate["calibration"]["ece"], abs=1e-4)


def test_without_trainer_evaluation_the_final_one_is_a_single_pass(demo_dir: Path, tmp_path: Path) -> None:
    """eval_strategy no: the trainer never evaluates, and the final RM evaluation scores each pair once."""
    counter = EvalRowCounter()
    args = [
        "--config", str(REPO_ROOT / "recipes" / "reward" / "config.yaml"),
        "--model_name_or_path", str(demo_dir / "base"),
        "--dataset_name", str(demo_dir / "data" / "preferences"),
        "--output_dir", str(tmp_path / "run"), "--eval_strategy", "no",
        "--max_steps", "2", "--save_steps", "2", "--max_train_samples", "32", "--max_eval_samples", str(EVAL_PAIRS),
        "--per_device_eval_batch_size", str(EVAL_BATCH), "--report_to", "none",
    ]  # fmt: skip
    handle = torch.nn.modules.module.register_module_forward_hook(counter)
    try:
        main(args)
    finally:
        handle.remove()
    result = json.loads((tmp_path / "run" / "rm_eval.json").read_text())
    assert [entry["step"] for entry in result["history"]] == [2]
    assert counter.rows == 2 * EVAL_PAIRS
