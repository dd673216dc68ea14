"""`EvalCallback`: the evaluation suite inside any `transformers`/TRL trainer, every `eval_steps` and at train end.

Each evaluation runs the chosen tasks on the same fixed, seeded subset and logs `eval/<task>/<metric>` (e.g.
`eval/gsm8k/accuracy`, `eval/length/mean_tokens`, `eval/diversity/distinct_mean`, `eval/mmlu/accuracy`):
- to the active W&B run (`wandb.run`), with `train/global_step` so the charts share the trainer's x-axis, plus a
  table of prompts and completions under a new key per evaluation, `eval/samples_step_<N>`, so none is overwritten;
- to `state.log_history` (as `{"step": N, "eval/...": ...}`), so the numbers land in `trainer_state.json` too.

Under DDP only the main process evaluates, on the unwrapped model: its forward passes bypass DDP's hooks, so no
collective is started and the other ranks simply wait at their next one. Keep an evaluation shorter than the process
group timeout (30 minutes by default). Sharded models (FSDP, DeepSpeed ZeRO-3) cannot be evaluated on one rank; the
callback says so once and skips.

Afterwards the model is back in train mode with `use_cache` and gradient checkpointing as they were, and the
training random stream is untouched (sampling runs under `torch.random.fork_rng`).

The recipes' hooks, from their `RecipeArguments` (`eval_tasks`, `eval_num_samples`, ...): `build_eval_callback` (the
callback, or none when `eval_tasks` is empty) and `final_evaluation` (once on the trained model, reusing the
callback's evaluation of the last step when there is one).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from eval.suite import (
    evaluate_model,
    flatten_metrics,
    load_eval_data,
    normalize_reward_fns,
    parse_tasks,
    resolve_chat,
    run_tasks,
)
from recipes.common.config import RecipeArguments

logger = logging.getLogger(__name__)
TABLE_COLUMNS = ["step", "task", "prompt", "completion", "reference", "score"]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The policy under DDP / DataParallel / torch.compile wrappers and the PPO recipe's policy + value wrapper."""
    while True:
        if hasattr(model, "policy") and hasattr(model, "value"):  # recipes.ppo.trainer.PolicyAndValue
            model = model.policy
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def _is_sharded(args: TrainingArguments) -> bool:
    if getattr(args, "fsdp", None):
        return True
    deepspeed_config = getattr(args, "hf_deepspeed_config", None)
    return bool(deepspeed_config is not None and deepspeed_config.is_zero3())


