"""Reward recipe end to end on the tiny demo model with real 4-bit QLoRA (bitsandbytes on CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig, set_seed

from recipes.common.config import ConfigError
from recipes.common.data import DataError
from recipes.common.modeling import ModelLoadError
from recipes.common.reward import (
    RewardCombination,
    combine_rewards,
    load_combined_reward_model,
    load_reward_model,
    reward_tokenize,
    score,
)
from recipes.reward.train import main

REPO_ROOT = Path(__file__).resolve().parents[2]
EVAL_PAIRS = 96


def rm_args(demo_dir: Path, output_dir: Path, *extra: str, config: str = "config.yaml", data: str = "preferences"):
    return [
        "--config", str(REPO_ROOT / "recipes" / "reward" / config),
        "--model_name_or_path", str(demo_dir / "base"),
        "--dataset_name", str(demo_dir / "data" / data),
        "--output_dir", str(output_dir),
        "--max_steps", "30", "--logging_steps", "5", "--eval_steps", "15", "--save_steps", "15",
        "--max_train_samples", "480", "--max_eval_samples", str(EVAL_PAIRS),
        *extra,
    ]  # fmt: skip


def eval_pairs(demo_dir: Path, data: str = "preferences"):
    """The eval subset the recipe used (`take` = seeded shuffle, seed 0)."""
    dataset = load_dataset("json", data_files=str(demo_dir / "data" / data / "test.jsonl"), split="train")
    return dataset.shuffle(seed=0).select(range(EVAL_PAIRS))


@pytest.fixture(scope="module")
def rm_run(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    output_dir = tmp_path_factory.mktemp("reward") / "run"
    wandb_dir = tmp_path_factory.mktemp("reward-wandb")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_DIR", str(wandb_dir))
        trainer = main(rm_args(demo_dir, output_dir))
    return trainer, output_dir, wandb_dir


def test_loss_finite_and_accuracy_above_chance(rm_run: tuple) -> None:
    trainer, output_dir, _ = rm_run
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) >= 4 and all(math.isfinite(x) for x in losses)
    result = json.loads((output_dir / "rm_eval.json").read_text())
    final = result["final"]
    assert final["n"] == EVAL_PAIRS
    assert final["accuracy"] > 0.6, final  # chance is 0.5; 30 steps here (the default config: test_default_config)
    assert set(final["buckets"]) == {"significantly_better", "better", "slightly_better", "negligibly_better"}
    assert final["buckets"]["significantly_better"]["accuracy"] > 0.75
    assert final["mean_gap"] > 0 and math.isfinite(final["calibration"]["ece"])
    assert [entry["step"] for entry in result["history"]] == [15, 30]  # the callback at each evaluation
    logged = [entry for entry in trainer.state.log_history if "eval/rm/accuracy" in entry]
    assert logged and all("eval/rm/accuracy_better" in entry for entry in logged)


def test_4bit_base_with_lora_and_float32_score_head_trained(rm_run: tuple, demo_dir: Path) -> None:
    trainer, output_dir, _ = rm_run
    classifier = trainer.model.get_base_model()
    assert classifier.is_loaded_in_4bit
    assert type(classifier.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    trainable = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert all("lora_" in name or "score.modules_to_save" in name for name in trainable), sorted(trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    # LoRA B starts at zero: non-zero now means the adapter learned.
    assert all(p.abs().sum() > 0 for name, p in trainable.items() if "lora_B" in name)
    # The score head starts from the seeded random init of a fresh 4-bit load; it must have moved.
    set_seed(0)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    fresh = AutoModelForSequenceClassification.from_pretrained(
        demo_dir / "base", num_labels=1, quantization_config=quantization, dtype=torch.float32
    )
    (head,) = [p for name, p in trainable.items() if "score.modules_to_save" in name]
    assert head.shape == fresh.score.weight.shape
    assert not torch.allclose(head.detach().cpu(), fresh.score.weight)
    info = json.loads((output_dir / "reward_model.json").read_text())
    assert info["load_in_4bit"] is True and info["margin_set"] == "small"


def test_reloaded_adapter_reproduces_scores(rm_run: tuple, demo_dir: Path) -> None:
    trainer, output_dir, _ = rm_run
    pairs = eval_pairs(demo_dir).select(range(16))
    expected = score(trainer.model, trainer.processing_class, pairs["prompt"], pairs["chosen"])
    model, tokenizer = load_reward_model(str(output_dir))  # base from adapter_config.json, 4-bit as trained
    assert model.get_base_model().is_loaded_in_4bit
    actual = score(model, tokenizer, pairs["prompt"], pairs["chosen"])
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    # The saved evaluation is what the reloaded model scores on the same pairs.
    all_pairs = eval_pairs(demo_dir)
    gap = score(model, tokenizer, all_pairs["prompt"], all_pairs["chosen"]) - score(
        model, tokenizer, all_pairs["prompt"], all_pairs["rejected"]
    )
    final = json.loads((output_dir / "rm_eval.json").read_text())["final"]
    assert float((gap > 0).float().mean()) == pytest.approx(final["accuracy"], abs=1 / EVAL_PAIRS)


def test_ppo_module_on_trained_rms(rm_run: tuple, demo_dir: Path) -> None:
    """The trained 4-bit RM (twice: as helpfulness and as safety RM) on left-padded rollout ids, as PPO calls it."""
    trainer, output_dir, _ = rm_run
    tokenizer = trainer.processing_class
    pairs = eval_pairs(demo_dir).select(range(6))
    combination = RewardCombination(whitening="batch")
    module = load_combined_reward_model(str(output_dir), str(output_dir), tokenizer, combination)
    queries, responses = [], []
    for prompt, chosen in zip(pairs["prompt"], pairs["chosen"]):
        query = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        queries.append(list(query["input_ids"]))
        responses.append(reward_tokenize(tokenizer, prompt, chosen)[len(queries[-1]) :])
    pad, context, width = tokenizer.pad_token_id, max(map(len, queries)), max(map(len, responses))
    rows = [[pad] * (context - len(q)) + q + r + [pad] * (width - len(r)) for q, r in zip(queries, responses)]
    input_ids = torch.tensor(rows)
    rewards = module(input_ids=input_ids, attention_mask=(input_ids != pad).long()).logits[:, 0]
    assert rewards.shape == (6,) and torch.isfinite(rewards).all()
    raw = score(trainer.model, tokenizer, pairs["prompt"], pairs["chosen"])
    torch.testing.assert_close(module.last["helpfulness"], raw, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(rewards, combine_rewards(raw, raw, None, combination), rtol=1e-3, atol=1e-3)


def test_wandb_offline_run_written(rm_run: tuple) -> None:
    _, output_dir, wandb_dir = rm_run
    assert list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")), "no offline W&B run file"
    marker = json.loads((output_dir / "run_complete.json").read_text())
    assert marker["stage"] == "reward" and marker["metrics"]["eval/rm/accuracy"] > 0.5


def test_safety_config_trains_on_safety_pairs(demo_dir: Path, tmp_path: Path, wandb_dir: Path) -> None:
    output_dir = tmp_path / "safety"
    main(
        rm_args(
            demo_dir, output_dir, "--max_steps", "4", "--eval_steps", "4", "--save_steps", "4",
            "--max_train_samples", "64", "--max_eval_samples", "32", config="safety.yaml", data="safety",
        )
    )  # fmt: skip
    final = json.loads((output_dir / "rm_eval.json").read_text())["final"]
    assert final["n"] == 32 and math.isfinite(final["accuracy"])
    threshold = final["safety_threshold"]  # from chosen_safe / rejected_safe
    assert threshold["threshold"] == 0.15 and threshold["n_responses"] == 64
    assert json.loads((output_dir / "reward_model.json").read_text())["reward_kind"] == "safety"


@pytest.mark.slow
def test_default_config_beats_chance_on_all_test_pairs(demo_dir: Path, tmp_path: Path, wandb_dir: Path) -> None:
    """The shipped default (recipes/reward/config.yaml, ~1-2 min on 2 free cores) on all 400 demo test pairs."""
    output_dir = tmp_path / "default"
    main(
        [
            "--config", str(REPO_ROOT / "recipes" / "reward" / "config.yaml"),
            "--model_name_or_path", str(demo_dir / "base"),
            "--dataset_name", str(demo_dir / "data" / "preferences"),
            "--output_dir", str(output_dir),
        ]
    )  # fmt: skip
    final = json.loads((output_dir / "rm_eval.json").read_text())["final"]
    assert final["n"] == 400
    assert final["accuracy"] > 0.7, final
    buckets = {rating: bucket["accuracy"] for rating, bucket in final["buckets"].items()}
    assert buckets["significantly_better"] > 0.85 and buckets["slightly_better"] > 0.85, buckets
    # The demo's negligibly-better pairs are a correct answer and a rewording in random order: chance is right there.
    assert 0.35 < buckets["negligibly_better"] < 0.65, buckets


# ---- bad input: clear errors before any training, earlier output untouched -------------------------------------


def write_pairs(directory: Path, rows: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory


def pair(chosen: str = "Good answer.", rejected: str = "Bad.", rating="better") -> dict:
    row = {"prompt": [{"role": "user", "content": "Question?"}]}
    row["chosen"] = [{"role": "assistant", "content": chosen}]
    row["rejected"] = [{"role": "assistant", "content": rejected}]
    if rating is not None:
        row["rating"] = rating
    return row


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([pair(), pair("Same.", "Same.")], "identical chosen and rejected"),
        ([pair(), pair(rating="fantastic")], "row 1: rating 'fantastic' is not on Llama 2's scale"),
        ([pair(), pair(rating=None)], "row 1 has no 'rating'"),
    ],
)
def test_bad_pairs_fail_before_training(demo_dir: Path, tmp_path: Path, rows: list, message: str) -> None:
    data = write_pairs(tmp_path / "data", rows)
    args = rm_args(demo_dir, tmp_path / "out")
    args[args.index("--dataset_name") + 1] = str(data)
    with pytest.raises(DataError, match=message):
        main(args)
    assert not (tmp_path / "out").exists()


def test_margin_set_needs_a_rating_column(demo_dir: Path, tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "data", [pair(rating=None), pair("Fine.", rating=None)])
    args = rm_args(demo_dir, tmp_path / "out", "--dataset_name", str(data))
    with pytest.raises(DataError, match="margin_set 'small' maps each pair's rating"):
        main(args)
    main_args = rm_args(demo_dir, tmp_path / "out", "--dataset_name", str(data), "--margin_set", "huge")
    with pytest.raises(ConfigError, match="margin_set: 'huge' is not one of none, small, large"):
        main(main_args)


def test_pad_token_equal_to_eos_is_refused(demo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="pads with its EOS token"):
        main(rm_args(demo_dir, tmp_path / "out", "--pad_token", "<|end|>", "--max_train_samples", "8"))


def test_generation_eval_tasks_are_refused(demo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a reward model does not generate"):
        main(rm_args(demo_dir, tmp_path / "out", "--eval_tasks", "gsm8k"))
