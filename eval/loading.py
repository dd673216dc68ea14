"""Loading a causal LM to evaluate: a local directory or hub id, optionally 4-bit NF4, optionally with a LoRA adapter.

`trust_remote_code` is always False. CPU unless CUDA is available.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from eval.data import EvalError
from recipes.common.config import QLoRAModelConfig
from recipes.common.modeling import check_model_path, keep_4bit_weights_unpacked, quantization_kwargs, set_pad_token
from recipes.common.policy import adapter_base


def resolve_device(device: str | None = None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"Device {device!r} asked for, but CUDA is not available here; use `--device cpu`.")
    return device


def four_bit_kwargs(device: str) -> dict[str, Any]:
    """`from_pretrained` kwargs for a 4-bit model on `device`: the recipes' settings (`quantization_kwargs`: NF4,
    double quantization, bitsandbytes checked first), computing in bf16 on CUDA and float32 on CPU (bitsandbytes runs
    both)."""
    compute_dtype = "bfloat16" if device.startswith("cuda") else "float32"
    kwargs = quantization_kwargs(QLoRAModelConfig(model_name_or_path="", load_in_4bit=True, dtype=compute_dtype))
    # quantization_kwargs places the model on the DDP rank's GPU; the evaluation runs one process, on `device`.
    kwargs["device_map"] = {"": device}
    return kwargs


def load_model_and_tokenizer(
    model: str,
    adapter: str | None = None,
    load_in_4bit: bool = False,
    device: str | None = None,
    dtype: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in eval mode and its tokenizer (from the adapter directory when it saved one: training may have
    changed the chat template or the pad token). `model` may itself be an adapter directory; its base is then read
    from adapter_config.json."""
    check_model_path(model, allow_adapter=True)
    model_path = Path(model).expanduser()
    if (
        adapter is None
        and (model_path / "adapter_config.json").is_file()
        and not (model_path / "config.json").is_file()
    ):
        adapter, model = model, adapter_base(model)
        check_model_path(model, what="adapter's base model")
    if adapter is not None:
        adapter_dir = Path(adapter).expanduser()
        if not (adapter_dir / "adapter_config.json").is_file():
            raise EvalError(
                f"Adapter directory {adapter!r} has no adapter_config.json: pass a directory saved by peft "
                "(`model.save_pretrained(dir)` on a PeftModel)."
            )
    device = resolve_device(device)
    kwargs = four_bit_kwargs(device) if load_in_4bit else {"trust_remote_code": False}
    # `--dtype` sets the unquantized weights' dtype, 4-bit or not ("auto": as saved).
    kwargs["dtype"] = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        loaded = keep_4bit_weights_unpacked(AutoModelForCausalLM.from_pretrained(model, **kwargs))
        tokenizer_source = model
        if adapter is not None:
            from peft import PeftModel

            loaded = PeftModel.from_pretrained(loaded, adapter)
            if (Path(adapter) / "tokenizer_config.json").is_file():
                tokenizer_source = adapter
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise EvalError(
            f"Could not load model {model!r}{f' with adapter {adapter!r}' if adapter else ''}: "
            f"{type(err).__name__}: {err}. Pass a local directory saved with save_pretrained, or a hub id with hub "
            "access allowed (unset HF_HUB_OFFLINE)."
        ) from err
    if not load_in_4bit:
        loaded = loaded.to(device)
    # The project's one padding policy; generation only, so EOS will do if nothing else.
    set_pad_token(tokenizer, name=tokenizer_source, eos_fallback=True)
    return loaded.eval(), tokenizer
