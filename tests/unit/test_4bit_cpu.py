"""bitsandbytes' 4-bit CPU paths: the shapes every model we build must have, and one code path on every CPU.

On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit layer for another kernel the first time it runs in eval
mode without grad (see `recipes.common.modeling.keep_4bit_weights_unpacked`). These tests run that path where the CPU has the
feature; elsewhere the tests marked `packed_path` are skipped, saying so.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "scripts"))  # the `demo` package of scripts/prepare_demo.py

from demo.model import PretrainSettings, build_model  # noqa: E402
from demo.tokenizer import build_tokenizer  # noqa: E402

from eval.testing import build_char_tokenizer, build_tiny_model  # noqa: E402
from recipes.common.config import QLoRAModelConfig  # noqa: E402
from recipes.common.modeling import load_model  # noqa: E402

BLOCK = 64  # bitsandbytes' 4-bit block: the packed CPU kernel needs in_features to be a multiple of it
ROW_BLOCK = 32  # ... and out_features a multiple of its 32-row tile


def _has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


packed_path = pytest.mark.skipif(
    not _has_avx512bf16(), reason="this CPU lacks AVX512-BF16: bitsandbytes never takes its packed 4-bit path here"
)


def quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linear layers transformers quantizes: all but the output head (tied to the embeddings, kept full)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in ("lm_head", "score")
    }


def demo_models() -> dict[str, torch.nn.Module]:
    tokenizer = build_tokenizer(["Question: What is 2 + 3?\nAnswer: 2 + 3 = 5\n#### 5"] * 4)
    char_tokenizer = build_char_tokenizer()
    return {
        "demo base (scripts/demo/model.py)": build_model(tokenizer, PretrainSettings(), seed=0),
        "tiny test model (eval/testing.py)": build_tiny_model(char_tokenizer),
        "benchmark model (scripts/benchmarks/eval_speed.py)": build_tiny_model(
            char_tokenizer, hidden_size=128, num_layers=3
        ),
    }


@pytest.mark.parametrize("name", list(demo_models()))
def test_every_quantized_layer_fits_the_4bit_block(name: str) -> None:
    layers = quantized_linears(demo_models()[name])
    assert layers, "no linear layers found"
    misfits = {
        layer_name: (layer.in_features, layer.out_features)
        for layer_name, layer in layers.items()
        if layer.in_features % BLOCK or layer.out_features % ROW_BLOCK
    }
    assert not misfits, f"{name}: layers whose (in, out) features bitsandbytes' packed CPU kernel rejects: {misfits}"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama of the demo's shapes (hidden 128, intermediate 384), saved as a user's model would be."""
    tokenizer = build_tokenizer(["Question: What is 2 + 3?\nAnswer: 2 + 3 = 5\n#### 5"] * 4)
    model = build_model(tokenizer, PretrainSettings(), seed=0)
    path = tmp_path_factory.mktemp("tiny-4bit")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_4bit(path: Path) -> torch.nn.Module:
    """The recipes' loading: NF4 + double quantization, then peft's k-bit preparation."""
    model_args = QLoRAModelConfig(model_name_or_path=str(path), dtype="float32")
    return load_model(model_args)


def test_4bit_logits_are_the_same_in_eval_and_train_mode(tiny_model_dir: Path) -> None:
    model = load_4bit(tiny_model_dir)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    model.train()
    train_logits = model(input_ids=input_ids).logits.detach()
    model.eval()
    with torch.no_grad():  # what generation and evaluation do
        eval_logits = model(input_ids=input_ids).logits
    model.train()
    train_again = model(input_ids=input_ids).logits.detach()
    assert torch.isfinite(train_logits).all()
    assert torch.equal(eval_logits, train_logits)
    assert torch.equal(train_again, train_logits)


def test_gradient_reaches_the_first_layer_after_an_eval_pass(tiny_model_dir: Path) -> None:
    """QLoRA with an evaluation (or a PPO/GRPO rollout) between steps: the next backward must still reach layer 0."""
    from peft import LoraConfig, get_peft_model

    def first_layer_grad(run_eval_first: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = get_peft_model(
            load_4bit(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        )
        input_ids = torch.arange(3, 27).unsqueeze(0)
        if run_eval_first:
            model.eval()
            with torch.no_grad():
                model.generate(input_ids=input_ids[:, :8], max_new_tokens=4, do_sample=False)
        model.train()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        lora_a = dict(model.named_parameters())[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
        ]
        return lora_a.grad.clone()

    fresh, after_eval = first_layer_grad(False), first_layer_grad(True)
    assert fresh.abs().sum() > 0
    torch.testing.assert_close(after_eval, fresh)


@packed_path
def test_bitsandbytes_packs_on_this_cpu_unless_told_not_to(tiny_model_dir: Path) -> None:
    """The guard above is needed here: without it this CPU takes the packed path, which drops the input gradient."""
    import bitsandbytes as bnb

    from recipes.common.modeling import keep_4bit_weights_unpacked

    def layer() -> bnb.nn.Linear4bit:
        torch.manual_seed(0)
        return bnb.nn.Linear4bit(128, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")

    raw, guarded = layer(), keep_4bit_weights_unpacked(layer())
    x = torch.randn(4, 128)
    for module in (raw, guarded):
        module.eval()
        with torch.no_grad():
            module(x)
    assert getattr(raw.weight.quant_state, "packing_format_for_cpu", False)
    assert not getattr(guarded.weight.quant_state, "packing_format_for_cpu", False)
    for module in (raw, guarded):
        module.train()
    x_raw, x_guarded = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        raw(x_raw).sum().backward()
    guarded(x_guarded).sum().backward()
    assert x_raw.grad is None  # the silent failure the guard prevents
    assert x_guarded.grad is not None and x_guarded.grad.abs().sum() > 0
