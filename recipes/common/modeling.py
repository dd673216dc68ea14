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

from recipes.common.errors import UserError, demo_hint


class ModelLoadError(UserError):
    """A model/tokenizer problem the user must fix; the message says what, where and how."""


def check_model_path(model_name_or_path: str | None, what: str = "model", allow_adapter: bool = False) -> str:
    """Fail before any loading when a local model directory is missing or is not a saved HF model; returns the name.

    A hub id passes unchecked (transformers reports it). `what` names the model in the message ("reward model",
    "reference model", ...). `allow_adapter` also accepts a peft adapter directory (adapter_config.json, no
    config.json): the evaluation takes one wherever it takes a model, and reads its base from it.
    """
    if not model_name_or_path:
        raise ModelLoadError(
            f"No {what} given: name a hub id or a local directory (in a recipe config: `model_name_or_path`)."
        )
    path = Path(model_name_or_path).expanduser()
    # Hub ids are `name` or `org/name`; deeper nesting or a leading ./ / ~ means a local directory.
    # An existing path is what transformers loads first, whatever its name looks like.
    looks_local = model_name_or_path.startswith((".", "/", "~")) or model_name_or_path.count("/") >= 2 or path.exists()
    if not looks_local:
        return model_name_or_path
    if not path.is_dir():
        raise ModelLoadError(f"The {what} path {model_name_or_path!r} does not exist.{demo_hint(model_name_or_path)}")
    if (path / "config.json").is_file() or (allow_adapter and (path / "adapter_config.json").is_file()):
        return model_name_or_path
    if allow_adapter:
        raise ModelLoadError(
            f"The {what} path {model_name_or_path!r} holds no config.json or adapter_config.json: not a saved HF "
            "model or peft adapter (save with `model.save_pretrained(dir)`)."
        )
    raise ModelLoadError(
        f"The {what} path {model_name_or_path!r} has no config.json (not a saved HF model; save with "
        "`model.save_pretrained(dir)`)."
    )


def keep_4bit_weights_unpacked(model: torch.nn.Module) -> torch.nn.Module:
    """Keep every bitsandbytes 4-bit layer of `model` on its one quantized layout, on every CPU.

    On CPUs with AVX512-BF16, bitsandbytes (0.49+) repacks a 4-bit layer's weights for a faster kernel the first time
    the layer runs in eval mode without grad, and keeps them packed. That packing fails for in_features that are not a
    multiple of 64; it computes in bf16 (other logits than the training path's); and a packed layer passes no gradient
    to its input afterwards (`bitsandbytes::gemv_4bit` has no autograd kernel), so QLoRA training that evaluates or
    generates between steps (eval callbacks, PPO and GRPO rollouts) would silently lose the gradient through every
    frozen base layer. Measured: tests/unit/test_4bit_cpu.py. Returns `model`.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes.nn.Linear4bit
            module.support_avx512bf16_for_cpu = False
    return model


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
    padding_side: str = "right",
    pad_token: str | None = None,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer and check what training needs: an EOS, a pad token other than EOS (`set_pad_token`; the
    user's `pad_token` wins), a chat template for conversational data."""
    name = check_model_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name, revision=model_args.model_revision, trust_remote_code=False)
    tokenizer.padding_side = padding_side
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"Tokenizer of {name!r} has no EOS token; set one (tokenizer.eos_token) and save it.")
    set_pad_token(tokenizer, pad_token, name)
    check_chat_template(tokenizer, name, require_chat_template)
    return tokenizer


def check_chat_template(tokenizer: PreTrainedTokenizerBase, name: str, require_chat_template: bool) -> None:
    if require_chat_template and not default_chat_template(tokenizer):
        raise ModelLoadError(
            f"Tokenizer of {name!r} has no chat template, but the data is conversational. Use an instruct "
            "model's tokenizer, set `chat_template_path` to a Jinja file, or use a plain-text dataset."
        )


def default_chat_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one is what training uses
        template = template.get("default")
    return template


# ----------------------------------------------------------------------------------------------------------------
# Padding: one policy for every stage


# Distinct pad tokens of known families, tried in order when a tokenizer pads with EOS (or has no pad): Llama 3.1+,
# Qwen (and SmolLM2's unknown token), then common names and Llama 3.0's first reserved token.
KNOWN_PAD_TOKENS = (
    "<|finetune_right_pad_id|>",
    "<|endoftext|>",
    "<|pad|>",
    "<pad>",
    "[PAD]",
    "<|reserved_special_token_0|>",
)


