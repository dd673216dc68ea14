"""Start a preference or RL recipe (DPO, GRPO, PPO, rejection sampling) from the SFT output, and check its prompts.

    model, peft_config = load_policy(model_args, gradient_checkpointing=False)
    trainer = DPOTrainer(model=model, peft_config=peft_config, ...)  # likewise GRPOTrainer

`model_args.model_name_or_path` names the SFT policy, which is also the reference the trainer holds the policy to:

- a LoRA adapter directory (what the SFT recipe writes, e.g. `outputs/demo/sft`): the adapter's base is loaded as
  configured (4-bit NF4 by default) and the SFT adapter goes on it *trainable*, as peft's "default" adapter;
  `peft_config` is None. TRL's DPO and GRPO trainers, given a `PeftModel`, add a frozen copy of that adapter named
  "ref" and compute reference log-probs with it. Policy and reference both start as exactly the SFT policy and
  share the one 4-bit base: the reference costs one more adapter (megabytes), not a second model.
  (The LoRA options in the config are unused then: training continues the SFT adapter at its own rank.)
- a full model (a merged SFT model, a hub instruct model): loaded as configured, and `peft_config` is a new LoRA
  (`trl.get_peft_config(model_args)`). The trainer computes the reference with the adapter disabled, which is the
  loaded SFT model itself, again without a second copy.

Other helpers:
    adapter_base(path) -> str | None                      the base model of a LoRA adapter dir, None for a full model
    tokenizer_source(path) -> str                         the adapter dir when it holds a tokenizer, else its base
    load_policy_tokenizer(model_args, ...) -> tokenizer   that tokenizer, checked like `modeling.load_tokenizer`
    context_length(path) -> int | None                    the model's maximum sequence length (from config.json)
    prompt_lengths(dataset, tokenizer) -> list[int]       token counts of `prompt` as the trainer renders it
    check_prompt_lengths(dataset, tokenizer, limit, ...)  error (or drop) prompts that leave no room to respond
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl import ModelConfig, get_peft_config

from recipes.common.data import DataError
from recipes.common.modeling import (
    ModelLoadError,
    check_chat_template,
    check_model_path,
    load_model,
    load_tokenizer,
    set_pad_token,
)

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def adapter_base(model_name_or_path: str) -> str | None:
    """The base model a local LoRA adapter directory was trained on, or None when the path is not an adapter."""
    config_file = Path(model_name_or_path).expanduser() / ADAPTER_CONFIG
    if not config_file.is_file():
        return None
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{config_file} names no `base_model_name_or_path`; set it to the SFT run's base model.")
    return base


def tokenizer_source(model_name_or_path: str) -> str:
    """Where to load the tokenizer from: the SFT output (it saves its tokenizer), else the adapter's base."""
    path = Path(model_name_or_path).expanduser()
    base = adapter_base(model_name_or_path)
    if base is None or any((path / name).is_file() for name in TOKENIZER_FILES):
        return model_name_or_path
    return base


def context_length(model_name_or_path: str) -> int | None:
    """`max_position_embeddings` of the model (of the adapter's base), or None when the config does not say."""
    name = adapter_base(model_name_or_path) or model_name_or_path
    config = AutoConfig.from_pretrained(check_model_path(name), trust_remote_code=False)
    return getattr(config, "max_position_embeddings", None)


def load_policy(model_args: ModelConfig, gradient_checkpointing: bool = False) -> tuple[PreTrainedModel, Any]:
    """The policy to train and the `peft_config` to hand the trainer with it (see the module docstring)."""
    base = adapter_base(model_args.model_name_or_path)
    if base is None:
        model = load_model(model_args, gradient_checkpointing=gradient_checkpointing)
        return model, get_peft_config(model_args)
    if not model_args.use_peft:
        raise ModelLoadError(
            f"{model_args.model_name_or_path!r} is a LoRA adapter but `use_peft` is false. Keep `use_peft: true` to "
            "train the adapter, or merge it first (SFT with `merge_adapter: true`) and start from `<sft>/merged`."
        )
    from peft import PeftModel

    base_model = load_model(model_args, gradient_checkpointing=gradient_checkpointing, model_name_or_path=base)
    model = PeftModel.from_pretrained(base_model, model_args.model_name_or_path, is_trainable=True)
    return model, None


def load_policy_tokenizer(
    model_args: ModelConfig,
    require_chat_template: bool = True,
    padding_side: str = "right",
    pad_token: str | None = None,
) -> PreTrainedTokenizerBase:
    """The SFT run's tokenizer (from the adapter dir, where the SFT recipe saves it, else from the base), with the
    checks of `recipes.common.modeling.load_tokenizer`: an EOS, a pad token other than EOS (the one SFT saved, else
    chosen by `set_pad_token`; `pad_token` wins), a chat template when needed."""
    source = tokenizer_source(model_args.model_name_or_path)
    if adapter_base(source) is None:
        args = dataclasses.replace(model_args, model_name_or_path=source)
        return load_tokenizer(
            args, require_chat_template=require_chat_template, padding_side=padding_side, pad_token=pad_token
        )
    # `load_tokenizer` wants a config.json, which an adapter dir lacks: its checks are repeated here.
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    tokenizer.padding_side = padding_side
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"Tokenizer in {source!r} has no EOS token; set one (tokenizer.eos_token) and save it.")
    set_pad_token(tokenizer, pad_token, source)
    check_chat_template(tokenizer, source, require_chat_template)
    return tokenizer


def prompt_lengths(dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens in each row's `prompt`, rendered as the trainers do (chat template with the generation prompt)."""

    def count(batch: dict[str, list]) -> dict[str, list[int]]:
        lengths = []
        for prompt in batch["prompt"]:
            if isinstance(prompt, list):
                encoded = tokenizer.apply_chat_template(
                    prompt, add_generation_prompt=True, tokenize=True, return_dict=True
                )
            else:
                encoded = tokenizer(text=prompt)
            lengths.append(len(encoded["input_ids"]))
        return {"n": lengths}

    return dataset.select_columns(["prompt"]).map(count, batched=True, remove_columns=["prompt"])["n"]


def check_prompt_lengths(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    limit: int,
    where: str,
    limit_source: str,
    drop: bool = False,
) -> Dataset:
    """Rows whose prompt has `limit` tokens or more leave no room for a response: an error naming them, or, with
    `drop`, the dataset without them (said on stdout). `limit_source` says where the limit comes from, e.g.
    "max_length". Returns the dataset to train on."""
    lengths = prompt_lengths(dataset, tokenizer)
    too_long = [i for i, n in enumerate(lengths) if n >= limit]
    if not too_long:
        return dataset
    if drop:
        print(f"[recipes] {where}: dropped {len(too_long)} of {len(lengths)} rows whose prompt has >= {limit} tokens")
        keep = sorted(set(range(len(lengths))) - set(too_long))
        if not keep:
            raise DataError(f"{where}: every prompt has >= {limit} tokens ({limit_source}); nothing left to train on.")
        return dataset.select(keep)
    first = too_long[0]
    raise DataError(
        f"{where}: {len(too_long)} of {len(lengths)} prompts have >= {limit} tokens ({limit_source}), which leaves no "
        f"room for a response (row {first} has {lengths[first]} tokens). Raise the limit if the model's context "
        "allows, shorten or filter those rows, or pass `--drop_long_prompts true` to skip them."
    )
