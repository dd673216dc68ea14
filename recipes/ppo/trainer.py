"""PPO for RLHF, written for this project (transformers' `Trainer` supplies the optimizer, scheduler, callbacks, state,
logging and checkpoint files; the loop is ours). recipes/ppo/README.md walks through it in the papers' terms.

One update (`PPOTrainer.train`):
1. rollouts: the next `local_batch_size` prompts per process (`PromptBatches`), a sampled response for each
   (temperature, cut after the stop token), and with no gradient: the policy's and the reference's log-probs of the
   response tokens, the value model's values, the reward's score (`collect_rollouts`);
2. per-token rewards -kl_coef (log p - log p_ref), plus the score (minus `missing_eos_penalty` without a stop token)
   at the last token; GAE advantages and returns; advantages whitened over the whole batch of every process;
3. `num_ppo_epochs` passes over the batch in `num_mini_batches` shuffled mini-batches, each one optimizer step over
   `gradient_accumulation_steps` micro-batches: clipped surrogate + vf_coef x clipped value loss (`optimize`);
4. the scheduler steps once per update; logging, evaluation callbacks and checkpoints follow the Trainer's schedule
   (`logging_steps`, `save_steps`, also as fractions of all updates), sample tables `num_sample_generations` times.

Checkpoints (`checkpoint-N/`): the policy adapter, `value_model/` (adapter + head, as a reward-recipe dir), optimizer,
scheduler, RNG states (one per process) and `trainer_state.json`, written last, so a checkpoint with it is
complete. `resume` loads them all; prompts come from a seeded stream that starts at any batch, so a resumed run
continues the uninterrupted one exactly (bit for bit on CPU: tests/recipes/test_ppo.py).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import DataCollatorWithPadding, GenerationConfig, Trainer, TrainerState
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from recipes.common.config import ConfigError
from recipes.ppo import algorithm as ppo
from recipes.ppo.config import BatchPlan, PPOConfig, batch_plan
from recipes.ppo.modeling import POLICY_ADAPTER, PPOModels, ScalarHead, load_value_state, save_value_model
from recipes.ppo.rewards import PPOReward

VALUE_DIR = "value_model"
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors")


@dataclass
class PPOState(TrainerState):
    episode: int = 0  # rollouts trained on so far (all processes)


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
                "gradient accumulation x mini-batches x processes); use more prompts or a smaller batch."
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


class PolicyAndValue(nn.Module):
    """What the optimizer trains and DDP wraps: the policy (whose PeftModel also carries the shared base's other
    adapters) and the value model. One forward gives both on the response positions, so DDP sees one graph."""

    def __init__(self, policy: PeftModel, value: ScalarHead) -> None:
        super().__init__()
        self.policy = policy
        self.value = value
        self.config = policy.config
        # Trainer moves a model to the device unless it is bitsandbytes-quantized (placed by its device_map).
        self.quantization_method = getattr(policy, "quantization_method", None)

    def forward(self, input_ids, attention_mask, position_ids, response_width: int):
        logits = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=response_width + 1,  # logits at position t predict token t + 1
        ).logits[:, :-1]
        values = self.value(input_ids, attention_mask, position_ids)[:, -response_width - 1 : -1]
        return logits, values


@dataclass
class Rollouts:
    """One update's rollouts on this process (rows = prompts), everything the PPO epochs need."""

    queries: torch.Tensor  # (rows, prompt width), left-padded
    query_mask: torch.Tensor
    responses: torch.Tensor  # (rows, response width), right-padded
    mask: torch.Tensor  # float, 1 on real response tokens
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    metrics: dict[str, torch.Tensor]  # per-row tensors, gathered over processes for logging

    def inputs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return model_inputs(self.queries[rows], self.query_mask[rows], self.responses[rows], self.mask[rows])


