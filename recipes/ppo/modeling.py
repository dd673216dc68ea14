"""The four PPO models: the policy, its reference, the value model and (optionally) reward models.

- Policy: the 4-bit base with a trainable LoRA adapter ("default"). Started from the SFT output (a LoRA adapter
  directory), that adapter is a trainable copy of the SFT adapter, and the SFT adapter is loaded a second time,
  frozen, as "reference" on the same base: the reference is exactly the SFT policy, for the price of one adapter.
  Started from a full model, the adapter is a fresh LoRA and the reference is the base with adapters disabled.
- Reference: `AdapterReference`, a module of its own passed to `PPOTrainer` as `ref_model`. TRL's built-in
  "no ref_model with peft" path calls `model.policy` on the DDP-wrapped model, which fails under DDP; an explicit
  module that switches adapters on the shared policy works everywhere and holds no weights of its own.
- Value model: initialised from the (helpfulness) reward model: its 4-bit base as `AutoModelForSequenceClassification`
  with the reward model's LoRA adapter and score head made trainable (a full-precision 7-8B value model would need
  ~16 bytes/parameter with Adam; its own LoRA keeps it at the size of a second 4-bit copy).

Nothing here passes `peft_config` to `PPOTrainer`: with it and `bf16`, TRL casts `lm_head` to bf16 while rollouts run
without autocast (a dtype error). We build the PeftModel ourselves, so `lm_head` stays float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel
from trl import ModelConfig, get_peft_config

from recipes.common import policy as common_policy
from recipes.common.modeling import load_model
from recipes.ppo.rewards import reward_model_path

POLICY_ADAPTER = "default"  # saved at the top of the output dir, where `PeftModel.from_pretrained` looks
REFERENCE_ADAPTER = "reference"


def load_policy(model_args: ModelConfig, gradient_checkpointing: bool) -> tuple[PeftModel, str | None]:
    """The policy PeftModel and the name of its reference adapter (None: the reference is the base, adapters off)."""
    model, peft_config = common_policy.load_policy(model_args, gradient_checkpointing=gradient_checkpointing)
    if peft_config is not None:  # a full model: a fresh LoRA on it
        return get_peft_model(model, peft_config), None
    # The SFT adapter, now trainable as "default", again as a frozen reference on the same base.
    model.load_adapter(model_args.model_name_or_path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.set_adapter(POLICY_ADAPTER)
    return model, REFERENCE_ADAPTER


class AdapterReference(nn.Module):
    """The reference policy: the shared policy run with the reference adapter (or with adapters disabled)."""

    def __init__(self, policy: PeftModel, adapter_name: str | None) -> None:
        super().__init__()
        self._shared = [policy]  # not a child module: PPOTrainer's .to(device) and dropout pass must not touch it
        self.adapter_name = adapter_name
        self.config = policy.config

    def forward(self, **kwargs: Any) -> Any:
        policy = self._shared[0]
        if self.adapter_name is None:
            with policy.disable_adapter():
                return policy(**kwargs)
        trained = policy.active_adapter
        policy.set_adapter(self.adapter_name, inference_mode=True)
        try:
            return policy(**kwargs)
        finally:
            policy.set_adapter(trained)  # makes the trained adapter trainable again, the reference stays frozen


def load_value_model(source: str, model_args: ModelConfig, gradient_checkpointing: bool) -> PeftModel:
    """The value model from a reward-model output dir (LoRA adapter + score head) or a full model (a causal LM gets a
    fresh score head), quantized like the policy. A PeftModel whose LoRA and score head train; `PPOTrainer` gets
    `value_backbone(...)` of it."""
    base = common_policy.adapter_base(source)
    model = load_model(model_args, gradient_checkpointing, num_labels=1, model_name_or_path=base or source)
    if base is not None:  # a reward model trained as LoRA: start from its adapter and head
        return PeftModel.from_pretrained(model, source, is_trainable=True)
    if "ForSequenceClassification" not in str(model.config.architectures):  # a fresh head: values start near 0
        torch.nn.init.normal_(model.score.weight, std=1e-3)
    config = dataclasses.replace(get_peft_config(model_args), task_type="SEQ_CLS", modules_to_save=["score"])
    return get_peft_model(model, config)


def value_backbone(value_model: PeftModel) -> PreTrainedModel:
    """The model `PPOTrainer` gets as `value_model`: the sequence classifier with the LoRA layers injected.

    TRL reads `getattr(model, model.base_model_prefix)` and `model.score`; on the PeftModel wrapper the prefix
    resolves to the whole classifier, on the inner model to its backbone, as intended.
    """
    return value_model.base_model.model


def value_init_path(model_args: ModelConfig, training_args: Any, ppo_args: Any) -> str:
    """`value_model_path`; else the (helpfulness) reward model when it gives the reward (the value predicts returns on
    its scale); else the policy's base with a fresh score head (the math reward's 0/1 scale is not an RM's)."""
    if ppo_args.value_model_path:
        return ppo_args.value_model_path
    if ppo_args.reward_source == "reward_model":
        return reward_model_path(training_args)
    return common_policy.adapter_base(model_args.model_name_or_path) or model_args.model_name_or_path
