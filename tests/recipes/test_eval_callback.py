"""EvalCallback inside a real Trainer: metrics every eval_steps and at train end, in the log history and in an offline
W&B run (read back from its .wandb log), one samples table per evaluation, model state and RNG restored, only the
main process evaluating."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import wandb
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerState, TrainingArguments

from eval.callback import EvalCallback
from eval.testing import build_char_tokenizer, build_tiny_model

GSM8K = [
    {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
    {"question": "What is 10-4?", "answer": "10-4=6\n#### 6"},
    {"question": "What is 3*3?", "answer": "3*3=9\n#### 9"},
]
EXPECTED_KEYS = {
    "eval/gsm8k/accuracy",
    "eval/gsm8k/exact_match_strict",
    "eval/gsm8k/exact_match_flexible",
    "eval/length/mean_tokens",
    "eval/length/frac_hit_limit",
    "eval/diversity/distinct_mean",
    "eval/diversity/per_input_distinct_mean",
    "eval/diversity/self_bleu",
}


@pytest.fixture()
def gsm8k_file(tmp_path: Path) -> Path:
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    return path


def _callback(tokenizer, gsm8k_file: Path, eval_steps: int | None) -> EvalCallback:
    return EvalCallback(
        tokenizer,
        "gsm8k,length,diversity",
        gsm8k_path=str(gsm8k_file),
        num_samples=3,
        max_new_tokens=8,
        eval_steps=eval_steps,
        samples_per_prompt=2,
        embedder=None,
    )


def _wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline run, read back from its .wandb record log."""
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def test_callback_logs_to_history_and_offline_wandb(tmp_path: Path, wandb_dir: Path, gsm8k_file: Path) -> None:
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer)
    texts = [f"Question: what is {i}+1?\nAnswer: {i + 1}" for i in range(16)]
    dataset = datasets.Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"]
    )
    callback = _callback(tokenizer, gsm8k_file, eval_steps=3)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=["wandb"],
        run_name="eval-callback-test",
        save_strategy="no",
        use_cpu=True,
        gradient_checkpointing=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[callback],
    )
    trainer.train()
    run_dir = Path(wandb.run.dir).parent
    wandb.finish()

    # Step 3 by eval_steps, step 4 at train end: both in the trainer's log history.
    evaluations = [h for h in trainer.state.log_history if "eval/gsm8k/accuracy" in h]
    assert [h["step"] for h in evaluations] == [3, 4]
    for entry in evaluations:
        assert EXPECTED_KEYS <= set(entry)
        assert entry["eval/gsm8k/n"] == 3 and entry["eval/length/n"] == 6
        assert entry["eval/gsm8k/accuracy"] == entry["eval/gsm8k/exact_match_flexible"]
    assert callback.history[0]["step"] == 3

    # The offline run: the .wandb log holds the metrics at both steps and one table per evaluation.
    assert run_dir.parent.parent == wandb_dir and list(run_dir.glob("run-*.wandb"))
    history = [item for item in _wandb_history(run_dir) if "eval/gsm8k/accuracy" in item]
    assert [item["train/global_step"] for item in history] == [3, 4]
    assert all(EXPECTED_KEYS <= set(item) for item in history)
    # History rows flatten the table reference into dotted keys.
    assert history[0]["eval/samples_step_3._type"] == "table-file"
    assert history[1]["eval/samples_step_4.nrows"] == 3 + 6  # 3 GSM8K answers, 3 prompts x 2 samples
    tables = sorted(p.name.split("_")[2] for p in (run_dir / "files" / "media" / "table" / "eval").glob("*.table.json"))
    assert tables == ["3", "4"]


def test_model_state_and_rng_are_restored(gsm8k_file: Path) -> None:
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    callback = _callback(tokenizer, gsm8k_file, eval_steps=None)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    state = TrainerState()
    state.global_step = 7
    rng = torch.get_rng_state()
    callback.evaluate(args, state, model)
    assert model.training and all(m.training for m in model.modules())
    assert model.config.use_cache is False
    assert model.is_activation_checkpointing
    assert torch.equal(torch.get_rng_state(), rng)  # sampling did not move the training random stream
    assert state.log_history[-1]["step"] == 7
    callback.evaluate(args, state, model)  # a second call at the same step is a no-op
    assert len(state.log_history) == 1


class _Untouchable(torch.nn.Module):
    def forward(self, *args, **kwargs):  # pragma: no cover - reaching it is the failure
        raise AssertionError("a non-main process must not evaluate")


def test_only_the_main_process_evaluates(gsm8k_file: Path) -> None:
    callback = _callback(build_char_tokenizer(), gsm8k_file, eval_steps=1)
    state = TrainerState(is_world_process_zero=False)
    state.global_step = 1
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    callback.on_step_end(args, state, None, model=_Untouchable())
    callback.on_train_end(args, state, None, model=_Untouchable())
    assert state.log_history == [] and callback.history == []


def test_bad_data_fails_at_construction(tmp_path: Path) -> None:
    from eval.data import EvalError

    with pytest.raises(EvalError, match="Unknown task"):
        EvalCallback(build_char_tokenizer(), ["gsm8k", "bleu"], gsm8k_path=str(tmp_path))
    with pytest.raises(EvalError, match="not found"):
        EvalCallback(build_char_tokenizer(), ["gsm8k"], gsm8k_path=str(tmp_path / "none.jsonl"))


def test_unwrap_finds_the_policy_inside_the_ppo_wrapper() -> None:
    from peft import LoraConfig, get_peft_model

    from eval.callback import unwrap
    from recipes.ppo.modeling import ScalarHead, SharedBase
    from recipes.ppo.trainer import PolicyAndValue

    tokenizer = build_char_tokenizer()
    policy = get_peft_model(build_tiny_model(tokenizer), LoraConfig(r=2, target_modules="all-linear"))
    value = ScalarHead(torch.nn.Linear(64, 1), shared=SharedBase(policy), adapter="default")
    assert unwrap(PolicyAndValue(policy, value)) is policy
    assert unwrap(policy) is policy
