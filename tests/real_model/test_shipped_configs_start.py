"""Every shipped real-model config starts and trains: a config that cannot start fails here, not on a GPU.

Each `recipes/<stage>/{qwen,llama}*.yaml` runs as shipped, with only these changes: the hub model is the SmolLM2
stand-in dressed as the config's family (conftest.py), hub datasets are a few local rows in the same format, an
upstream run the config names (`outputs/llama31-8b-sft`, the reward models) is the run of its own shipped config
here, and `CUT` shrinks sizes and sets float32 on CPU. Checks: the run finished, its losses are finite and its
trainable weights changed (and, for SFT, the saved tokenizer keeps the family's own template and a distinct pad).
"""

from __future__ import annotations

import importlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "unit" / "chat_template_fixtures"
pytestmark = [pytest.mark.real_model, pytest.mark.slow]

# Sizes cut to a step or two, float32 on CPU (TRL's bf16 needs a GPU); every other key is the shipped one. Batch
# sizes of generation stay as shipped: on CPU a 4-bit forward costs about the same for 1 or 16 sequences.
CUT: dict[str, Any] = {
    "bf16": False,
    "use_cpu": True,
    "dtype": "float32",
    "max_steps": 1,
    "warmup_steps": 0,  # a warm-up starts at learning rate 0: one step would change nothing
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_eval_samples": 2,
    "eval_num_samples": 1,
    "eval_max_new_tokens": 4,
}
STAGE_CUT: dict[str, dict[str, Any]] = {
    "sft": {"max_length": 64},
    "reward": {"max_length": 128},
    "dpo": {"max_length": 128},
    # one prompt x the shipped 8 completions, long enough to finish: rewards that differ, hence a gradient
    "grpo": {"per_device_train_batch_size": 8, "max_completion_length": 24},
    "ppo": {
        "total_episodes": 2,
        "num_ppo_epochs": 1,
        "num_mini_batches": 1,
        "local_rollout_forward_batch_size": 2,
        "response_length": 8,
        "num_sample_generations": 0,
    },
    "rejection_sampling": {
        "num_rounds": 1,
        "temperatures": [1.0],
        "num_samples": 4,
        "max_new_tokens": 24,  # samples cut by the limit are dropped (keep_truncated: false)
        "max_train_samples": 4,
    },
}
SHIPPED = sorted(
    str(path.relative_to(REPO_ROOT / "recipes"))
    for pattern in ("*/qwen*.yaml", "*/llama*.yaml")
    for path in (REPO_ROOT / "recipes").glob(pattern)
)
# Upstream runs named by the configs (their output_dir) -> the shipped config that produces them.
UPSTREAM = {
    "outputs/llama31-8b-sft": "sft/llama31_8b_qlora.yaml",
    "outputs/qwen25-7b-sft": "sft/qwen25_7b_qlora.yaml",
    "outputs/llama31-8b-reward": "reward/llama31_8b_qlora.yaml",
    "outputs/llama31-8b-reward-safety": "reward/llama31_8b_safety_qlora.yaml",
}


def as_cli(options: dict[str, Any]) -> list[str]:
    args = []
    for key, value in options.items():
        values = value if isinstance(value, list) else [value]
        args += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return args


@pytest.fixture(scope="module")
def run_shipped(
    qwen_standin: Path, llama_standin: Path, hub_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], tuple[Path, dict[str, Any]]]:
    """Run a shipped config once (memoised: upstream runs serve their own test and their downstream configs)."""
    done: dict[str, tuple[Path, dict[str, Any]]] = {}

    def local(key: str, value: Any) -> Any:
        if not isinstance(value, str) or key == "output_dir":  # replaced below
            return value
        if value.startswith("Qwen/"):
            return qwen_standin
        if value.startswith("meta-llama/"):
            return llama_standin
        if value in UPSTREAM:
            return run(UPSTREAM[value])[0]
        return hub_data.get(value, value)

    def run(config: str) -> tuple[Path, dict[str, Any]]:
        if config not in done:
            stage = config.split("/")[0]
            shipped = yaml.safe_load((REPO_ROOT / "recipes" / config).read_text())
            swapped = {key: local(key, value) for key, value in shipped.items()}
            swapped = {key: value for key, value in swapped.items() if value is not shipped[key]}
            output_dir = tmp_path_factory.mktemp(config.replace("/", "-").removesuffix(".yaml")) / "run"
            options = {**swapped, **CUT, **STAGE_CUT.get(stage, {}), "output_dir": output_dir}
            main = importlib.import_module(f"recipes.{stage}.train").main
            start = time.monotonic()
            main(["--config", str(REPO_ROOT / "recipes" / config), *as_cli(options)])
            print(f"[real_model] {config}: {time.monotonic() - start:.0f} s", flush=True)
            done[config] = output_dir, shipped
        return done[config]

    return run


def test_every_shipped_config_is_covered() -> None:
    assert len(SHIPPED) >= 13 and "sft/llama31_8b_qlora.yaml" in SHIPPED


def check_trained(output_dir: Path, shipped: dict[str, Any], start: Path | None) -> None:
    assert (output_dir / "run_complete.json").is_file()
    metrics = {}  # the run's, and for rejection sampling each round's training run (round_<k>/adapter)
    for finished in output_dir.rglob("run_complete.json"):
        metrics.update(json.loads(finished.read_text())["metrics"])
    losses = {k: v for k, v in metrics.items() if "loss" in k and isinstance(v, (int, float))}
    assert losses and all(math.isfinite(v) for v in losses.values()), metrics
    after = load_file(output_dir / "adapter_model.safetensors")
    lora_b = [name for name in after if "lora_B" in name]
    assert lora_b
    if start is None:  # a fresh LoRA: B starts at zero
        assert all(after[name].abs().sum() > 0 for name in lora_b)
    else:  # continuing the SFT adapter
        before = load_file(start / "adapter_model.safetensors")
        assert any(not torch.equal(after[name], before[name]) for name in lora_b)


@pytest.mark.parametrize("config", SHIPPED)
def test_shipped_config_starts_and_trains(config: str, run_shipped: Callable) -> None:
    output_dir, shipped = run_shipped(config)
    upstream = UPSTREAM.get(shipped["model_name_or_path"])
    start = run_shipped(upstream)[0] if upstream else None
    check_trained(output_dir, shipped, start)
    if config.startswith("sft/"):
        family = "llama3_1" if "llama" in config else "qwen2_5"
        saved = AutoTokenizer.from_pretrained(output_dir)
        assert saved.chat_template == (FIXTURES / f"{family}.jinja").read_text()  # for inference: the model's own
        assert saved.pad_token == ("<|finetune_right_pad_id|>" if family == "llama3_1" else "<|endoftext|>")
