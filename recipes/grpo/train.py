"""Group Relative Policy Optimization (GRPO) from the SFT policy with QLoRA, on TRL's `GRPOTrainer`.

    accelerate launch recipes/grpo/train.py --config recipes/grpo/config.yaml [--key value ...]

Reads top to bottom: parse config, check the output dir, load the prompts (GSM8K layout or TRL prompt format), set up
and try the reward functions, load the SFT policy (`recipes/common/policy.py`: the SFT adapter trains, a frozen copy
is the KL reference), W&B and the evaluation callback, train, evaluate, save the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from eval.callback import build_eval_callback, final_evaluation
from recipes.common.config import ConfigError, QLoRAModelConfig, RecipeArguments, config_to_dict, parse_config
from recipes.common.data import load_train_eval, take
from recipes.common.errors import run_cli
from recipes.common.modeling import describe_precision
from recipes.common.outputs import mark_finished, prepare_output_dir
from recipes.common.policy import check_prompt_lengths, context_length, load_policy, load_policy_tokenizer
from recipes.common.reward import CombinedReward, WhiteningMode, combination_for
from recipes.common.tracking import check_parent_runs, init_wandb, log_lineage, run_location
from recipes.grpo.rewards import build_reward_functions, preflight

# The demo's math data and hub GSM8K have `question` + `answer`; TRL's prompt format has `prompt` (+ columns).
GRPO_FORMATS = [["prompt", "answer"], ["question", "answer"], ["prompt"]]


@dataclass
class GRPORecipeArguments:
    """Which rewards GRPO optimises (weighted by `reward_weights`, in this order) and how prompts are checked."""

    reward_functions: list[str] = field(
        default_factory=lambda: ["correctness", "format"],
        metadata={"help": "From: correctness (eval.gsm8k.grade), format (#### N last line), length, rm."},
    )
    correctness_mode: Literal["flexible", "strict"] = field(
        default="flexible", metadata={"help": "eval.gsm8k.grade mode: flexible (last number) or strict (#### N)."}
    )
    length_target_tokens: int = field(
        default=0, metadata={"help": "`length` reward: 0 up to this many tokens, then down to -1 at the limit."}
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "`rm` reward: the helpfulness RM (a recipes/reward output dir or full model)."}
    )
    safety_reward_model_path: str | None = field(
        default=None, metadata={"help": "`rm` reward: the safety RM; with it, Llama 2's gated combination of the two."}
    )
    safety_threshold: float = field(
        default=0.15, metadata={"help": "`rm` reward: use the safety score when sigmoid(safety score) is below this."}
    )
    reward_whitening: WhiteningMode = field(
        default="batch",
        metadata={
            "help": "`rm` reward whitening: batch (mean/std of each scored batch, over all processes), fixed "
            "(reward_whitening_mean/std; unset: the helpfulness RM's rm_eval.json score_mean/score_std) or none."
        },
    )
    reward_whitening_mean: float | None = field(
        default=None, metadata={"help": "reward_whitening fixed: the mean subtracted (default: from rm_eval.json)."}
    )
    reward_whitening_std: float | None = field(
        default=None, metadata={"help": "reward_whitening fixed: the std divided by (default: from rm_eval.json)."}
    )
    safety_column: str | None = field(
        default=None, metadata={"help": "`rm` reward: column tagging safety prompts (default: is_unsafe_prompt/task)."}
    )
    drop_long_prompts: bool = field(
        default=False, metadata={"help": "Skip prompts that leave no room to respond (default: error)."}
    )


CONFIG_TYPES = (RecipeArguments, GRPOConfig, QLoRAModelConfig, GRPORecipeArguments)


def to_prompts(dataset: Dataset, chat: bool) -> Dataset:
    """GSM8K layout to TRL's prompt format: the question as one user turn, as the SFT data and the eval suite's chat
    variant pose it (or the eval suite's "Question: ...\\nAnswer:" for a model without a chat template)."""
    if "prompt" in dataset.column_names:
        return dataset

    def convert(row: dict) -> dict:
        question = row["question"]
        return {"prompt": [{"role": "user", "content": question}] if chat else f"Question: {question}\nAnswer:"}

    return dataset.map(convert, remove_columns=["question"])


def combined_rm_reward(grpo_args: GRPORecipeArguments) -> CombinedReward:
    """Llama 2's combination of a helpfulness and a safety RM (`recipes/common/reward.py`). The RMs score the text
    with their own tokenizers, so unlike PPO they need not share the policy's."""
    if not grpo_args.reward_model_path:
        raise ConfigError("`reward_functions` lists 'rm': set `reward_model_path` (and optionally the safety RM's).")
    combination = combination_for(grpo_args, grpo_args.reward_model_path)
    return CombinedReward(
        grpo_args.reward_model_path,
        grpo_args.safety_reward_model_path,
        combination=combination,
        safety_column=grpo_args.safety_column,
        name="rm",
    )


def main(argv: list[str] | None = None) -> GRPOTrainer:
    recipe_args, training_args, model_args, grpo_args = parse_config(CONFIG_TYPES, argv)
    weights = training_args.reward_weights
    if weights is not None and len(weights) != len(grpo_args.reward_functions):
        raise ConfigError(
            f"reward_weights {weights} has {len(weights)} entries for the {len(grpo_args.reward_functions)} "
            f"reward_functions {grpo_args.reward_functions}: give one weight per function, in the same order."
        )
    resume_from = prepare_output_dir(
        training_args.output_dir, recipe_args.overwrite_output_dir, training_args.resume_from_checkpoint
    )
    check_parent_runs(recipe_args.parent_run)

    # Data and rewards: checked before the model loads, so a wrong column or a broken reward fails in seconds.
    train_dataset, eval_dataset = load_train_eval(
        recipe_args.dataset_name,
        recipe_args.dataset_train_split,
        recipe_args.dataset_test_split if training_args.eval_strategy != "no" else None,
        recipe_args.dataset_config,
        GRPO_FORMATS,
        recipe="GRPO",
        eval_name_or_path=recipe_args.eval_dataset_name,
    )
    train_dataset = take(train_dataset, recipe_args.max_train_samples, training_args.seed)
    tokenizer = load_policy_tokenizer(
        model_args,
        require_chat_template="prompt" in train_dataset.column_names and isinstance(train_dataset[0]["prompt"], list),
        padding_side="left",
    )
    chat = bool(tokenizer.chat_template)
    train_dataset = to_prompts(train_dataset, chat)
    context = context_length(model_args.model_name_or_path)
    if context is not None:
        train_dataset = check_prompt_lengths(
            train_dataset,
            tokenizer,
            context - training_args.max_completion_length,
            f"Dataset {recipe_args.dataset_name!r}",
            f"the model's context {context} minus max_completion_length {training_args.max_completion_length}",
            drop=grpo_args.drop_long_prompts,
        )
    if eval_dataset is not None:
        eval_dataset = to_prompts(take(eval_dataset, recipe_args.max_eval_samples, training_args.seed), chat)
    reward_funcs = build_reward_functions(
        grpo_args.reward_functions,
        correctness_mode=grpo_args.correctness_mode,
        length_target_tokens=grpo_args.length_target_tokens,
        max_completion_length=training_args.max_completion_length,
        rm_reward=combined_rm_reward(grpo_args) if "rm" in grpo_args.reward_functions else None,
    )
    preflight(reward_funcs, train_dataset, tokenizer)

    model, peft_config = load_policy(model_args, gradient_checkpointing=training_args.gradient_checkpointing)
    callbacks = build_eval_callback(recipe_args, tokenizer, training_args.seed)
    run = init_wandb(
        training_args.report_to,
        project=recipe_args.wandb_project,
        run_name=training_args.run_name or f"grpo-{model_args.model_name_or_path.rstrip('/').split('/')[-1]}",
        stage="grpo",
        method="grpo",
        seed=training_args.seed,
        config=config_to_dict(recipe_args, training_args, model_args, grpo_args),
        group=recipe_args.wandb_group,
        entity=recipe_args.wandb_entity,
        extra_tags=recipe_args.wandb_tags,
    )

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    print(
        f"[grpo] process {training_args.process_index} of {training_args.world_size}: {describe_precision(model)} "
        f"base, {len(train_dataset)} prompts x {training_args.num_generations} completions, rewards "
        f"{grpo_args.reward_functions} (weights {weights or 'equal'}), beta {training_args.beta}, output "
        f"{training_args.output_dir}",
        flush=True,
    )
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = {f"train/{k}": v for k, v in train_result.metrics.items()}
    if eval_dataset is not None:
        metrics.update({f"eval/{k.removeprefix('eval_')}": v for k, v in trainer.evaluate().items()})
    metrics.update(final_evaluation(recipe_args, trainer, tokenizer))

    # The output is the trained adapter alone; the frozen "ref" copy TRL added is the SFT adapter, already saved.
    if "ref" in getattr(trainer.model, "peft_config", {}):
        trainer.model.delete_adapter("ref")
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(training_args.output_dir)
        log_lineage(run, training_args.output_dir, recipe_args.parent_run, [recipe_args.dataset_name], metrics)
        summary = {"stage": "grpo", "metrics": metrics, "wandb": run_location(run)}
        summary["start_model"] = model_args.model_name_or_path  # the policy's start: python -m eval's KL reference
        mark_finished(training_args.output_dir, summary)
        print(f"[grpo] adapter saved to {training_args.output_dir}; W&B run: {run_location(run)}")
    if run is not None:
        run.summary.update(metrics)
        run.finish()
    return trainer


if __name__ == "__main__":
    run_cli(main)  # a user error prints `error: <message>` and exits 2, without a traceback
