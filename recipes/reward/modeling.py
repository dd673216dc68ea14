"""The reward model's pieces around TRL: LoRA config for a sequence classifier, float32 trainables.

Why each exists: recipes/reward/README.md, "QLoRA and the score head".
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from trl import ModelConfig, get_peft_config


def reward_peft_config(model_args: ModelConfig) -> LoraConfig | None:
    """LoRA for a sequence classifier: task SEQ_CLS (peft keeps `score` out of LoRA) and `score` in `modules_to_save`,
    so the head trains in full and is saved with the adapter."""
    peft_config = get_peft_config(model_args)
    if peft_config is None:
        return None
    peft_config.task_type = "SEQ_CLS"
    peft_config.modules_to_save = sorted({*(peft_config.modules_to_save or []), "score"})
    return peft_config


def keep_trainable_float32(model: torch.nn.Module) -> int:
    """Undo RewardTrainer's bf16 cast of trainable parameters on quantized models (reward_trainer.py, "QLoRA"): with
    `bf16: false` it breaks the score head's matmul (float32 hidden states), and the head should train in full
    precision anyway. Under bf16 autocast float32 parameters still work. Returns the number of trainable tensors."""
    trainable = [param for param in model.parameters() if param.requires_grad]
    for param in trainable:
        param.data = param.data.float()  # same Parameter objects: the optimizer is built later, in train()
    return len(trainable)
