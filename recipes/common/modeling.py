"""Model and tokenizer loading: 4-bit NF4 QLoRA by default, full precision by config, CPU or GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from trl import ModelConfig, get_quantization_config

from eval.loading import keep_4bit_weights_unpacked
from recipes.common.errors import UserError

GENERATION_MARKER = "{% generation %}"


class ModelLoadError(UserError):
    """A model/tokenizer problem the user must fix; the message says what, where and how."""


def check_model_path(model_name_or_path: str | None) -> str:
    if not model_name_or_path:
        raise ModelLoadError("No model given: set `model_name_or_path` (a hub id or a local directory).")
    path = Path(model_name_or_path).expanduser()
    # Hub ids are `name` or `org/name`; deeper nesting or a leading ./ / ~ means a local directory.
    # An existing directory is what transformers loads first, whatever its name looks like.
    looks_local = model_name_or_path.startswith((".", "/", "~")) or model_name_or_path.count("/") >= 2 or path.is_dir()
    if looks_local and not (path / "config.json").is_file():
        hint = " Run `python scripts/prepare_demo.py` first." if "outputs/demo" in model_name_or_path else ""
        raise ModelLoadError(f"Model path {model_name_or_path!r} has no config.json (not a saved HF model).{hint}")
    return model_name_or_path


def check_4bit_supported(model_args: ModelConfig) -> None:
    """Fail before any work when 4-bit is asked for but bitsandbytes cannot run here."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return
    fix = "Install `bitsandbytes>=0.48` (it runs 4-bit on CPU and CUDA), or set `load_in_4bit: false`."
    try:
        import bitsandbytes.functional as bnb_functional
    except Exception as err:  # ImportError, or a broken native library
        raise ModelLoadError(f"4-bit loading needs bitsandbytes, which failed to import: {err}. {fix}") from err
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:  # a tiny round trip finds a missing native backend now rather than after the model loads
        probe = torch.randn(64, 64, device=device)
        packed, state = bnb_functional.quantize_4bit(probe, quant_type=model_args.bnb_4bit_quant_type)
        bnb_functional.dequantize_4bit(packed, state)
    except Exception as err:
        raise ModelLoadError(f"bitsandbytes cannot run 4-bit on {device}: {err}. {fix}") from err


def load_tokenizer(
    model_args: ModelConfig,
    require_chat_template: bool = True,
    require_generation_markers: bool = False,
    padding_side: str = "right",
) -> PreTrainedTokenizerBase:
    """Load the tokenizer and check what training needs: a pad token, an EOS, a chat template."""
    name = check_model_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name, revision=model_args.model_revision, trust_remote_code=False)
    tokenizer.padding_side = padding_side
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"Tokenizer of {name!r} has no EOS token; set one (tokenizer.eos_token) and save it.")
    if tokenizer.pad_token is None:
        # Padding with EOS is the usual fallback; TRL masks padding by attention mask, so EOS still gets learned.
        tokenizer.pad_token = tokenizer.eos_token
    check_chat_template(tokenizer, name, require_chat_template, require_generation_markers)
    return tokenizer


def check_chat_template(
    tokenizer: PreTrainedTokenizerBase, name: str, require_chat_template: bool, require_generation_markers: bool
) -> None:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one is what training uses
        template = template.get("default")
    if require_chat_template and not template:
        raise ModelLoadError(
            f"Tokenizer of {name!r} has no chat template, but the data is conversational. Use an instruct "
            "model's tokenizer, set `chat_template_path` to a Jinja file, or use a plain-text dataset."
        )
    if require_generation_markers and (not template or GENERATION_MARKER not in template):
        # TRL swaps in a training template with the markers for the model families it knows (Llama 3, Qwen, ...).
        from trl.chat_template_utils import get_training_chat_template

        try:
            known_family = template is not None and get_training_chat_template(tokenizer) is not None
        except Exception:
            known_family = False
        if not known_family:
            raise ModelLoadError(
                f"`assistant_only_loss: true` needs `{{% generation %}}`/`{{% endgeneration %}}` around the assistant "
                f"turn in the chat template of {name!r}; it has none and TRL has no training template for this model "
                "family. Set `chat_template_path` to a template with those markers, or use `assistant_only_loss: "
                "false` (prompt-completion data gets completion-only loss anyway)."
            )


def quantization_kwargs(model_args: ModelConfig) -> dict[str, Any]:
    """`from_pretrained` kwargs for the configured precision (4-bit NF4 + double quant by default)."""
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": model_args.model_revision, "trust_remote_code": False}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        check_4bit_supported(model_args)
        kwargs["quantization_config"] = quantization_config
        if torch.cuda.is_available():  # each DDP rank keeps its quantized copy on its own GPU
            kwargs["device_map"] = {"": PartialState().local_process_index}
    return kwargs


def load_model(
    model_args: ModelConfig,
    gradient_checkpointing: bool = False,
    num_labels: int | None = None,
    model_name_or_path: str | None = None,
) -> PreTrainedModel:
    """Load a causal LM (or, with `num_labels`, a sequence-classification reward model) ready for (Q)LoRA.

    A 4-bit model goes through peft's `prepare_model_for_kbit_training`: norms and heads in float32, input grads on.
    The trainer adds the LoRA adapter from `trl.get_peft_config(model_args)`.
    """
    name = check_model_path(model_name_or_path or model_args.model_name_or_path)
    kwargs = quantization_kwargs(model_args)
    if num_labels is None:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels, **kwargs)
    keep_4bit_weights_unpacked(model)  # one 4-bit code path on every CPU (see its docstring)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return model


def describe_precision(model: PreTrainedModel) -> str:
    if getattr(model, "is_loaded_in_4bit", False):
        return "4-bit NF4 (QLoRA)"
    if getattr(model, "is_loaded_in_8bit", False):
        return "8-bit"
    return str(next(model.parameters()).dtype).replace("torch.", "")


def merge_adapter_into_base(model_args: ModelConfig, adapter_dir: str, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Merge a LoRA adapter into a fresh bf16 copy of the base (merging into 4-bit weights would lose precision)."""
    from peft import PeftModel

    name = check_model_path(model_args.model_name_or_path)
    base = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, revision=model_args.model_revision)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    out_dir = Path(adapter_dir) / "merged"
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
    return out_dir
