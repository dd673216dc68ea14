"""PPO (RLHF) with QLoRA, starting from the SFT output, on the recipe's own trainer (recipes/ppo/trainer.py).

    accelerate launch recipes/ppo/train.py --config recipes/ppo/config.yaml [--key value ...]

Reads top to bottom: parse config, check the output dir, load and tokenize the prompts (left-padded ids), load
policy (+ reference adapter), value model and reward (on one shared base where they can be), set up W&B and the
evaluation callback, evaluate the SFT policy, train (resuming from the last checkpoint of an interrupted run),
evaluate, save the adapter. How the models are built: recipes/ppo/modeling.py and rewards.py; the PPO loop,
checkpoints and resume: recipes/ppo/trainer.py (arithmetic: algorithm.py); the reasons: recipes/ppo/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from accelerate import PartialState
from transformers import set_seed

from eval.callback import build_eval_callback
from recipes.common import policy as common_policy
from recipes.common.config import ConfigError, QLoRAModelConfig, RecipeArguments, config_to_dict, parse_config
from recipes.common.data import load_train_eval, take
from recipes.common.errors import run_cli
from recipes.common.modeling import describe_precision
from recipes.common.outputs import mark_finished, prepare_output_dir
from recipes.common.reward import WhiteningMode, combination_for
from recipes.common.tracking import init_wandb, run_location
from recipes.ppo.config import PPOConfig, batch_plan
from recipes.ppo.data import PPO_FORMATS, check_same_tokenizers, load_policy_tokenizer, select_prompts, tokenize_prompts
from recipes.ppo.modeling import load_ppo_models, value_init_path
from recipes.ppo.rewards import PPOReward, PromptTable, RewardSource, load_reward_models
from recipes.ppo.trainer import (
    PPOTrainer,
    check_resumable,
    checkpoint_is_complete,
    final_metrics,
    last_complete_checkpoint,
)


@dataclass
class PPOScriptArguments:
    """PPO options beyond `PPOConfig` (training), whose `reward_model_path` names the (helpfulness) reward model."""

    reward_source: RewardSource = field(
        default="math",
        metadata={
            "help": "math: 1/0 from the GSM8K grader against each prompt's `answer`; reward_model: the reward model "
            "at reward_model_path, combined with safety_reward_model_path when set (Llama 2)."
        },
    )
    math_grading: Literal["flexible", "strict"] = field(
        default="flexible", metadata={"help": "eval.gsm8k.grade mode: flexible or strict."}
    )
    math_partial_credit: float = field(
        default=0.0,
        metadata={"help": "Math reward += this x F1 of the response's numbers vs the reference solution's numbers."},
    )
    safety_reward_model_path: str | None = field(default=None, metadata={"help": "Safety RM output dir (optional)."})
    safety_threshold: float = field(default=0.15, metadata={"help": "Use the safety score when sigmoid(r_s) < this."})
    reward_whitening: WhiteningMode = field(
        default="batch",
        metadata={
            "help": "Combined reward whitening: batch (mean/std of each scored batch, over all processes), fixed "
            "(reward_whitening_mean/std; unset: the helpfulness RM's rm_eval.json score_mean/score_std) or none."
        },
    )
    reward_whitening_mean: float | None = field(
        default=None, metadata={"help": "reward_whitening fixed: the mean subtracted (default: from rm_eval.json)."}
    )
    reward_whitening_std: float | None = field(
        default=None, metadata={"help": "reward_whitening fixed: the std divided by (default: from rm_eval.json)."}
    )
    value_model_path: str | None = field(
        default=None,
        metadata={"help": "Value model init; default: reward_model_path for the RM reward, else the policy's base."},
    )
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Pad token for PPO (in the vocabulary, not EOS), for tokenizers that pad with EOS."},
    )
    drop_long_prompts: bool = field(
        default=False, metadata={"help": "Drop prompts with no room for response_length tokens instead of failing."}
    )
    eval_before_training: bool = field(default=True, metadata={"help": "Evaluate the SFT policy at step 0."})
    share_base: bool = field(
        default=True,
        metadata={
            "help": "Run the reference, the value model and reward models trained on the policy's base as adapters "
            "on the policy's one (4-bit) base; false: a copy of the base each (more memory, same numbers)."
        },
    )


CONFIG_TYPES = (RecipeArguments, PPOConfig, QLoRAModelConfig, PPOScriptArguments)


def main(argv: list[str] | None = None) -> PPOTrainer:
    recipe_args, training_args, model_args, ppo_args = parse_config(CONFIG_TYPES, argv)
    check_options(ppo_args, training_args, model_args)
    resume_from = prepare_output_dir(
        training_args.output_dir, recipe_args.overwrite_output_dir, training_args.resume_from_checkpoint
    )
    if resume_from and not checkpoint_is_complete(resume_from):
        complete = last_complete_checkpoint(training_args.output_dir)
        print(f"[ppo] {resume_from} is incomplete (killed while saving?); resuming from {complete}", flush=True)
        resume_from = complete

    # Data: prompts validated and tokenized (input_ids only, left-padded by the trainer) before any model loads.
    train_raw, eval_raw = load_train_eval(
        recipe_args.dataset_name,
        recipe_args.dataset_train_split,
        recipe_args.dataset_test_split,
        recipe_args.dataset_config,
        PPO_FORMATS,
        recipe="PPO",
        eval_name_or_path=recipe_args.eval_dataset_name,
    )
    needs_answer = ppo_args.reward_source == "math"
    train_raw = select_prompts(train_raw, needs_answer, f"PPO train prompts ({recipe_args.dataset_name})")
    eval_raw = select_prompts(eval_raw, needs_answer, f"PPO eval prompts ({recipe_args.dataset_test_split} split)")
    train_raw = take(train_raw, recipe_args.max_train_samples, training_args.seed)
    eval_raw = take(eval_raw, recipe_args.max_eval_samples, training_args.seed)
    tokenizer = load_policy_tokenizer(model_args, ppo_args.pad_token, chat=isinstance(train_raw[0]["prompt"], list))
    value_source = value_init_path(model_args, training_args, ppo_args)
    models = {"value": value_source}
    if ppo_args.reward_source == "reward_model":
        models.update(helpfulness=training_args.reward_model_path, safety=ppo_args.safety_reward_model_path)
    check_same_tokenizers(tokenizer, models)
    prompts = PromptTable()  # every prompt's token ids -> its row (answer, task), for the reward
    context = common_policy.context_length(model_args.model_name_or_path)
    train_dataset, eval_dataset = (
        tokenize_prompts(
            raw,
            tokenizer,
            prompts,
            context,
            training_args.response_length,
            drop_long_prompts=ppo_args.drop_long_prompts,
            where=f"PPO {split} prompts ({len(raw)} rows)",
        )
        for raw, split in ((train_raw, "train"), (eval_raw, "eval"))
    )
    plan = batch_plan(training_args, len(train_dataset), PartialState().num_processes)
    if resume_from:  # a checkpoint of other batch settings fails here, before any model loads
        check_resumable(resume_from, plan)

    # Models: policy (+ reference adapter), value model and reward models, sharing one base where they can.
    # Seeded first: a fresh value adapter and head are drawn here, before the trainer seeds, and were different in
    # every process (the same seed gave different runs with the grader reward).
    set_seed(training_args.seed)
    ppo_models = load_ppo_models(
        model_args, value_source, ppo_args.share_base, gradient_checkpointing=training_args.gradient_checkpointing
    )
    reward = PPOReward(
        ppo_args.reward_source,
        tokenizer,
        prompts,
        load_reward_models(tokenizer, prompts, training_args, ppo_args, model_args, ppo_models.shared),
        ppo_args.math_grading,
        ppo_args.math_partial_credit,
        chunk_size=training_args.local_rollout_forward_batch_size,
    )

    callbacks = build_eval_callback(recipe_args, tokenizer, training_args.seed)
    run = init_wandb(
        training_args.report_to,
        project=recipe_args.wandb_project,
        run_name=training_args.run_name or f"ppo-{model_args.model_name_or_path.rstrip('/').split('/')[-1]}",
        stage="ppo",
        method="ppo",
        seed=training_args.seed,
        config=config_to_dict(recipe_args, training_args, model_args, ppo_args),
        group=recipe_args.wandb_group,
        entity=recipe_args.wandb_entity,
        extra_tags=recipe_args.wandb_tags,
    )
    trainer = PPOTrainer(
        args=training_args,
        models=ppo_models,
        reward=reward,
        processing_class=tokenizer,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
        value_base_name=common_policy.adapter_base(value_source) or value_source,
    )
    shared = "shared base" if ppo_models.value.is_shared else "separate value model"
    print(
        f"[ppo] process {training_args.process_index} of {training_args.world_size}: {describe_precision(ppo_models.policy)} "
        f"policy ({shared}), reward {ppo_args.reward_source}, {len(train_dataset)} prompts, {plan.updates} updates "
        f"of {plan.batch_size} rollouts, output {training_args.output_dir}",
        flush=True,
    )
    if resume_from:
        trainer.resume(resume_from)
        print(f"[ppo] resumed from {resume_from} at update {trainer.state.global_step}", flush=True)
    elif ppo_args.eval_before_training:
        for callback in callbacks:  # the SFT policy at step 0: the "before" of the comparison
            callback.evaluate(training_args, trainer.state, ppo_models.policy)
    trainer.train()

    # Save: the trained policy adapter (loads with PeftModel.from_pretrained on the base) and the tokenizer.
    metrics = final_metrics(trainer.state.log_history)
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(training_args.output_dir)
        summary = {"stage": "ppo", "metrics": metrics, "wandb": run_location(run), "parent_run": recipe_args.parent_run}
        summary["start_model"] = model_args.model_name_or_path  # the policy's start: python -m eval's KL reference
        mark_finished(training_args.output_dir, summary)
        print(f"[ppo] adapter saved to {training_args.output_dir}; W&B run: {run_location(run)}")
        for key in ("eval/gsm8k/accuracy", "train/reward/mean", "train/objective/kl"):
            if key in metrics:
                before = metrics.get(f"before/{key}")
                print(f"[ppo] {key}: {metrics[key]:.4f}" + (f" (before: {before:.4f})" if before is not None else ""))
    if run is not None:
        run.summary.update(metrics)
        run.finish()
    return trainer


def check_options(ppo_args: PPOScriptArguments, training_args: PPOConfig, model_args: QLoRAModelConfig) -> None:
    if ppo_args.reward_source == "reward_model" and not training_args.reward_model_path:
        raise ConfigError("reward_source 'reward_model' needs `reward_model_path` (the reward recipe's output dir).")
    if ppo_args.reward_source == "reward_model":
        combination_for(ppo_args, training_args.reward_model_path)  # fixed whitening's statistics, before any load
    if not model_args.use_peft:
        raise ConfigError("The PPO recipe trains LoRA adapters (policy and value model): keep `use_peft: true`.")
    if training_args.stop_token is None and training_args.stop_token_id is None:
        print("[ppo] no stop_token: every response runs to response_length (set `stop_token: eos` to end at EOS)")
    for path in (training_args.reward_model_path, ppo_args.safety_reward_model_path, ppo_args.value_model_path):
        if path and path.startswith((".", "/", "~", "outputs")) and not Path(path).expanduser().exists():
            raise ConfigError(
                f"{path!r} does not exist. Train the reward model(s) first (recipes/reward/train.py with "
                "recipes/reward/config.yaml and safety.yaml), or point reward_model_path / value_model_path elsewhere."
            )


if __name__ == "__main__":
    run_cli(main)  # a user error prints `error: <message>` and exits 2, without a traceback
