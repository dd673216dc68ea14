"""GRPO end to end on the tiny demo model with real 4-bit QLoRA, starting from an SFT adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_dpo import make_sft_adapter  # same directory: pytest puts it on sys.path
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import eval.gsm8k
from recipes.common.config import ConfigError
from recipes.common.data import DataError
from recipes.grpo import rewards
from recipes.grpo.rewards import RewardFunctionError
from recipes.grpo.train import main

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_reward_model(base_dir: Path, out_dir: Path) -> Path:
    """A full sequence-classification model with a random score head: enough to exercise the combined RM reward."""
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.float32)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


def grpo_args(demo_dir: Path, sft_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO_ROOT / "recipes" / "grpo" / "config.yaml"),
        "--model_name_or_path", str(sft_dir), "--parent_run", str(sft_dir),
        "--dataset_name", str(demo_dir / "data" / "math"),
        "--eval_gsm8k_path", str(demo_dir / "data" / "math" / "test.jsonl"),
        "--output_dir", str(output_dir),
        "--max_steps", "3", "--logging_steps", "1", "--eval_steps", "2", "--save_steps", "3",
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "24",
        "--learning_rate", "1e-2", "--max_train_samples", "32",
        # length (and rm below): rewards that vary at any skill, so advantages and updates are not all zero
        "--reward_functions", "correctness", "format", "length", "--reward_weights", "1.0", "0.2", "0.5",
        "--eval_tasks", "gsm8k", "--eval_num_samples", "4", "--eval_max_new_tokens", "16",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def sft_dir(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sft_adapter(demo_dir / "base", tmp_path_factory.mktemp("grpo-sft") / "sft")


@pytest.fixture(scope="module")
def grpo_run(demo_dir: Path, sft_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One short run; every call of the GSM8K grader made by the correctness reward is recorded."""
    output_dir = tmp_path_factory.mktemp("grpo") / "run"
    graded = []

    def spy(completion: str, reference: str, mode: str = "flexible") -> bool:
        graded.append((completion, reference))
        return eval.gsm8k.grade(completion, reference, mode)

    rm = make_reward_model(demo_dir / "base", tmp_path_factory.mktemp("grpo-rm") / "rm")
    with_rm = ["--reward_functions", "correctness", "format", "length", "rm", "--reward_weights", "1", "0.2", "0.5", "0.1"]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_DIR", str(tmp_path_factory.mktemp("grpo-wandb")))
        patch.setattr(rewards, "grade", spy)
        trainer = main(grpo_args(demo_dir, sft_dir, output_dir, *with_rm, "--reward_model_path", str(rm)))
    return trainer, output_dir, graded


def test_metrics_logged_and_finite(grpo_run: tuple) -> None:
    trainer, _, _ = grpo_run
    logs = [e for e in trainer.state.log_history if "reward" in e]
    assert len(logs) == 3
    keys = ["reward", "reward_std", "kl", "entropy", "completions/mean_length", "rewards/correctness/mean"]
    keys += ["rewards/format/mean", "rewards/length/mean", "rewards/length/std", "rewards/rm/mean", "rewards/rm/std"]
    for key in keys:
        assert all(math.isfinite(e[key]) for e in logs), key
    # rewards differ within the batch, so the updates are not zero (lengths may all hit the limit: this SFT adapter
    # is the base model, which rarely ends a chat reply)
    assert any(e["reward_std"] > 0 for e in logs)
    assert logs[-1]["kl"] > 0  # the policy moved away from the reference (the SFT adapter)
    assert any("eval/gsm8k/accuracy" in e for e in trainer.state.log_history)


def as_text(logged) -> str:
    """A prompt or completion of TRL's completions table: text, or (TRL >= 1.15, conversational data) the messages
    themselves, which parquet reads back as an array of {role, content} records."""
    if isinstance(logged, str):
        return logged
    return "\n".join(message["content"] for message in logged)


def test_correctness_graded_the_logged_completions_against_their_references(grpo_run: tuple, demo_dir: Path) -> None:
    _, output_dir, graded = grpo_run
    tables = sorted((output_dir / "completions").glob("completions_*.parquet"))
    assert len(tables) == 3  # one completions table per logged step (also sent to W&B)
    rows = pd.concat([pd.read_parquet(t) for t in tables])
    answers = {}
    for line in (demo_dir / "data" / "math" / "train.jsonl").read_text().splitlines():
        record = json.loads(line)
        answers[record["question"]] = record["answer"]
    preflight, graded = graded[:4], graded[4:]  # the reward functions are tried on 2 rows x 2 made-up answers first
    assert [c for c, _ in preflight][1::2] == ["I am not sure.", "I am not sure."]
    assert len(graded) == len(rows) == 3 * 8
    for prompt, completion in zip(rows["prompt"], rows["completion"]):
        question = next(q for q in answers if q in as_text(prompt))
        assert (as_text(completion), answers[question]) in graded
    for row_reward, (completion, reference) in zip(rows["correctness"], graded):
        assert row_reward == float(eval.gsm8k.grade(completion, reference))


def test_adapter_trained_from_sft_and_saved(grpo_run: tuple, sft_dir: Path) -> None:
    trainer, output_dir, _ = grpo_run
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".default." in n for n in trainable)
    saved = load_file(output_dir / "adapter_model.safetensors")
    start = load_file(sft_dir / "adapter_model.safetensors")
    assert saved.keys() == start.keys()
    assert any(not torch.equal(saved[k].float(), start[k].float()) for k in saved)
    assert not (output_dir / "ref").exists()
    finished = json.loads((output_dir / "run_complete.json").read_text())
    assert finished["stage"] == "grpo" and "eval/gsm8k/accuracy" in finished["metrics"]
    assert list(Path(finished["wandb"]).glob("run-*.wandb"))


def test_bad_input_fails_before_the_model_loads(
    demo_dir: Path, sft_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "user_rewards.py").write_text("def one(prompts, completions, **kwargs):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    user_reward = ["--reward_functions", "correctness", "user_rewards:one", "--reward_weights", "1", "1"]
    with pytest.raises(RewardFunctionError, match="'one' returned 1 values for 4 completions"):
        main(grpo_args(demo_dir, sft_dir, out, *user_reward))
    with pytest.raises(ConfigError, match="reward_weights"):
        main(grpo_args(demo_dir, sft_dir, out, "--reward_weights", "1.0"))
    context = json.loads((demo_dir / "base" / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(DataError, match="leaves no room for a response"):
        main(grpo_args(demo_dir, sft_dir, out, "--max_completion_length", str(context - 4)))
    no_answers = tmp_path / "prompts.jsonl"
    no_answers.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(RewardFunctionError, match="correctness needs an `answer` column"):
        main(grpo_args(demo_dir, sft_dir, out, "--dataset_name", str(no_answers)))
    assert not out.exists()
