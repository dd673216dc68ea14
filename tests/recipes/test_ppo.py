"""PPO end to end on the tiny demo model with real 4-bit QLoRA: SFT adapter -> PPO, then a resume mid-run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_dpo import make_sft_adapter  # same directory: pytest puts it on sys.path
from test_sft import load_4bit
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from recipes.common.config import ConfigError
from recipes.common.outputs import OutputDirError
from recipes.ppo.modeling import REFERENCE_ADAPTER
from recipes.ppo.train import main

REPO_ROOT = Path(__file__).resolve().parents[2]
UPDATES = 4


def make_reward_model(base_dir: Path, out_dir: Path, seed: int = 1) -> Path:
    """A stand-in for the reward recipe's output: LoRA adapter + score head (modules_to_save) + tokenizer."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS", modules_to_save=["score"])
    model = get_peft_model(model, config)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    (out_dir / "reward_model.json").write_text(json.dumps({"load_in_4bit": True}))
    return out_dir


def ppo_args(demo_dir: Path, sft_dir: Path, rm_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO_ROOT / "recipes" / "ppo" / "config.yaml"),
        "--model_name_or_path", str(sft_dir), "--parent_run", str(sft_dir),
        "--value_model_path", str(rm_dir),  # the value model starts from the RM; the reward is the math grader
        "--dataset_name", str(demo_dir / "data" / "prompts"),
        "--eval_gsm8k_path", str(demo_dir / "data" / "math" / "test.jsonl"),
        "--output_dir", str(output_dir),
        "--total_episodes", str(4 * UPDATES), "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
        "--local_rollout_forward_batch_size", "4", "--num_ppo_epochs", "1", "--response_length", "16",
        "--learning_rate", "1e-2", "--max_train_samples", "32", "--max_eval_samples", "8",
        "--per_device_eval_batch_size", "4", "--num_sample_generations", "1",
        "--save_steps", "0.5", "--eval_steps", "4",  # a fraction of all updates: checkpoints at 2 and 4
        "--eval_tasks", "gsm8k", "--eval_num_samples", "4", "--eval_max_new_tokens", "16",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def models(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ppo-models")
    return make_sft_adapter(demo_dir / "base", root / "sft"), make_reward_model(demo_dir / "base", root / "rm")


@pytest.fixture(scope="module")
def ppo_run(demo_dir: Path, models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    output_dir = tmp_path_factory.mktemp("ppo") / "run"
    wandb_dir = tmp_path_factory.mktemp("ppo-wandb")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_DIR", str(wandb_dir))
        trainer = main(ppo_args(demo_dir, *models, output_dir))
    return trainer, output_dir, wandb_dir


def updates(log_history: list[dict]) -> list[dict]:
    return [entry for entry in log_history if "objective/kl" in entry]


def test_all_updates_ran_with_finite_metrics(ppo_run: tuple) -> None:
    trainer, _, _ = ppo_run
    logged = updates(trainer.state.log_history)
    assert [entry["step"] for entry in logged] == list(range(1, UPDATES + 1))
    keys = ["objective/kl", "objective/entropy", "objective/scores", "loss/policy_avg", "loss/value_avg"]
    keys += ["reward/mean", "reward/std", "response/length_mean", "response/eos_fraction"]
    for entry in logged:
        assert all(math.isfinite(entry[key]) for key in keys), entry
        assert 1 <= entry["response/length_mean"] <= 16


def test_reference_is_the_frozen_sft_adapter(ppo_run: tuple, models: tuple[Path, Path]) -> None:
    trainer, _, _ = ppo_run
    # At the first rollout the policy is the SFT policy; a reference that were the bare base would show a large KL.
    assert abs(updates(trainer.state.log_history)[0]["objective/kl"]) < 1e-2
    sft = load_file(models[0] / "adapter_model.safetensors")
    reference = {k: v for k, v in trainer.policy.state_dict().items() if f".{REFERENCE_ADAPTER}." in k}
    assert len(reference) == len(sft)
    for key, value in sft.items():
        name = key.replace(".weight", f".{REFERENCE_ADAPTER}.weight")
        assert torch.equal(reference[name].cpu(), value), key


def test_policy_lora_and_value_model_changed(ppo_run: tuple, models: tuple[Path, Path]) -> None:
    _, output_dir, _ = ppo_run
    sft = load_file(models[0] / "adapter_model.safetensors")
    trained = load_file(output_dir / "adapter_model.safetensors")
    assert sorted(trained) == sorted(sft)  # only the policy adapter is saved, under the SFT adapter's names
    assert all(not torch.equal(trained[k], sft[k]) for k in sft if "lora_B" in k)
    rm = load_file(models[1] / "adapter_model.safetensors")
    value = load_file(output_dir / f"checkpoint-{UPDATES}" / "value_model" / "adapter_model.safetensors")
    assert sorted(value) == sorted(rm)
    assert any(not torch.equal(value[k], rm[k]) for k in rm if "score" in k)
    assert any(not torch.equal(value[k], rm[k]) for k in rm if "lora_B" in k)


def test_outputs_saved_and_adapter_reloads(ppo_run: tuple, demo_dir: Path) -> None:
    trainer, output_dir, wandb_dir = ppo_run
    summary = json.loads((output_dir / "run_complete.json").read_text())
    metrics = summary["metrics"]
    for key in ("eval/gsm8k/accuracy", "before/eval/gsm8k/accuracy", "train/objective/kl", "train/reward/mean"):
        assert key in metrics and math.isfinite(metrics[key]), key
    for step in (2, UPDATES):
        checkpoint = output_dir / f"checkpoint-{step}"
        for name in (
            "adapter_model.safetensors",
            "optimizer.pt",
            "scheduler.pt",
            "rng_state.pth",
            "trainer_state.json",
        ):
            assert (checkpoint / name).is_file(), checkpoint / name
    assert list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    reloaded = PeftModel.from_pretrained(load_4bit(demo_dir / "base"), output_dir).eval()
    inputs = tokenizer(["Question: Tom has 3 apples and buys 4 more. How many apples?"], return_tensors="pt")
    policy = trainer.policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, policy(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_resume_continues_at_the_right_step(
    ppo_run: tuple, demo_dir: Path, models: tuple[Path, Path], tmp_path: Path
) -> None:
    """An interrupted run (checkpoint-2 of 4, plus a checkpoint-3 cut short while saving) resumes from
    checkpoint-2, runs updates 3 and 4 only, saves where the uninterrupted run saved (save_steps 0.5 of all 4
    updates: 4, not every update of the 2 left) and ends where the uninterrupted run ended, bit for bit."""
    full_trainer, full_dir, _ = ppo_run
    output_dir = tmp_path / "run"
    shutil.copytree(full_dir / "checkpoint-2", output_dir / "checkpoint-2")
    (output_dir / "checkpoint-3").mkdir()  # a save that never finished: no trainer_state.json

    trainer = main(ppo_args(demo_dir, *models, output_dir))
    assert trainer.resumed_at == 2
    assert trainer.state.global_step == UPDATES
    assert [entry["step"] for entry in updates(trainer.state.log_history)] == list(range(1, UPDATES + 1))
    assert not (output_dir / "checkpoint-3" / "trainer_state.json").exists()  # no save at 3
    state = json.loads((output_dir / f"checkpoint-{UPDATES}" / "trainer_state.json").read_text())
    assert state["global_step"] == UPDATES and state["episode"] == 4 * UPDATES
    # the same log (training metrics, evaluations) at the same steps as the uninterrupted run
    steps = lambda history: [(e["step"], sorted(k for k in e if k != "step")) for e in history]  # noqa: E731
    assert steps(trainer.state.log_history) == steps(full_trainer.state.log_history)
    for ours, theirs in zip(updates(trainer.state.log_history), updates(full_trainer.state.log_history)):
        assert ours == theirs
    resumed = load_file(output_dir / "adapter_model.safetensors")
    uninterrupted = load_file(full_dir / "adapter_model.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    value = f"checkpoint-{UPDATES}/value_model/adapter_model.safetensors"
    resumed, uninterrupted = load_file(output_dir / value), load_file(full_dir / value)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_resume_with_other_batch_settings_is_refused(
    ppo_run: tuple, demo_dir: Path, models: tuple[Path, Path], tmp_path: Path
) -> None:
    _, full_dir, _ = ppo_run
    shutil.copytree(full_dir / "checkpoint-2", tmp_path / "run" / "checkpoint-2")
    with pytest.raises(ConfigError, match=f"belongs to a run of {UPDATES} PPO updates of 4 rollouts, this config gives "
                       f"{2 * UPDATES} of 4"):  # fmt: skip
        main(ppo_args(demo_dir, *models, tmp_path / "run", "--total_episodes", str(8 * UPDATES)))
    with pytest.raises(ConfigError, match=f"this config gives {UPDATES // 2} of 8"):
        main(ppo_args(demo_dir, *models, tmp_path / "run", "--per_device_train_batch_size", "8"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-2"]  # nothing written, nothing lost


def test_finished_run_is_not_overwritten(ppo_run: tuple, demo_dir: Path, models: tuple[Path, Path]) -> None:
    _, output_dir, _ = ppo_run
    before = (output_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputDirError, match="finished run"):
        main(ppo_args(demo_dir, *models, output_dir))
    assert (output_dir / "adapter_model.safetensors").read_bytes() == before


def test_first_update_with_learning_rate_zero_leaves_the_policy_unchanged(
    demo_dir: Path, models: tuple[Path, Path], tmp_path: Path
) -> None:
    """Before any step the policy is the reference (KL exactly 0) and the ratio p / p_old is 1; with lr 0 the
    optimizer step moves nothing, so the saved adapter is the SFT adapter, bit for bit."""
    output_dir = tmp_path / "run"
    extra = ["--learning_rate", "0", "--total_episodes", "4", "--eval_tasks", "", "--num_sample_generations", "0",
             "--report_to", "none", "--num_ppo_epochs", "2"]  # fmt: skip
    trainer = main(ppo_args(demo_dir, *models, output_dir, *extra))
    (logged,) = updates(trainer.state.log_history)
    assert logged["objective/kl"] == 0.0 and logged["objective/non_score_reward"] == 0.0
    assert logged["val/ratio"] == 1.0 and logged["policy/approxkl_avg"] == 0.0 and logged["policy/clipfrac_avg"] == 0
    sft = load_file(models[0] / "adapter_model.safetensors")
    trained = load_file(output_dir / "adapter_model.safetensors")
    assert sorted(trained) == sorted(sft) and all(torch.equal(trained[k], sft[k]) for k in sft)


def test_shared_base_scores_like_separate_models(demo_dir: Path, models: tuple[Path, Path], tmp_path: Path) -> None:
    """Policy, reference, value model and two reward models on one 4-bit base give the numbers (float32) of the
    same models loaded each on its own base, with a quarter of the 4-bit layers."""
    from bitsandbytes.nn import Linear4bit

    from recipes.common.config import parse_config
    from recipes.common.reward import last_token_scores, load_reward_model
    from recipes.ppo.modeling import load_ppo_models
    from recipes.ppo.rewards import PromptTable, load_reward_models
    from recipes.ppo.train import CONFIG_TYPES
    from recipes.ppo.trainer import model_inputs

    sft_dir, rm_dir = models
    safety_dir = make_reward_model(demo_dir / "base", tmp_path / "rm-safety", seed=2)
    argv = ppo_args(demo_dir, sft_dir, rm_dir, tmp_path / "out", "--reward_source", "reward_model",
                    "--reward_model_path", str(rm_dir), "--safety_reward_model_path", str(safety_dir),
                    "--reward_whitening", "none")  # fmt: skip
    _, training_args, model_args, ppo_args_ = parse_config(CONFIG_TYPES, argv)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir, padding_side="left")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False) for q in ("What is 2+3?", "Tom has 3 apples.")]  # fmt: skip
    queries = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    responses = tokenizer(["2+3=5\n#### 5</s>", "#### 3"], add_special_tokens=False, padding=True,
                          padding_side="right", return_tensors="pt")  # fmt: skip
    inputs = model_inputs(queries["input_ids"], queries["attention_mask"], responses["input_ids"],
                          responses["attention_mask"])  # fmt: skip

    numbers, layers = {}, {}
    for share in (True, False):
        ppo_args_.share_base = share
        loaded = load_ppo_models(model_args, str(rm_dir), share, gradient_checkpointing=False)
        rms = load_reward_models(tokenizer, PromptTable(), training_args, ppo_args_, model_args, loaded.shared)
        with torch.no_grad():
            numbers[share] = {
                "policy": loaded.policy(input_ids=inputs[0], attention_mask=inputs[1], position_ids=inputs[2]).logits,
                "values": loaded.value(*inputs) * inputs[1],
                **rms.raw_scores(inputs[0], inputs[1]),
            }
            with loaded.shared.use(loaded.reference_adapter):
                numbers[share]["reference"] = loaded.policy(
                    input_ids=inputs[0], attention_mask=inputs[1], position_ids=inputs[2]
                ).logits
        modules = [loaded.policy, loaded.value, rms.helpfulness, rms.safety]
        layers[share] = len({id(m) for model in modules for m in model.modules() if isinstance(m, Linear4bit)})
        assert loaded.value.is_shared == share
    for name, value in numbers[False].items():
        torch.testing.assert_close(numbers[True][name].float(), value.float(), rtol=1e-5, atol=1e-5, msg=name)
    assert layers[False] == 4 * layers[True]
    # PPO's reward: whitened over the batch, and the RM's own score kept for the logs (reward/rm_score_mean)
    from recipes.common.reward import RewardCombination
    from recipes.ppo.rewards import PPOReward

    rms.combination = RewardCombination(whitening="batch")
    reward = PPOReward("reward_model", tokenizer, PromptTable(), rms)
    query_mask = queries["attention_mask"]
    scores = reward(queries["input_ids"], query_mask, responses["input_ids"], responses["attention_mask"])
    combined = reward.last["rm_score"]
    torch.testing.assert_close(scores, (combined - combined.mean()) / (combined.std() + 1e-8), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(combined, scores)  # the logged score is the RM's scale, not the whitened one
    # and the separately loaded RM is what the reward recipe's loader gives
    separate, _ = load_reward_model(str(safety_dir))
    torch.testing.assert_close(numbers[True]["safety"], last_token_scores(separate, inputs[0], inputs[1]),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_a_few_updates_raise_the_demo_reward(demo_dir: Path, tmp_path: Path) -> None:
    """From the demo's pretrained base (a fresh LoRA), on its math problems as raw text ("Question: ...\\nAnswer:"),
    the GSM8K-grader reward rises within 8 updates of 16 rollouts: the base works problems out but often runs on
    past the answer into another question; PPO learns to stop (measured, seeded: 0.5, 0.69 -> 0.88, 0.81, 0.75 over the
    last three; the threshold leaves room for other CPUs' kernels)."""
    data = tmp_path / "math"
    data.mkdir()
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (demo_dir / "data" / "math" / f"{split}.jsonl").read_text().splitlines()]
        (data / f"{split}.jsonl").write_text("".join(
            json.dumps({"prompt": f"Question: {row['question']}\nAnswer:", "answer": row["answer"]}) + "\n"
            for row in rows[:128]
        ))  # fmt: skip
    trainer = main([
        "--config", str(REPO_ROOT / "recipes" / "ppo" / "config.yaml"),
        "--model_name_or_path", str(demo_dir / "base"), "--dataset_name", str(data),
        "--output_dir", str(tmp_path / "run"), "--report_to", "none", "--eval_tasks", "",
        "--num_sample_generations", "0", "--save_strategy", "no",
        "--total_episodes", "128", "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1",
    ])  # fmt: skip
    rewards = [entry["reward/mean"] for entry in updates(trainer.state.log_history)]
    assert len(rewards) == 8
    assert sum(rewards[-3:]) / 3 > sum(rewards[:2]) / 2 + 0.15, rewards


def test_same_seed_same_run_with_a_fresh_value_model(demo_dir: Path, models: tuple[Path, Path], tmp_path: Path) -> None:
    """A fresh value adapter and head are drawn while the models load, before the trainer seeds; torch starts every
    process from another random state, so unseeded they differed run to run (a study's ppo_grader seed 0 gave
    0.297 and 0.516 on two clean runs). Two runs with one seed from different RNG states must agree."""
    first_updates = []
    for index, state in enumerate((1, 2)):
        torch.manual_seed(state)  # what a fresh process's random initial seed does
        args = [arg for arg in ppo_args(demo_dir, *models, tmp_path / f"run{index}") if arg != str(models[1])]
        args.remove("--value_model_path")  # the grader's reward, so the value model is fresh on the policy's base
        trainer = main([
            *args, "--total_episodes", "4", "--report_to", "none", "--eval_tasks", "", "--save_strategy", "no",
            "--num_sample_generations", "0",
        ])  # fmt: skip
        first_updates.append(updates(trainer.state.log_history)[0])
    assert first_updates[0]["val/mean"] == first_updates[1]["val/mean"], first_updates
    assert first_updates[0]["loss/value_avg"] == first_updates[1]["loss/value_avg"], first_updates
