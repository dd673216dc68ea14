"""Two processes over gloo on CPU: the SFT recipe runs DDP with both ranks and saves one adapter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.distributed


def test_sft_two_process_gloo(demo_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "sft-ddp"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port", "29517",
        str(REPO_ROOT / "recipes" / "sft" / "train.py"),
        "--config", str(REPO_ROOT / "recipes" / "sft" / "config.yaml"),
        "--model_name_or_path", str(demo_dir / "base"),
        "--dataset_name", str(demo_dir / "data" / "sft"),
        "--output_dir", str(output_dir),
        "--max_steps", "3", "--eval_strategy", "no", "--save_steps", "3", "--eval_tasks", "",
        "--max_train_samples", "128",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_DIR": str(tmp_path)}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "process 0 of 2" in log and "process 1 of 2" in log  # a real 2-rank run, not two single runs
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert (output_dir / "run_complete.json").is_file()