def model_inputs(queries, query_mask, responses, response_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position ids (counted from each row's first real token) of prompt + response."""
    input_ids = torch.cat([queries, responses], dim=1)
    attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


class PPOTrainer(Trainer):
    def __init__(
        self,
        args: PPOConfig,
        models: PPOModels,
        reward: PPOReward,
        processing_class: Any,
        train_dataset: Dataset,
        eval_dataset: Dataset | None = None,
        callbacks: list | None = None,
        value_base_name: str = "",
    ) -> None:
        super().__init__(
            model=PolicyAndValue(models.policy, models.value),
            args=args,
            processing_class=processing_class,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
        )
        self.policy, self.value, self.shared = models.policy, models.value, models.shared
        self.reference_adapter = models.reference_adapter
        self.reward = reward
        self.value_base_name = value_base_name
        self.tokenizer = processing_class
        self.plan: BatchPlan = batch_plan(args, len(train_dataset), self.accelerator.num_processes)
        self.collate = DataCollatorWithPadding(processing_class)  # left padding: the tokenizer's side
        self.prompts = PromptBatches(
            train_dataset,
            self.collate,
            self.plan.local_batch_size,
            self.accelerator.num_processes,
            self.accelerator.process_index,
            args.seed,
        )
        self.stop_token_id = args.stop_token_id
        if args.stop_token == "eos":
            self.stop_token_id = processing_class.eos_token_id
        self.generation_config = GenerationConfig(
            max_new_tokens=args.response_length,
            min_new_tokens=0,
            do_sample=True,
            temperature=args.temperature,
            top_k=0,  # sample from softmax(logits / T) itself: the distribution whose log-probs PPO trains
            top_p=1.0,
            # without a stop token every response runs to response_length ([]: None would fall back to EOS)
            eos_token_id=self.stop_token_id if self.stop_token_id is not None else [],
            pad_token_id=processing_class.pad_token_id,
            use_cache=True,
        )
        self.callback_handler.model = self.policy  # callbacks (evaluation) generate with the policy
        self.create_optimizer_and_scheduler(num_training_steps=self.plan.updates)  # the scheduler steps per update
        self.model_wrapped, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.state = self.new_state()
        self.resumed_at: int | None = None  # the update a resumed run started from

    def new_state(self, data: dict | None = None) -> PPOState:
        exportable = [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]
        state = PPOState(stateful_callbacks=exportable) if data is None else PPOState(**data)
        state.is_local_process_zero = self.is_local_process_zero()
        state.is_world_process_zero = self.is_world_process_zero()
        state.max_steps = self.plan.updates
        state.train_batch_size = self.plan.batch_size
        state.compute_steps(self.args, self.plan.updates)  # fractional logging/eval/save steps of ALL updates
        return state

    # --- the loop -----------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | None = None, **_: Any) -> None:
        if resume_from_checkpoint:
            self.resume(resume_from_checkpoint)
        args, state = self.args, self.state
        self.control = self.callback_handler.on_train_begin(args, state, self.control)
        self.prompts.start_batch = state.global_step  # batch b is the same prompts in every run
        batches = iter(self.prompts)
        sample_every = max(1, self.plan.updates // args.num_sample_generations) if args.num_sample_generations else 0
        while state.global_step < self.plan.updates:
            self.control = self.callback_handler.on_step_begin(args, state, self.control)
            batch = next(batches)
            rollouts = self.collect_rollouts(batch["input_ids"], batch["attention_mask"])
            stats = self.optimize(rollouts)
            self.lr_scheduler.step()
            state.global_step += 1
            state.episode += self.plan.batch_size
            state.epoch = state.episode / len(self.train_dataset)
            metrics = self.metrics(rollouts, stats)
            self.control = self.callback_handler.on_step_end(args, state, self.control)  # evaluation callbacks
            if self.control.should_log:
                self.log(metrics)
            if sample_every and state.global_step % sample_every == 0:
                self.log_sample_completions()
            if self.control.should_save:
                self._save_checkpoint(self.model_wrapped, trial=None)
                self.control = self.callback_handler.on_save(args, state, self.control)
        self.control = self.callback_handler.on_train_end(args, state, self.control)

    @torch.no_grad()
    def collect_rollouts(self, queries: torch.Tensor, query_mask: torch.Tensor) -> Rollouts:
        args, device = self.args, self.accelerator.device
        queries, query_mask = queries.to(device), query_mask.to(device)
        chunk = args.local_rollout_forward_batch_size
        responses = torch.cat([self.generate(queries[i : i + chunk], query_mask[i : i + chunk])
                               for i in range(0, len(queries), chunk)])  # fmt: skip
        lengths = ppo.response_lengths(responses, self.stop_token_id)
        width = int(lengths.max())
        mask = ppo.length_mask(lengths, width)
        responses = responses[:, :width].masked_fill(mask == 0, self.tokenizer.pad_token_id)

        logprobs, ref_logprobs, values = [], [], []
        for i in range(0, len(queries), chunk):
            inputs = model_inputs(queries[i : i + chunk], query_mask[i : i + chunk], responses[i : i + chunk],
                                  mask[i : i + chunk])  # fmt: skip
            with self.accelerator.autocast():
                logits, chunk_values = self.model(*inputs, response_width=width)  # unwrapped: no DDP hooks
                logprobs.append(ppo.token_logprobs(logits, responses[i : i + chunk], args.temperature))
                with self.shared.use(self.reference_adapter):
                    ref_logits = self.policy(*inputs[:2], position_ids=inputs[2], use_cache=False,
                                             logits_to_keep=width + 1).logits[:, :-1]  # fmt: skip
                ref_logprobs.append(ppo.token_logprobs(ref_logits, responses[i : i + chunk], args.temperature))
            values.append(chunk_values.float())
        logprobs, ref_logprobs, values = (torch.cat(t) * mask for t in (logprobs, ref_logprobs, values))

        raw_scores = self.reward(queries, query_mask, responses, mask).to(device)  # whitened over the whole batch
        eos = self.stop_token_id if self.stop_token_id is not None else self.tokenizer.eos_token_id
        has_eos = ((responses == eos) & (mask > 0)).any(1)
        scores = raw_scores.clone()
        if args.missing_eos_penalty is not None:
            scores[~has_eos] -= args.missing_eos_penalty
        rewards, kl = ppo.per_token_rewards(scores, logprobs, ref_logprobs, mask, args.kl_coef)
        if args.whiten_rewards:
            rewards = ppo.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = ppo.gae(rewards, values, mask, args.gamma, args.lam)
        advantages = ppo.masked_whiten(advantages, mask)

        metrics = {
            "kl": kl.sum(1),
            "entropy": (-logprobs).sum(1),  # sampled tokens' surprisal: a Monte Carlo estimate of the entropy
            "non_score_reward": (-args.kl_coef * kl).sum(1),
            "scores": scores,
            "raw_scores": raw_scores.float(),
            "lengths": lengths.float(),
            "has_eos": has_eos.float(),
            "values": ppo.masked_mean(values, mask).reshape(1),
        }
        metrics.update({name: part.float() for name, part in self.reward.last.items()})
        return Rollouts(queries, query_mask, responses, mask, logprobs, values, advantages, returns, metrics)

    def generate(self, queries: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """Sampled responses, padded to `response_length` (eval mode: the KV cache on, checkpointing off)."""
        self.policy.eval()
        try:
            with self.accelerator.autocast():
                output = self.policy.generate(
                    input_ids=queries, attention_mask=query_mask, generation_config=self.generation_config
                )
        finally:
            self.policy.train()
        responses = output[:, queries.shape[1] :]
        padding = self.args.response_length - responses.shape[1]
        return nn.functional.pad(responses, (0, padding), value=self.tokenizer.pad_token_id)

    def optimize(self, rollouts: Rollouts) -> dict[str, list[torch.Tensor]]:
        args, model = self.args, self.model_wrapped
        rows, mini, micro = len(rollouts.queries), self.plan.local_mini_batch_size, args.per_device_train_batch_size
        width = rollouts.responses.shape[1]
        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(rows).to(rollouts.queries.device)
            for start in range(0, rows, mini):
                mini_batch = order[start : start + mini]
                micro_batches = [mini_batch[i : i + micro] for i in range(0, len(mini_batch), micro)]
                for k, idx in enumerate(micro_batches):
                    last = k == len(micro_batches) - 1
                    # DDP all-reduces gradients only at the last micro-batch of each optimizer step.
                    with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                        logits, values = model(*rollouts.inputs(idx), response_width=width)
                        mask = rollouts.mask[idx]
                        logprobs = ppo.token_logprobs(logits, rollouts.responses[idx], args.temperature)
                        pg_loss, pg_stats = ppo.policy_loss(
                            logprobs, rollouts.logprobs[idx], rollouts.advantages[idx], mask, args.cliprange
                        )
                        vf_loss, vf_stats = ppo.value_loss(
                            values.float(), rollouts.values[idx], rollouts.returns[idx], mask, args.cliprange_value
                        )
                        loss = (pg_loss + args.vf_coef * vf_loss) / len(micro_batches)
                        self.accelerator.backward(loss)
                    with torch.no_grad():
                        stats["policy/approxkl_avg"].append(pg_stats["approxkl"])
                        stats["policy/clipfrac_avg"].append(pg_stats["clipfrac"])
                        stats["loss/policy_avg"].append(pg_loss.detach())
                        stats["loss/value_avg"].append(vf_loss.detach())
                        stats["val/clipfrac_avg"].append(vf_stats["clipfrac"])
                        stats["policy/entropy_avg"].append(
                            ppo.masked_mean(ppo.entropy(logits.detach(), args.temperature), mask)
                        )
                        stats["val/ratio"].append(pg_stats["ratio"])
                if args.max_grad_norm and args.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
        return stats

    # --- logging ------------------------------------------------------------------------------------------------

    def metrics(self, rollouts: Rollouts, stats: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """One update's metrics, over every process (TRL's names, which the study and compare scripts read)."""
        gathered = {name: self.accelerator.gather(value.contiguous()) for name, value in rollouts.metrics.items()}
        mean = {name: value.float().mean().item() for name, value in gathered.items()}
        logs = {
            "objective/kl": mean["kl"],
            "objective/entropy": mean["entropy"],
            "objective/non_score_reward": mean["non_score_reward"],
            "objective/rlhf_reward": mean["scores"] + mean["non_score_reward"],
            "objective/scores": mean["scores"],
            "val/mean": mean["values"],
            "val/num_eos_tokens": gathered["has_eos"].sum().item(),
            "reward/mean": mean["raw_scores"],
            "reward/std": gathered["raw_scores"].std().item() if gathered["raw_scores"].numel() > 1 else 0.0,
            "response/length_mean": mean["lengths"],
            "response/length_max": gathered["lengths"].max().item(),
            "response/eos_fraction": mean["has_eos"],
        }
        # The reward model's score before whitening (reward/mean is what PPO optimized: whitened, mean ~0), and
        # the combined RM's parts.
        for name in ("rm_score", "helpfulness", "safety", "safety_gate"):
            if name in mean:
                logs[f"reward/{name}_mean"] = mean[name]
        for name, values in stats.items():
            logs[name] = self.accelerator.reduce(torch.stack(values).mean(), "mean").item()
        ratios = self.accelerator.gather(torch.stack(stats["val/ratio"]))
        logs["val/ratio_var"] = ratios.var().item() if ratios.numel() > 1 else 0.0
        logs["lr"] = self.lr_scheduler.get_last_lr()[0]
        logs["episode"] = self.state.episode
        return logs

    @torch.no_grad()
    def log_sample_completions(self) -> None:
        """A W&B table of greedy completions of the first eval prompts with their reward (every process generates
        the same ones: the batch-whitened RM reward all-reduces). Under a forked RNG, so rollouts are unaffected."""
        if self.eval_dataset is None or len(self.eval_dataset) == 0:
            return
        rows = [self.eval_dataset[i] for i in range(min(len(self.eval_dataset), self.args.per_device_eval_batch_size))]
        batch = self.collate(rows)
        device = self.accelerator.device
        queries, query_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        greedy = GenerationConfig(**{**self.generation_config.to_dict(), "do_sample": False, "temperature": None,
                                     "top_k": None, "top_p": None})  # fmt: skip
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            self.policy.eval()
            try:
                with self.accelerator.autocast():
                    output = self.policy.generate(
                        input_ids=queries, attention_mask=query_mask, generation_config=greedy
                    )
            finally:
                self.policy.train()
            responses = output[:, queries.shape[1] :]
            lengths = ppo.response_lengths(responses, self.stop_token_id)
            mask = ppo.length_mask(lengths, responses.shape[1])
            responses = responses.masked_fill(mask == 0, self.tokenizer.pad_token_id)
            scores = self.reward(queries, query_mask, responses, mask)
        if not self.is_world_process_zero():
            return
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is not None:
            texts = zip(self.tokenizer.batch_decode(queries, skip_special_tokens=True),
                        self.tokenizer.batch_decode(responses, skip_special_tokens=True), scores.tolist())  # fmt: skip
            table = wandb.Table(columns=["query", "model response", "score"], data=[list(row) for row in texts])
            wandb.run.log({"completions": table, "train/global_step": self.state.global_step})

    # --- checkpoints --------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The trained policy adapter only (the reference adapter is the SFT adapter, unchanged)."""
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            self.policy.save_pretrained(output_dir, selected_adapters=[POLICY_ADAPTER], safe_serialization=True)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.args.should_save:  # before Trainer's files: trainer_state.json, written last, marks it complete
            folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            save_value_model(self.value, folder / VALUE_DIR, self.value_base_name)
        super()._save_checkpoint(model, trial)

    def resume(self, checkpoint: str) -> None:
        """Load everything a checkpoint holds; `train()` then runs the remaining updates only."""
        path = Path(checkpoint)
        check_resumable(checkpoint, self.plan)
        adapter = load_file(path / "adapter_model.safetensors")
        result = set_peft_model_state_dict(self.policy, adapter, adapter_name=POLICY_ADAPTER)
        if getattr(result, "unexpected_keys", []):
            raise ValueError(f"{path} does not match this run's policy (unexpected keys {result.unexpected_keys[:3]}).")
        load_value_state(self.value, path / VALUE_DIR)
        device = self.accelerator.device
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        self.state = self.new_state(json.loads((path / "trainer_state.json").read_text()))
        self._load_rng_state(str(path))
        self.resumed_at = self.state.global_step


def check_resumable(checkpoint: str, plan: BatchPlan) -> None:
    """A checkpoint continues only the run it came from: same number of updates of the same batch size."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    if "episode" not in state or state.get("train_batch_size") is None:
        raise ConfigError(
            f"Checkpoint {checkpoint} was not written by this PPO trainer (e.g. by TRL's PPOTrainer, whose optimizer "
            "state does not fit this one): start in a new output_dir, or from its adapter as model_name_or_path."
        )
    if state["max_steps"] != plan.updates or state["train_batch_size"] != plan.batch_size:
        raise ConfigError(
            f"Checkpoint {checkpoint} belongs to a run of {state['max_steps']} PPO updates of "
            f"{state['train_batch_size']} rollouts, this config gives {plan.updates} of {plan.batch_size}. Resume "
            "with the same total_episodes / batch settings / number of processes, or use a new output_dir."
        )


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
