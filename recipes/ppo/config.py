"""The PPO recipe's training config: `transformers.TrainingArguments` plus the PPO settings.

The keys are the ones TRL's former `PPOConfig` used, so configs written for it keep working; the ones this trainer
does not implement (`kl_estimator`, `sft_model_path`, `model_adapter_name`, `ref_adapter_name`, `exp_name`,
`ds3_gather_for_generation`, `dataset_num_proc`) are unknown keys, which `parse_config` rejects by name.

Batch arithmetic (per update; "rollouts" are prompt + sampled response):

    local_batch_size  = per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches  (per process)
    batch_size        = local_batch_size x processes          (rollouts per update, Llama 2's "batch size")
    mini_batch_size   = batch_size / num_mini_batches         (rollouts per optimizer step, "mini-batch size")
    updates           = ceil(total_episodes / batch_size)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments


@dataclass
class PPOConfig(TrainingArguments):
    total_episodes: int | None = field(
        default=None, metadata={"help": "Rollouts to train on in all; default num_train_epochs x the prompts."}
    )
    num_mini_batches: int = field(default=1, metadata={"help": "Optimizer steps per PPO epoch over one batch."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Rows per generate / no-grad forward while collecting rollouts (memory only)."}
    )
    response_length: int = field(default=53, metadata={"help": "Most tokens sampled per response."})
    temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature; the trained policy is softmax(logits / temperature)."}
    )
    stop_token: Literal["eos"] | None = field(
        default=None, metadata={"help": "eos: a response ends at the EOS token (tokens after it are cut)."}
    )
    stop_token_id: int | None = field(default=None, metadata={"help": "A response ends at this token id."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a response that did not end within the limit."}
    )
    kl_coef: float = field(default=0.05, metadata={"help": "Per-token KL penalty beta x (log p - log p_ref)."})
    cliprange: float = field(default=0.2, metadata={"help": "PPO ratio clip epsilon."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip of the value update around the old value."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Whiten the per-token rewards (no mean shift) over the whole batch."}
    )
    num_sample_generations: int = field(
        default=10, metadata={"help": "How many times to log a table of eval-prompt completions (0: never)."}
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "The (helpfulness) reward model: the reward recipe's output dir."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "num_mini_batches": self.num_mini_batches >= 1,
            "num_ppo_epochs": self.num_ppo_epochs >= 1,
            "local_rollout_forward_batch_size": self.local_rollout_forward_batch_size >= 1,
            "response_length": self.response_length >= 1,
            "temperature": self.temperature > 0,
            "gamma": 0.0 <= self.gamma <= 1.0,
            "lam": 0.0 <= self.lam <= 1.0,
            "cliprange": self.cliprange > 0,
            "cliprange_value": self.cliprange_value > 0,
            "total_episodes": self.total_episodes is None or self.total_episodes >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"PPO setting(s) out of range: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")
        if self.stop_token is not None and self.stop_token_id is not None:
            raise ValueError("Set `stop_token: eos` or `stop_token_id`, not both.")


@dataclass(frozen=True)
class BatchPlan:
    """How many rollouts each update collects and how they are cut into optimizer steps (module docstring)."""

    local_batch_size: int
    batch_size: int
    local_mini_batch_size: int
    updates: int


def batch_plan(args: PPOConfig, num_prompts: int, world_size: int) -> BatchPlan:
    local = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.num_mini_batches
    episodes = args.total_episodes or int(args.num_train_epochs * num_prompts)
    batch = local * world_size
    return BatchPlan(local, batch, local // args.num_mini_batches, max(1, math.ceil(episodes / batch)))
