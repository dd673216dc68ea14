"""Two processes over gloo on CPU: PPO runs DDP with both ranks (one policy + value graph per micro-batch, gradients
all-reduced), whitens over both ranks' rollouts, and writes a checkpoint that holds both ranks' RNG states and the
value model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.distributed


def test_ppo_two_process_gloo(demo_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "ppo-ddp"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port", "29533",
        str(REPO_ROOT / "recipes" / "ppo" / "train.py"),
        "--config", str(REPO_ROOT / "recipes" / "ppo" / "config.yaml"),
        # a full model (not an adapter): a fresh LoRA, the reference is the base with adapters off
        "--model_name_or_path", str(demo_dir / "base"),
        "--dataset_name", str(demo_dir / "data" / "prompts"),
        "--output_dir", str(output_dir),
        "--total_episodes", "16", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
        "--local_rollout_forward_batch_size", "4", "--num_ppo_epochs", "1", "--response_length", "12",
        "--max_train_samples", "32", "--max_eval_samples", "8", "--per_device_eval_batch_size", "4",
        "--num_sample_generations", "1", "--save_steps", "2", "--eval_tasks", "",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_DIR": str(tmp_path)}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "process 0 of 2" in log and "process 1 of 2" in log  # a real 2-rank run, not two single runs
    assert "2 updates of 8 rollouts" in log  # 4 per rank
    checkpoint = output_dir / "checkpoint-2"
    for name in ("rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "value_model/adapter_model.safetensors"):
        assert (checkpoint / name).is_file(), name
    assert (output_dir / "adapter_model.safetensors").is_file()
    summary = json.loads((output_dir / "run_complete.json").read_text())
    assert summary["metrics"]["train/episode"] == 16
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["train_batch_size"] == 8