def samples_table_rows(step: int, samples: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[list[Any]]:
    """One row per prompt/completion: gsm8k (score = flexible correctness), mmlu (the chosen letter), and the
    sampled responses behind length/diversity/reward (score = the first reward, when there is one)."""
    rows: list[list[Any]] = []
    for record in samples.get("gsm8k", []):
        correct = float(record["correct_flexible"])
        rows.append([step, "gsm8k", record["question"], record["completion"], record["reference"], correct])
    for record in samples.get("mmlu", []):
        rows.append(
            [step, "mmlu", record["question"], record["completion"], record["reference"], float(record["correct"])]
        )
    for record in samples.get("sampled", []):
        reward = next((v for k, v in record.items() if k.startswith("reward/")), None)
        rows.append([step, "sampled", record["prompt"], record["completion"], "", reward])
    return rows


class EvalCallback(TrainerCallback):
    """Runs `tasks` every `eval_steps` optimizer steps (default: the trainer's `eval_steps`; none: only at the end)
    and at train end, on `num_samples` seeded items per task. The data is loaded and checked here, at construction,
    so a bad path fails before training starts."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        tasks: str | Sequence[str],
        *,
        gsm8k_path: str | None = None,
        mmlu_dir: str | None = None,
        prompts_path: str | None = None,
        num_samples: int | None = 64,
        max_new_tokens: int = 128,
        seed: int = 0,
        data_seed: int | None = None,
        eval_steps: int | None = None,
        gsm8k_chat: bool | None = None,
        num_fewshot: int = 5,
        samples_per_prompt: int = 4,
        temperature: float = 1.0,
        batch_size: int = 16,
        reward_fns: Any = None,
        ref_model: torch.nn.Module | None = None,
        embedder: Any = "auto",
        log_samples: bool = True,
        eval_on_train_end: bool = True,
        progress: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.tasks = parse_tasks(tasks)
        self.chat = resolve_chat(gsm8k_chat, tokenizer)
        self.data = load_eval_data(
            self.tasks,
            gsm8k_path=gsm8k_path,
            mmlu_dir=mmlu_dir,
            prompts_path=prompts_path,
            num_samples=num_samples,
            seed=seed if data_seed is None else data_seed,  # the subset; `seed` seeds the sampling
            chat=self.chat,
            num_fewshot=num_fewshot,
        )
        self.run_kwargs = {
            "chat": self.chat,
            "num_fewshot": num_fewshot,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "samples_per_prompt": samples_per_prompt,
            "temperature": temperature,
            "seed": seed,
            "reward_fns": normalize_reward_fns(reward_fns),
            "ref_model": ref_model,
            "embedder": embedder,
            "progress": progress,
        }
        self.eval_steps = eval_steps
        self.log_samples = log_samples
        self.eval_on_train_end = eval_on_train_end
        self.history: list[dict[str, float]] = []  # every evaluation's flat metrics, with "step"
        self._last_step: int | None = None
        self._warned_sharded = False

    def _interval(self, args: TrainingArguments, state: TrainerState) -> int | None:
        steps = self.eval_steps if self.eval_steps is not None else getattr(args, "eval_steps", None)
        if not steps:
            return None
        if isinstance(steps, float) and steps < 1:  # the trainer's "fraction of max_steps" form
            return max(1, int(steps * state.max_steps))
        return int(steps)

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        interval = self._interval(args, state)
        if interval and state.global_step % interval == 0:
            self.evaluate(args, state, model)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if self.eval_on_train_end:
            self.evaluate(args, state, model)

    def evaluate(self, args: TrainingArguments, state: TrainerState, model: torch.nn.Module | None) -> None:
        """One evaluation at `state.global_step` (once per step), main process only."""
        if not state.is_world_process_zero or model is None or self._last_step == state.global_step:
            return
        if _is_sharded(args):
            if not self._warned_sharded:
                logger.warning(
                    "EvalCallback skipped: sharded parameters (FSDP/ZeRO-3) cannot be evaluated on one rank."
                )
                self._warned_sharded = True
            return
        self._last_step = state.global_step
        model = unwrap(model)
        device_type = next(model.parameters()).device.type
        autocast_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        # The same mixed precision as the training forward: a bf16-trained 4-bit model's modules expect it.
        autocast = (
            torch.autocast(device_type=device_type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        start = time.perf_counter()
        with autocast:
            full = run_tasks(model, self.tokenizer, self.tasks, self.data, **self.run_kwargs)
        metrics = flatten_metrics(full["results"])
        metrics["eval/suite/runtime_s"] = time.perf_counter() - start
        step = state.global_step
        state.log_history.append({**metrics, "step": step})
        self.history.append({**metrics, "step": step})
        self._log_wandb(step, metrics, full["samples"])

    def _log_wandb(self, step: int, metrics: dict[str, float], samples: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is None:
            return
        payload: dict[str, Any] = {**metrics, "train/global_step": step}
        if self.log_samples:
            rows = samples_table_rows(step, samples)
            if rows:
                payload[f"eval/samples_step_{step}"] = wandb.Table(columns=TABLE_COLUMNS, data=rows)
        wandb.run.log(payload)


# ----------------------------------------------------------------------------------------------------------------
# The recipes' hooks


def eval_settings(recipe_args: RecipeArguments, seed: int) -> dict[str, Any]:
    return {
        "tasks": [task for task in recipe_args.eval_tasks if task],  # `--eval_tasks ""` turns evaluation off
        "gsm8k_path": recipe_args.eval_gsm8k_path,
        "mmlu_dir": recipe_args.eval_mmlu_dir,
        "num_samples": recipe_args.eval_num_samples,
        "max_new_tokens": recipe_args.eval_max_new_tokens,
        "batch_size": recipe_args.eval_batch_size,
        "seed": seed,
        "data_seed": recipe_args.eval_data_seed,
    }


def build_eval_callback(
    recipe_args: RecipeArguments, tokenizer: PreTrainedTokenizerBase, seed: int
) -> list[TrainerCallback]:
    """The evaluation-suite callback, or none when `eval_tasks` is empty."""
    settings = eval_settings(recipe_args, seed)
    if not settings["tasks"]:
        return []
    return [EvalCallback(tokenizer=tokenizer, **settings)]


def final_evaluation(recipe_args: RecipeArguments, trainer: Trainer, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Run the evaluation suite once on the trained model (main process), returning `eval/<task>/<metric>` values."""
    settings = eval_settings(recipe_args, trainer.args.seed)
    if not settings["tasks"] or not trainer.accelerator.is_main_process:
        return {}
    # The callback evaluates on the last step and at train end: reuse that instead of generating everything again.
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, EvalCallback) and callback.history:
            last = callback.history[-1]
            if last["step"] == trainer.state.global_step:
                return {key: value for key, value in last.items() if key != "step"}

    model = trainer.accelerator.unwrap_model(trainer.model)
    return evaluate_model(model, tokenizer, **settings)
