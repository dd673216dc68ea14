"""TRL 1.12's `PPOTrainer` with checkpoints that resume (TRL issue #2657), reward/length logging and a saved policy.

`PPOTrainer.train()` is its own loop, not `Trainer.train()`: it takes no `resume_from_checkpoint`, always starts at
update 1, and its checkpoints hold the policy, optimizer, scheduler and RNG but not the value model. This subclass

- saves the value model's adapter and head into every `checkpoint-N/` (before the rest, so a checkpoint with
  `trainer_state.json` is complete) and saves only the trained policy adapter (also under DDP, where TRL's
  `save_model` cannot find `model.policy`);
- `resume(checkpoint)`: loads policy adapter, value model, optimizer, scheduler, RNG and step count; `train()` then
  runs only the remaining updates, with `global_step`, `episode` and the log history carried on, so evaluation,
  saving and W&B steps fall where an uninterrupted run puts them;
- feeds prompts from `PromptBatches`, an endless, seeded batch stream that starts at any batch, instead of TRL's
  shuffled DataLoader (whose order depends on the RNG state at each epoch start and cannot be skipped ahead);
- runs TRL's sample-completion tables under a forked RNG, so they do not shift the rollouts' random stream;
- adds the reward's mean/std, response length and EOS rate to each update's log (`PPOReward` records them).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.experimental.ppo import PPOTrainer

from recipes.common.config import ConfigError
from recipes.ppo.modeling import POLICY_ADAPTER
from recipes.ppo.rewards import PPOReward

VALUE_DIR = "value_model"
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors")


class PromptBatches:
    """Batch `b` of the run is always the same prompts: epoch `b // batches_per_epoch` is a permutation seeded by
    (seed, epoch), each global batch is split between ranks. Iterating starts at `start_batch` and never ends."""

    def __init__(
        self, dataset: Dataset, collate: Any, local_batch_size: int, world_size: int, rank: int, seed: int
    ) -> None:
        self.dataset, self.collate, self.seed = dataset, collate, seed
        self.local_batch_size, self.rank = local_batch_size, rank
        self.global_batch_size = local_batch_size * world_size
        self.batches_per_epoch = len(dataset) // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(dataset)} prompts cannot fill one rollout batch of {self.global_batch_size} (per-device batch x "
                "gradient accumulation x processes); use more prompts or a smaller batch."
            )
        self.start_batch = 0

    def __iter__(self):
        batch, order, order_epoch = self.start_batch, None, None
        while True:
            epoch, index = divmod(batch, self.batches_per_epoch)
            if epoch != order_epoch:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                order, order_epoch = torch.randperm(len(self.dataset), generator=generator).tolist(), epoch
            start = index * self.global_batch_size + self.rank * self.local_batch_size
            yield self.collate([self.dataset[i] for i in order[start : start + self.local_batch_size]])
            batch += 1


class _CarryOnState(TrainerCallback):
    """`PPOTrainer.train()` zeroes the step count before `on_train_begin`; a resumed run puts it back here."""

    def __init__(self, trainer: ResumablePPOTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        resumed = self.trainer.resumed_state
        if resumed:
            state.global_step = resumed["global_step"]
            state.episode = resumed["episode"]
            state.log_history = resumed["log_history"]
        state.max_steps = self.trainer.total_updates
        return control


class ResumablePPOTrainer(PPOTrainer):
    def __init__(self, *args: Any, value_peft_model: PeftModel, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.value_peft_model = value_peft_model
        self.total_updates = self.args.num_total_batches
        self.resumed_state: dict[str, Any] = {}
        self.dataloader = PromptBatches(
            self.train_dataset,
            self.data_collator,
            self.args.local_batch_size,
            self.accelerator.num_processes,
            self.accelerator.process_index,
            self.args.seed,
        )
        self.callback_handler.callbacks.insert(0, _CarryOnState(self))  # before the progress bar reads max_steps

    @property
    def policy(self) -> PeftModel:
        return self.accelerator.unwrap_model(self.model).policy

    # --- checkpoints --------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The trained policy adapter only (the reference adapter is the SFT adapter, unchanged)."""
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            adapters = [POLICY_ADAPTER] if POLICY_ADAPTER in self.policy.peft_config else None
            self.policy.save_pretrained(output_dir, selected_adapters=adapters, safe_serialization=True)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.args.should_save:
            folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            self.value_peft_model.save_pretrained(folder / VALUE_DIR, safe_serialization=True)
        # Straight to Trainer's: TRL's override first writes a model card from `self.model.config`, which the DDP
        # wrapper does not have.
        Trainer._save_checkpoint(self, model, trial)

    def resume(self, checkpoint: str) -> None:
        """Load everything a checkpoint holds; the next `train()` runs the remaining updates only."""
        path = Path(checkpoint)
        state = json.loads((path / "trainer_state.json").read_text())
        check_resumable(checkpoint, self.total_updates)
        loaded = set_peft_model_state_dict(
            self.policy, load_file(path / "adapter_model.safetensors"), adapter_name=POLICY_ADAPTER
        )
        _check_loaded(loaded, path / "adapter_model.safetensors")
        value_state = load_file(path / VALUE_DIR / "adapter_model.safetensors")
        _check_loaded(set_peft_model_state_dict(self.value_peft_model, value_state), path / VALUE_DIR)
        device = self.accelerator.device
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        self._load_rng_state(str(path))
        self.resumed_state = state
        self.dataloader.start_batch = state["global_step"]

    def train(self) -> None:
        done = self.resumed_state.get("global_step", 0)
        if done >= self.total_updates:
            return
        self.args.num_total_batches = self.total_updates - done  # TRL loops over range(1, num_total_batches + 1)
        try:
            super().train()
        finally:
            self.args.num_total_batches = self.total_updates

    # --- logging ------------------------------------------------------------------------------------------------

    def generate_completions(self, sampling: bool = False) -> None:
        reward: PPOReward = self.reward_model
        reward.recording = False
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices):
                super().generate_completions(sampling=sampling)
        finally:
            reward.recording = True

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "objective/scores" in logs:  # the per-update metrics of PPOTrainer.train()
            recorded = self.reward_model.pop_metrics()
            device = self.accelerator.device
            values = {name: self.accelerator.gather(v.to(device)).float() for name, v in recorded.items()}
            if values:
                logs["reward/mean"] = values["scores"].mean().item()
                logs["reward/std"] = values["scores"].std().item() if values["scores"].numel() > 1 else 0.0
                logs["response/length_mean"] = values["lengths"].mean().item()
                logs["response/length_max"] = values["lengths"].max().item()
                logs["response/eos_fraction"] = values["has_eos"].mean().item()
            for name in ("helpfulness", "safety", "safety_gate"):  # the combined RM's parts
                if name in values:
                    logs[f"reward/{name}_mean"] = values[name].mean().item()
        super().log(logs, start_time)


