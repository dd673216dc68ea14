"""Direct Preference Optimization (DPO and its IPO / robust / reference-free variants) from the SFT policy with QLoRA,
on TRL's `DPOTrainer`.

    accelerate launch recipes/dpo/train.py --config recipes/dpo/config.yaml [--key value ...]

Reads top to bottom: parse and check the loss settings, check the output dir, load and check the preference data,
load the SFT policy (`recipes/common/policy.py`: the SFT adapter trains, a frozen copy of it is the reference), set
up W&B and the evaluation callback, train, evaluate, save the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import Dataset
from trl import DPOConfig, DPOTrainer
from trl.data_utils import extract_prompt

from eval.callback import build_eval_callback, final_evaluation
from recipes.common.config import ConfigError, QLoRAModelConfig, RecipeArguments, config_to_dict, parse_config
from recipes.common.data import load_train_eval, take
from recipes.common.errors import run_cli
from recipes.common.modeling import describe_precision
from recipes.common.outputs import mark_finished, prepare_output_dir
from recipes.common.policy import check_prompt_lengths, load_policy, load_policy_tokenizer
from recipes.common.tracking import check_parent_runs, init_wandb, log_lineage, run_location
from recipes.dpo.reference_kl import ReferenceKLCallback

# Explicit prompt (TRL's preference format), or implicit: the shared start of `chosen` and `rejected` conversations.
DPO_FORMATS = [["prompt", "chosen", "rejected"], ["chosen", "rejected"]]
# TRL 1.16 reads `label_smoothing` only in these losses; elsewhere it would be silently ignored.
SMOOTHED_LOSSES = {"robust", "exo_pair", "aot", "aot_unpaired"}


@dataclass
class DPORecipeArguments:
    """Options of this recipe on top of TRL's `DPOConfig`."""

    reference_free: bool = field(
        default=False,
        metadata={"help": "No reference model: log pi_ref = 0 in the loss (reference-free DPO); nothing is loaded."},
    )
    drop_long_prompts: bool = field(
        default=False, metadata={"help": "Skip pairs whose prompt fills max_length (default: error)."}
    )


CONFIG_TYPES = (RecipeArguments, DPOConfig, QLoRAModelConfig, DPORecipeArguments)


def check_loss_settings(args: DPOConfig) -> None:
    """Reject settings TRL would accept but not apply, before anything loads."""
    smoothed = SMOOTHED_LOSSES.intersection(args.loss_type)
    if args.label_smoothing and not smoothed:
        raise ConfigError(
            f"label_smoothing={args.label_smoothing} has no effect with loss_type {args.loss_type} in TRL 1.16. For "
            "DPO robust to flipped labels use `loss_type: robust` (label_smoothing = the flip probability, < 0.5)."
        )
    if "robust" in args.loss_type and not 0.0 <= args.label_smoothing < 0.5:
        raise ConfigError(f"robust DPO needs 0 <= label_smoothing < 0.5 (got {args.label_smoothing}).")
    if args.beta <= 0:
        raise ConfigError(f"beta must be positive (got {args.beta}); it scales the implicit reward.")


def with_prompt(dataset: Dataset) -> Dataset:
    """Implicit-prompt pairs (whole conversations in `chosen`/`rejected`, e.g. trl-lib/ultrafeedback_binarized) split
    into prompt + responses here, as TRL would, so the prompts can be checked before training."""
    return dataset if "prompt" in dataset.column_names else dataset.map(extract_prompt)


def without_reference(dataset: Dataset) -> Dataset:
    """Reference-free DPO: TRL 1.16 has no switch for it, but its precomputed-reference path with reference log-probs
    of 0 computes exactly that loss (and the reference is never run)."""
    zeros = [0.0] * len(dataset)
    return dataset.add_column("ref_chosen_logps", zeros).add_column("ref_rejected_logps", zeros)


