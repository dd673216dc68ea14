"""SFT end to end on the tiny demo model with real 4-bit QLoRA (bitsandbytes on CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from recipes.common.modeling import keep_4bit_weights_unpacked
from recipes.common.outputs import OutputDirError
from recipes.sft.train import main

REPO_ROOT = Path(__file__).resolve().parents[2]


def sft_args(demo_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO_ROOT / "recipes" / "sft" / "config.yaml"),
        "--model_name_or_path", str(demo_dir / "base"),
        "--dataset_name", str(demo_dir / "data" / "sft"),
        "--eval_gsm8k_path", str(demo_dir / "data" / "math" / "test.jsonl"),
        "--output_dir", str(output_dir),
        "--max_steps", "12", "--logging_steps", "2", "--eval_steps", "6", "--save_steps", "6",
        "--learning_rate", "2e-3", "--max_train_samples", "192", "--max_eval_samples", "16",
        "--eval_num_samples", "8", "--eval_max_new_tokens", "32",
        *extra,
    ]  # fmt: skip


def load_4bit(path: Path) -> torch.nn.Module:
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32)
    return keep_4bit_weights_unpacked(model)  # as the recipes load it: no bf16 repacking on AVX512-BF16 CPUs


@pytest.fixture(scope="module")
def sft_run(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    output_dir = tmp_path_factory.mktemp("sft") / "run"
    wandb_dir = tmp_path_factory.mktemp("sft-wandb")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_DIR", str(wandb_dir))
        trainer = main(sft_args(demo_dir, output_dir))
    return trainer, output_dir, wandb_dir


def test_loss_finite_and_falling(sft_run: tuple) -> None:
    trainer, _, _ = sft_run
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) >= 4 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2


def test_model_is_4bit_and_only_lora_trains(sft_run: tuple, demo_dir: Path) -> None:
    trainer, _, _ = sft_run
    model = trainer.model
    assert getattr(model, "is_loaded_in_4bit", False) or model.base_model.model.is_loaded_in_4bit
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # LoRA B starts at zero: non-zero now means the adapter learned.
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert all(p.abs().sum() > 0 for p in lora_b)
    # The frozen 4-bit base is bit-identical to a fresh load of the same checkpoint.
    fresh = load_4bit(demo_dir / "base")
    fresh_state = fresh.state_dict()
    for name, tensor in model.base_model.model.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(tensor.cpu(), fresh_state[key].cpu()), name


def test_adapter_reloads_with_same_logits(sft_run: tuple, demo_dir: Path) -> None:
    trainer, output_dir, _ = sft_run
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert (output_dir / "run_complete.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    reloaded = PeftModel.from_pretrained(load_4bit(demo_dir / "base"), output_dir).eval()
    inputs = tokenizer(["Question: Tom has 3 apples and buys 4 more. How many apples?"], return_tensors="pt")
    # TRL keeps QLoRA adapter weights in bf16 (and so runs the LoRA matmuls in bf16); peft reloads the same values
    # into float32. Compare like with like: the trained adapter's values in float32 must give the reloaded logits.
    trained = [param for param in trainer.model.parameters() if param.requires_grad]
    assert trained and all(param.dtype == torch.bfloat16 for param in trained)
    for param in trained:
        param.data = param.data.float()
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**inputs).logits
        actual = reloaded(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_wandb_offline_run_written(sft_run: tuple) -> None:
    _, _, wandb_dir = sft_run
    runs = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert runs, "no offline W&B run file"


def test_finished_run_is_not_overwritten(sft_run: tuple, demo_dir: Path) -> None:
    _, output_dir, _ = sft_run
    before = (output_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputDirError, match="finished run"):
        main(sft_args(demo_dir, output_dir))
    assert (output_dir / "adapter_model.safetensors").read_bytes() == before