def planned_updates(args: Any, num_prompts: int, world_size: int) -> int:
    """The number of PPO updates `PPOTrainer` will run (its `num_total_batches`), known before it is built."""
    episodes = args.total_episodes or int(args.num_train_epochs * num_prompts)
    return math.ceil(episodes / (args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size))


def check_resumable(checkpoint: str, total_updates: int) -> None:
    """A checkpoint continues only the run it came from: same number of updates (same batch settings)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    if state["max_steps"] != total_updates:
        raise ConfigError(
            f"Checkpoint {checkpoint} belongs to a run of {state['max_steps']} PPO updates, this config gives "
            f"{total_updates}. Resume with the same total_episodes / batch settings, or use a new output_dir."
        )


def _check_loaded(result: Any, where: Path) -> None:
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{where} does not match this run's model (unexpected keys, e.g. {unexpected[:3]}).")


def checkpoint_is_complete(checkpoint: str) -> bool:
    path = Path(checkpoint)
    return all((path / name).is_file() for name in CHECKPOINT_FILES) and (path / VALUE_DIR).is_dir()


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N with everything `resume` needs (a run killed mid-save leaves a partial one)."""
    folders = [p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if checkpoint_is_complete(str(folder)):
            return os.fspath(folder)
    return None


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last update's training metrics, the last evaluation, and the step-0 evaluation as `before/eval/...`
    (from the log history, which a resumed run carries on)."""
    updates = [entry for entry in log_history if "objective/kl" in entry]
    evals = [entry for entry in log_history if any(key.startswith("eval/") for key in entry)]
    metrics = {f"train/{k}": v for k, v in updates[-1].items() if k != "step"} if updates else {}
    if evals and evals[0]["step"] == 0:
        metrics.update({f"before/{k}": v for k, v in evals[0].items() if k != "step"})
    if evals:
        metrics.update({k: v for k, v in evals[-1].items() if k != "step"})
    return metrics