def main(argv: list[str] | None = None) -> DPOTrainer:
    recipe_args, training_args, model_args, dpo_args = parse_config(CONFIG_TYPES, argv)
    check_loss_settings(training_args)
    resume_from = prepare_output_dir(
        training_args.output_dir, recipe_args.overwrite_output_dir, training_args.resume_from_checkpoint
    )
    check_parent_runs(recipe_args.parent_run)

    # Data: validated before the model loads, so a missing `chosen`/`rejected` or an over-long prompt fails in seconds.
    train_dataset, eval_dataset = load_train_eval(
        recipe_args.dataset_name,
        recipe_args.dataset_train_split,
        recipe_args.dataset_test_split if training_args.eval_strategy != "no" else None,
        recipe_args.dataset_config,
        DPO_FORMATS,
        recipe="DPO",
        eval_name_or_path=recipe_args.eval_dataset_name,
    )
    train_dataset = take(train_dataset, recipe_args.max_train_samples, training_args.seed)
    if eval_dataset is not None:
        eval_dataset = take(eval_dataset, recipe_args.max_eval_samples, training_args.seed)
    conversational = isinstance(train_dataset[0]["chosen"], list)
    tokenizer = load_policy_tokenizer(model_args, require_chat_template=conversational)
    train_dataset = with_prompt(train_dataset)
    eval_dataset = with_prompt(eval_dataset) if eval_dataset is not None else None
    if training_args.max_length is not None:
        # TRL would silently drop these pairs (keep_start truncation leaves them no response tokens).
        limit, drop = training_args.max_length, dpo_args.drop_long_prompts
        train_dataset = check_prompt_lengths(
            train_dataset, tokenizer, limit, f"Dataset {recipe_args.dataset_name!r}", "max_length", drop
        )
        if eval_dataset is not None:
            eval_dataset = check_prompt_lengths(eval_dataset, tokenizer, limit, "Eval dataset", "max_length", drop)
    if dpo_args.reference_free:
        train_dataset = without_reference(train_dataset)
        eval_dataset = without_reference(eval_dataset) if eval_dataset is not None else None

    model, peft_config = load_policy(model_args, gradient_checkpointing=training_args.gradient_checkpointing)
    callbacks = build_eval_callback(recipe_args, tokenizer, training_args.seed)
    if eval_dataset is not None and not dpo_args.reference_free:
        callbacks.append(ReferenceKLCallback(eval_dataset, tokenizer))
    run = init_wandb(
        training_args.report_to,
        project=recipe_args.wandb_project,
        run_name=training_args.run_name or f"dpo-{model_args.model_name_or_path.rstrip('/').split('/')[-1]}",
        stage="dpo",
        method="dpo-reference-free" if dpo_args.reference_free else f"dpo-{'+'.join(training_args.loss_type)}",
        seed=training_args.seed,
        config=config_to_dict(recipe_args, training_args, model_args, dpo_args),
        group=recipe_args.wandb_group,
        entity=recipe_args.wandb_entity,
        extra_tags=recipe_args.wandb_tags,
    )

    trainer = DPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    if dpo_args.reference_free:
        trainer.precompute_ref_logps = True  # read the zero reference log-probs from the batch (see without_reference)
    print(
        f"[dpo] process {training_args.process_index} of {training_args.world_size}: {describe_precision(model)} "
        f"base, loss {training_args.loss_type}, beta {training_args.beta}, reference "
        f"{'none' if dpo_args.reference_free else 'the SFT policy'}, {len(train_dataset)} pairs, output "
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
        summary = {"stage": "dpo", "metrics": metrics, "wandb": run_location(run)}
        summary["start_model"] = model_args.model_name_or_path  # the policy's start: python -m eval's KL reference
        mark_finished(training_args.output_dir, summary)
        print(f"[dpo] adapter saved to {training_args.output_dir}; W&B run: {run_location(run)}")
    if run is not None:
        run.summary.update(metrics)
        run.finish()
    return trainer


if __name__ == "__main__":
    run_cli(main)  # a user error prints `error: <message>` and exits 2, without a traceback
