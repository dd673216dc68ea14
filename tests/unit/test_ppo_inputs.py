"""Bad input to the PPO recipe fails with a clear message before any training, and leaves no output behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.testing import build_char_tokenizer, save_tiny_model
from recipes.common.config import ConfigError, QLoRAModelConfig
from recipes.common.data import DataError
from recipes.common.modeling import ModelLoadError
from recipes.ppo.data import load_policy_tokenizer
from recipes.ppo.train import main

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("ppo-inputs") / "model")  # context 4096, one token per char


def write_prompts(directory: Path, rows: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory


def math_rows(question: str = "What is 2+3?", answer: str = "#### 5", n: int = 8) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": question}], "answer": answer, "task": "math"}] * n


def run(model_dir: Path, data_dir: Path, output_dir: Path, *extra: str):
    return main(
        [
            "--config",
            str(REPO_ROOT / "recipes" / "ppo" / "config.yaml"),
            "--model_name_or_path",
            str(model_dir),
            "--dataset_name",
            str(data_dir),
            "--output_dir",
            str(output_dir),
            "--report_to",
            "none",
            "--eval_tasks",
            "",
            *extra,
        ]  # fmt: skip
    )


def test_prompt_longer_than_the_context(model_dir: Path, tmp_path: Path) -> None:
    rows = math_rows() + math_rows(question="x" * 5000, n=1)
    data = write_prompts(tmp_path / "data", rows)
    with pytest.raises(DataError, match=r"1 of 9 prompts have >= .* tokens.*no room for a response"):
        run(model_dir, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_reward_model_with_another_tokenizer(model_dir: Path, tmp_path: Path) -> None:
    other = build_char_tokenizer()
    other.add_tokens(["<extra>"])
    other.save_pretrained(tmp_path / "rm")
    data = write_prompts(tmp_path / "data", math_rows())
    with pytest.raises(ModelLoadError, match="does not share the policy's tokenizer: vocabularies differ"):
        run(
            model_dir,
            data,
            tmp_path / "out",
            "--reward_source",
            "reward_model",
            "--reward_model_path",
            str(tmp_path / "rm"),
        )
    assert not (tmp_path / "out").exists()


def test_value_model_with_another_tokenizer(model_dir: Path, tmp_path: Path) -> None:
    other = build_char_tokenizer()
    other.add_tokens(["<extra>"])
    other.save_pretrained(tmp_path / "value")
    data = write_prompts(tmp_path / "data", math_rows())
    with pytest.raises(ModelLoadError, match="value model"):
        run(model_dir, data, tmp_path / "out", "--value_model_path", str(tmp_path / "value"))


@pytest.mark.parametrize("key", ["kl_estimator", "sft_model_path", "ref_adapter_name"])
def test_keys_of_trl_ppo_config_this_trainer_dropped_are_errors(model_dir: Path, tmp_path: Path, key: str) -> None:
    config = tmp_path / "ppo.yaml"
    config.write_text((REPO_ROOT / "recipes" / "ppo" / "config.yaml").read_text() + f"{key}: x\n")
    data = write_prompts(tmp_path / "data", math_rows())
    argv = ["--config", str(config), "--model_name_or_path", str(model_dir), "--dataset_name", str(data),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none"]  # fmt: skip
    with pytest.raises(ConfigError, match=rf"Unknown arguments from config file.*{key}"):
        main(argv)
    assert not (tmp_path / "out").exists()


def test_batch_settings_out_of_range(model_dir: Path, tmp_path: Path) -> None:
    data = write_prompts(tmp_path / "data", math_rows())
    with pytest.raises(ConfigError, match="num_mini_batches=0"):
        run(model_dir, data, tmp_path / "out", "--num_mini_batches", "0")


def test_tokenizer_that_pads_with_eos(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "model")
    tokenizer = build_char_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(model_dir)
    data = write_prompts(tmp_path / "data", math_rows())
    # Not an error any more: PPO picks a distinct pad token of the vocabulary (recipes.common.modeling.set_pad_token).
    chosen = load_policy_tokenizer(QLoRAModelConfig(model_name_or_path=str(model_dir)), None, chat=True)
    assert chosen.pad_token == "<pad>" and chosen.padding_side == "left"
    with pytest.raises(ModelLoadError, match="not in the vocabulary"):
        run(model_dir, data, tmp_path / "out", "--pad_token", "<no-such-token>")


def test_math_reward_needs_answers(model_dir: Path, tmp_path: Path) -> None:
    data = write_prompts(tmp_path / "data", math_rows(answer=""))
    with pytest.raises(DataError, match="no row has an `answer`"):
        run(model_dir, data, tmp_path / "out")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reward_source", "sentiment"], "reward_source: 'sentiment' is not one of"),
        (["--reward_source", "reward_model"], "needs `reward_model_path`"),
        (["--reward_source", "reward_model", "--reward_model_path", "outputs/no-such-rm"], "does not exist"),
        (["--use_peft", "false"], "keep `use_peft: true`"),
    ],
)
def test_config_errors(model_dir: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    data = write_prompts(tmp_path / "data", math_rows())
    with pytest.raises(ConfigError, match=message):
        run(model_dir, data, tmp_path / "out", *extra)
    assert not (tmp_path / "out").exists()
