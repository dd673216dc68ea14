"""A tiny randomly initialised Llama and a character-level tokenizer with a chat template, built offline.

For tests, the speed benchmark and the lm-eval cross-check when the embedded demo (`scripts/prepare_demo.py`) has not
been built: it exercises the real loading, batching and scoring code in seconds on a CPU.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_char_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Printable ASCII, one token per character, BOS prepended, `</s>` as EOS."""
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars)}
    # BPE without merges over the whole string is a plain character tokenizer.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden_size: int = 64, num_layers: int = 2
) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_tiny_model(output_dir: str | Path, seed: int = 0) -> Path:
    """Save the tiny model and its tokenizer in HF format (safetensors) to load by path, as a user would."""
    output_dir = Path(output_dir)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def save_tiny_reward_model(output_dir: str | Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Path:
    """A tiny random reward model (a Llama with a one-output score head) and `tokenizer`, saved to load by path."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,  # 4-bit layers: in_features a multiple of 64 (tests/unit/test_4bit_cpu.py)
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return Path(output_dir)


def save_tiny_base_and_adapter(root: str | Path, seed: int) -> tuple[Path, Path]:
    """`root/base` (the tiny model of `seed`) and `root/adapter`, a LoRA on q/v whose B weights are drawn away from 0,
    as a trained adapter would be (the policy differs from its base), recording its base's path."""
    from peft import LoraConfig, get_peft_model

    root = Path(root)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    policy.peft_config["default"].base_model_name_or_path = str(root / "base")
    policy.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"
