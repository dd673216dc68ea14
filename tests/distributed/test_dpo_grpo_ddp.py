"""Two processes over gloo on CPU: DPO and GRPO run DDP from an SFT adapter, both ranks train, one adapter is saved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes.common.outputs import mark_finished

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def sft_dir(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in SFT adapter (random non-zero LoRA B) with the tokenizer, as the SFT recipe would save them."""
    out_dir = tmp_path_factory.mktemp("ddp-sft") / "sft"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo_dir / "base", dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(demo_dir / "base").save_pretrained(out_dir)
    mark_finished(str(out_dir), {"stage": "sft", "metrics": {}})
    return out_dir


def launch(recipe: str, port: int, args: list[str], tmp_path: Path) -> str:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port", str(port),
        str(REPO_ROOT / "recipes" / recipe / "train.py"),
        "--config", str(REPO_ROOT / "recipes" / recipe / "config.yaml"),
        "--eval_strategy", "no", "--eval_tasks", "", "--max_steps", "2", "--logging_steps", "1", "--save_steps", "2",
        *args,
    ]  # fmt: skip
    env = {**os.environ, "WANDB_DIR": str(tmp_path)}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "process 0 of 2" in log and "process 1 of 2" in log  # a real 2-rank run, not two single runs
    return log


def assert_trained(output_dir: Path, sft_dir: Path) -> None:
    assert (output_dir / "run_complete.json").is_file()
    saved = load_file(output_dir / "adapter_model.safetensors")
    start = load_file(sft_dir / "adapter_model.safetensors")
    assert any(not torch.equal(saved[k].float(), start[k].float()) for k in saved)


def test_dpo_two_process_gloo(demo_dir: Path, sft_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "dpo-ddp"
    args = [
        "--model_name_or_path", str(sft_dir), "--dataset_name", str(demo_dir / "data" / "preferences"),
        "--output_dir", str(output_dir), "--parent_run", str(sft_dir), "--max_train_samples", "16",
        "--per_device_train_batch_size", "4", "--max_length", "128", "--learning_rate", "5e-3",
    ]  # fmt: skip
    launch("dpo", 29563, args, tmp_path)
    assert_trained(output_dir, sft_dir)


def test_grpo_two_process_gloo(demo_dir: Path, sft_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "grpo-ddp"
    args = [
        "--model_name_or_path", str(sft_dir), "--dataset_name", str(demo_dir / "data" / "math"),
        "--output_dir", str(output_dir), "--parent_run", str(sft_dir), "--max_train_samples", "16",
        "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "16",
        "--reward_functions", "correctness", "length", "--reward_weights", "1", "1", "--learning_rate", "1e-2",
    ]  # fmt: skip
    log = launch("grpo", 29564, args, tmp_path)
    assert "'kl'" in log  # GRPO's metrics were logged
    assert_trained(output_dir, sft_dir)