def set_pad_token(
    tokenizer: PreTrainedTokenizerBase,
    pad_token: str | None = None,
    name: str = "the model",
    eos_fallback: bool = False,
) -> None:
    """Make `tokenizer` pad with a token of its vocabulary other than EOS; the one place that decides.

    Why not EOS: a sequence classifier reads its score at the last non-pad token (the final EOS would be skipped),
    and any mask built as `ids != pad` would hide the EOS that ends a user turn inside a prompt.
    - `pad_token` (the user's choice) wins; it must be in the vocabulary (the unknown token counts) and not be EOS.
    - A tokenizer that already pads with another token keeps it: the SFT (or reward) recipe saves its choice with the
      tokenizer, so every later stage inherits it.
    - Otherwise the first of `KNOWN_PAD_TOKENS` in the vocabulary, else the unknown token, is chosen (not BOS: PPO
      would mask a leading BOS away), and one printed line says so. None there: an error, or with `eos_fallback`
      (generation only, where the attention mask hides padding) padding with EOS.
    """
    vocab = tokenizer.get_vocab()
    eos = tokenizer.eos_token
    if pad_token is not None:
        if pad_token not in vocab:
            raise ModelLoadError(
                f"pad_token {pad_token!r} is not in the vocabulary of {name!r}. Pick one that is (e.g. Llama 3's "
                "<|finetune_right_pad_id|>, Qwen's <|endoftext|>, or its unknown token), or unset `pad_token` to let "
                "the recipe choose."
            )
        if pad_token == eos:
            raise ModelLoadError(
                f"pad_token {pad_token!r} is the EOS token of {name!r}: a tokenizer that pads with its EOS token hides "
                "the final EOS (PPO masks every pad id; a reward model reads its score before it). Pick another token "
                "of the vocabulary, or unset `pad_token` to let the recipe choose."
            )
        tokenizer.pad_token = pad_token
        return
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    unknown = [tokenizer.unk_token] if tokenizer.unk_token else []
    taken = {eos, tokenizer.bos_token}
    chosen = next((token for token in (*KNOWN_PAD_TOKENS, *unknown) if token in vocab and token not in taken), None)
    before = f"its EOS token {eos!r}" if tokenizer.pad_token is not None else "no pad token"
    if chosen is None:
        if eos_fallback:
            tokenizer.pad_token = eos
            return
        raise ModelLoadError(
            f"The tokenizer of {name!r} has {before} and none of {', '.join(KNOWN_PAD_TOKENS)} or an unknown token "
            "to pad with instead. Set `pad_token` to another token of its vocabulary, or add one "
            "(tokenizer.add_special_tokens + model.resize_token_embeddings) and save both."
        )
    tokenizer.pad_token = chosen
    if PartialState().is_local_main_process:
        print(
            f"[pad] {name}: the tokenizer has {before}; padding with {chosen!r} (id {tokenizer.pad_token_id}) "
            "instead, saved with the tokenizer (set `pad_token` to choose another).",
            flush=True,
        )


def set_model_pad_token_id(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Carry the tokenizer's pad id into the model's config and generation config (saved with a full model)."""
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


# ----------------------------------------------------------------------------------------------------------------
# Chat templates for assistant-only loss

# Conversations each candidate training template must render exactly as the model's own template does: with and
# without a system turn, one and several turns, with and without the generation prompt, padded content (Llama trims
# it, ChatML does not), and a tool call with its result.
_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
    },
}
TEMPLATE_PROBES = (
    ([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}], False, None),
    (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": " And 3+3? "},
            {"role": "assistant", "content": " 6\n"},
        ],
        False,
        None,
    ),
    (
        [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}],
        True,
        None,
    ),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], True, None),
    (
        [
            {"role": "user", "content": "What is 2+3?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}],
            },
            {"role": "tool", "name": "add", "content": "5"},
            {"role": "assistant", "content": "5."},
        ],
        False,
        [_TOOL],
    ),
)
CHAT_TEMPLATES_DIR = Path(__file__).parent / "chat_templates"


def render_probes(tokenizer: PreTrainedTokenizerBase, template: str) -> list[str | None]:
    """`TEMPLATE_PROBES` rendered with `template` (None where the template refuses a conversation)."""
    rendered: list[str | None] = []
    for messages, add_generation_prompt, tools in TEMPLATE_PROBES:
        try:
            text = tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=template, add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )  # fmt: skip
        except Exception:  # jinja's TemplateError, raise_exception(), a missing key: the template refuses it
            text = None
        rendered.append(text)
    return rendered


def training_chat_template(tokenizer: PreTrainedTokenizerBase, name: str) -> str:
    """A chat template with `{% generation %}` markers that renders exactly what the tokenizer's own template renders,
    for SFT's `assistant_only_loss`. The model's template is recognised by what it renders, not by the model's name:

    1. the template itself, when it already has the markers;
    2. a training template of ours (`chat_templates/*.jinja`: SmolLM2, Qwen 2.5, Llama 3.1/3.3, Llama 3.2) or of
       TRL (`trl/chat_templates/*_training.jinja`) that renders `TEMPLATE_PROBES` to the same text;
    3. TRL's own pick (`get_training_chat_template`, by exact template text; its patched templates may differ).
    """
    from trl import chat_template_utils

    template = default_chat_template(tokenizer)
    if not template:
        raise ModelLoadError(
            f"`assistant_only_loss: true` needs a chat template, and the tokenizer of {name!r} has none. Use an "
            "instruct model's tokenizer or set `chat_template_path` to a Jinja file with `{% generation %}` markers."
        )
    if chat_template_utils.has_generation_markers(template):
        return template
    own = render_probes(tokenizer, template)
    if own[0] is not None:  # a template that cannot render a plain exchange matches nothing
        trl_templates = Path(chat_template_utils.__file__).parent / "chat_templates"
        candidates = [*sorted(CHAT_TEMPLATES_DIR.glob("*.jinja")), *sorted(trl_templates.glob("*_training.jinja"))]
        for path in candidates:
            candidate = path.read_text(encoding="utf-8")
            if render_probes(tokenizer, candidate) == own:
                return candidate
    try:
        patched = chat_template_utils.get_training_chat_template(tokenizer)
    except ValueError:
        patched = None
    if patched:
        return patched
    raise ModelLoadError(
        f"`assistant_only_loss: true` needs `{{% generation %}}`/`{{% endgeneration %}}` around the assistant "
        f"turns of the chat template of {name!r}; it has none, and no training template of this project "
        f"({CHAT_TEMPLATES_DIR}) or of TRL renders the same text. Set `chat_template_path` to a copy of the model's "
        "template with those markers around each assistant reply and its end-of-turn token, or use "
        "`assistant_only_loss: false` (prompt-completion data gets completion-only loss anyway)."
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
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    set_model_pad_token_id(merged, tokenizer)  # the pad token the SFT run chose, in config and generation config
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
