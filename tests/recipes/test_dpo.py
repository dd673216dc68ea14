"""DPO end to end on the tiny demo model with real 4-bit QLoRA, starting from an SFT adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from recipes.common.config import ConfigError, QLoRAModelConfig
from recipes.common.data import DataError
from recipes.common.modeling import load_model
from recipes.common.outputs import OutputDirError, mark_finished
from recipes.common.policy import load_policy
from recipes.dpo.train import main

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_sft_adapter(base_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A stand-in for the SFT recipe's output (a LoRA adapter + tokenizer + run_complete.json), with random non-zero
    LoRA B so that the SFT policy differs from the base: a reference that were the base would show."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    mark_finished(str(out_dir), {"stage": "sft", "metrics": {}})
    return out_dir


def dpo_args(demo_dir: Path, sft_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO_ROOT / "recipes" / "dpo" / "config.yaml"),
        "--model_name_or_path", str(sft_dir), "--parent_run", str(sft_dir),
        "--dataset_name", str(demo_dir / "data" / "preferences"),
        "--eval_gsm8k_path", str(demo_dir / "data" / "math" / "test.jsonl"),
        "--output_dir", str(output_dir),
        "--max_steps", "4", "--logging_steps", "1", "--eval_steps", "2", "--save_steps", "4",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--learning_rate", "5e-3",
        "--max_train_samples", "32", "--max_eval_samples", "8", "--max_length", "128",
        "--eval_tasks", "gsm8k", "length", "--eval_num_samples", "4", "--eval_max_new_tokens", "16",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def sft_dir(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sft_adapter(demo_dir / "base", tmp_path_factory.mktemp("dpo-sft") / "sft")


@pytest.fixture(scope="module")
def dpo_run(demo_dir: Path, sft_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    output_dir = tmp_path_factory.mktemp("dpo") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_DIR", str(tmp_path_factory.mktemp("dpo-wandb")))
        trainer = main(dpo_args(demo_dir, sft_dir, output_dir))
    return trainer, output_dir


def test_preference_metrics_logged_and_finite(dpo_run: tuple) -> None:
    trainer, _ = dpo_run
    history = trainer.state.log_history
    train_logs = [e for e in history if "loss" in e]
    assert len(train_logs) == 4
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "entropy"):
        assert all(math.isfinite(e[key]) for e in train_logs), key
    assert any(e["rewards/margins"] != 0 for e in train_logs)
    evals = [e for e in history if "eval_rewards/margins" in e]
    assert evals and all(math.isfinite(e["eval_loss"]) for e in evals)
    kl = [e["eval/kl/per_token"] for e in history if "eval/kl/per_token" in e]
    assert len(kl) >= 2 and all(math.isfinite(v) and v >= 0 for v in kl) and kl[-1] > 0  # the policy moved
    assert any("eval/gsm8k/accuracy" in e for e in history)  # the evaluation suite ran during training


def test_sft_adapter_trained_and_saved(dpo_run: tuple, sft_dir: Path, demo_dir: Path) -> None:
    trainer, output_dir = dpo_run
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".default." in n for n in trainable)
    saved = load_file(output_dir / "adapter_model.safetensors")
    start = load_file(sft_dir / "adapter_model.safetensors")
    assert saved.keys() == start.keys()
    assert any(not torch.equal(saved[k].float(), start[k].float()) for k in saved)  # LoRA weights changed
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == demo_dir / "base"  # same layout as the SFT output
    assert not (output_dir / "ref").exists()  # the frozen reference copy is not part of the output
    finished = json.loads((output_dir / "run_complete.json").read_text())
    assert finished["stage"] == "dpo" and math.isfinite(finished["metrics"]["train/train_loss"])
    assert list(Path(finished["wandb"]).glob("run-*.wandb"))


def test_finished_run_is_not_overwritten(dpo_run: tuple, demo_dir: Path, sft_dir: Path) -> None:
    _, output_dir = dpo_run
    before = (output_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputDirError, match="finished run"):
        main(dpo_args(demo_dir, sft_dir, output_dir))
    assert (output_dir / "adapter_model.safetensors").read_bytes() == before


def first_batch_loss(trainer: DPOTrainer) -> tuple[float, float]:
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    return loss, trainer._metrics["train"]["rewards/margins"][-1]


def test_reference_is_the_sft_policy_without_a_second_model(demo_dir: Path, sft_dir: Path, tmp_path: Path) -> None:
    """The built-in reference (the SFT adapter, frozen, on the policy's own 4-bit base) gives the same first-step
    loss as an explicit reference model (a second 4-bit base with the SFT adapter); the base alone does not."""
    model_args = QLoRAModelConfig(model_name_or_path=str(sft_dir), dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    pairs = load_dataset("json", data_files=str(demo_dir / "data" / "preferences" / "train.jsonl"), split="train")
    args = DPOConfig(output_dir=str(tmp_path), max_length=128, report_to=[], use_cpu=True, bf16=False, beta=0.5)
    pairs = pairs.select(range(6))

    def trainer(ref_model=None) -> DPOTrainer:
        policy, peft_config = load_policy(model_args)
        assert peft_config is None  # started from the SFT adapter: it is the trainable one
        return DPOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=pairs, processing_class=tokenizer)

    built_in = trainer()
    assert set(built_in.model.peft_config) == {"default", "ref"} and built_in.ref_model is None
    loss, margins = first_batch_loss(built_in)
    explicit_ref = PeftModel.from_pretrained(load_model(model_args, model_name_or_path=str(demo_dir / "base")), sft_dir)
    # TRL >= 1.15 patches the reference's forward with its fused LM head (`add_fused_lm_head(ref_model)`), which needs
    # the causal LM itself: pass the PeftModel's base model, which carries the injected LoRA layers (adapter active).
    explicit_loss, explicit_margins = first_batch_loss(trainer(ref_model=explicit_ref.get_base_model().eval()))
    assert loss == pytest.approx(explicit_loss, abs=1e-4)
    assert margins == pytest.approx(explicit_margins, abs=1e-3)
    base_ref = load_model(model_args, model_name_or_path=str(demo_dir / "base"))
    base_loss, _ = first_batch_loss(trainer(ref_model=base_ref))
    assert abs(base_loss - loss) > 1e-3  # the test can tell the SFT reference from the base


def test_loss_variants_train(demo_dir: Path, sft_dir: Path, tmp_path: Path) -> None:
    """IPO, robust DPO (label smoothing) and reference-free DPO, one short run each, without evaluation."""
    quick = ["--max_steps", "1", "--eval_strategy", "no", "--eval_tasks", "", "--save_steps", "1"]
    variants = {
        "ipo": ["--loss_type", "ipo"],
        "robust": ["--loss_type", "robust", "--label_smoothing", "0.1"],
        "reference_free": ["--reference_free", "true"],
    }
    for name, extra in variants.items():
        trainer = main(dpo_args(demo_dir, sft_dir, tmp_path / name, *quick, *extra))
        logs = [e for e in trainer.state.log_history if "loss" in e]
        assert logs and math.isfinite(logs[0]["loss"]), name
    assert trainer.precompute_ref_logps  # reference-free: reference log-probs are the zeros in the batch
    assert logs[0]["rewards/chosen"] == pytest.approx(0.1 * logs[0]["logps/chosen"], rel=1e-4)  # beta * log pi


def test_bad_input_fails_before_training(demo_dir: Path, sft_dir: Path, tmp_path: Path) -> None:
    no_pairs = tmp_path / "no_pairs.jsonl"
    no_pairs.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"needs one of: prompt\+chosen\+rejected \| chosen\+rejected"):
        main(dpo_args(demo_dir, sft_dir, out, "--dataset_name", str(no_pairs)))
    with pytest.raises(DataError, match=r"prompts have >= 8 tokens \(max_length\)"):
        main(dpo_args(demo_dir, sft_dir, out, "--max_length", "8"))
    with pytest.raises(ConfigError, match="label_smoothing=0.1 has no effect"):
        main(dpo_args(demo_dir, sft_dir, out, "--label_smoothing", "0.1"))
    assert not out.exists()  # nothing written, nothing lost
