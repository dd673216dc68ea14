"""Reward model (helpfulness or safety) with QLoRA on TRL's `RewardTrainer`, with Llama 2's margin in the loss.

    accelerate launch recipes/reward/train.py --config recipes/reward/config.yaml   # helpfulness RM
    accelerate launch recipes/reward/train.py --config recipes/reward/safety.yaml   # safety RM

Reads top to bottom: parse config, check the output dir, load and check the pairs (ratings -> margins), tokenizer,
model (4-bit base + LoRA + a float32 score head), W&B and the RM-evaluation callback, train, evaluate (accuracy per
rating bucket, gap, calibration -> rm_eval.json), save the adapter with its score head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import set_seed
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import suppress_seqcls_warning

from eval.reward_model import (
    RewardModelEvalCallback,
    flatten_rm_metrics,
    format_table,
    save_json,
)
from recipes.common.config import ConfigError, QLoRAModelConfig, RecipeArguments, config_to_dict, parse_config
from recipes.common.data import load_train_eval, take
from recipes.common.errors import run_cli
from recipes.common.modeling import ModelLoadError, describe_precision, load_model, load_tokenizer
from recipes.common.outputs import mark_finished, prepare_output_dir
from recipes.common.policy import adapter_base
from recipes.common.reward import RM_INFO_FILE
from recipes.common.tracking import init_wandb, run_location
from recipes.reward.data import PAIR_FORMATS, prepare_pairs, tokenize_pairs
from recipes.reward.modeling import keep_trainable_float32, reward_peft_config

RM_EVAL_FILE = "rm_eval.json"


@dataclass
class RewardScriptArguments:
    """Reward-recipe options beyond TRL's `RewardConfig`."""

    reward_kind: Literal["helpfulness", "safety"] = field(
        default="helpfulness", metadata={"help": "helpfulness or safety (names and tags)."}
    )
    margin_set: Literal["none", "small", "large"] = field(  # the keys of MARGIN_SETS
        default="none",
        metadata={"help": "Llama 2 margins by rating: none, small {1, 2/3, 1/3, 0} or large {3, 2, 1, 0}."},
    )
    rating_column: str = field(default="rating", metadata={"help": "Column with the 4-level rating of each pair."})
    calibration_bins: int = field(default=10, metadata={"help": "Bins of the calibration (ECE) of sigmoid(gap)."})
    safety_threshold: float = field(
        default=0.15, metadata={"help": "Evaluated on safety data: sigmoid(score) < threshold flags unsafe responses."}
    )


CONFIG_TYPES = (RecipeArguments, RewardConfig, QLoRAModelConfig, RewardScriptArguments)


def main(argv: list[str] | None = None) -> RewardTrainer:
    recipe_args, training_args, model_args, rm_args = parse_config(CONFIG_TYPES, argv)
    check_options(recipe_args, rm_args, model_args)
    resume_from = prepare_output_dir(
        training_args.output_dir, recipe_args.overwrite_output_dir, training_args.resume_from_checkpoint
    )

    # Data: pairs checked and ratings mapped to margins before the model loads, so bad rows fail in seconds.
    train_raw, eval_raw = load_train_eval(
        recipe_args.dataset_name,
        recipe_args.dataset_train_split,
        recipe_args.dataset_test_split or None,  # evaluated at the end even with eval_strategy "no"
        recipe_args.dataset_config,
        PAIR_FORMATS,
        recipe="reward",
        eval_name_or_path=recipe_args.eval_dataset_name,
    )
    train_raw = prepare_pairs(
        take(train_raw, recipe_args.max_train_samples, training_args.seed), rm_args.margin_set,
        rm_args.rating_column, f"{recipe_args.dataset_name} ({recipe_args.dataset_train_split})",
    )  # fmt: skip
    if eval_raw is not None:
        eval_raw = prepare_pairs(
            take(eval_raw, recipe_args.max_eval_samples, training_args.seed), rm_args.margin_set,
            rm_args.rating_column, f"{recipe_args.eval_dataset_name or recipe_args.dataset_name} (eval)",
        )  # fmt: skip

    # Padding must not look like the final EOS, where the score is read: `pad_token`, the SFT run's, or chosen here.
    conversational = not isinstance(train_raw[0]["chosen"], str)
    tokenizer = load_tokenizer(model_args, require_chat_template=conversational, pad_token=training_args.pad_token)
    train_dataset = tokenize_pairs(train_raw, tokenizer, training_args.max_length, "reward train pairs")
    eval_dataset = None
    if eval_raw is not None:
        eval_dataset = tokenize_pairs(eval_raw, tokenizer, training_args.max_length, "reward eval pairs")

    # Model: the base as a sequence classifier (num_labels=1); the random score head is seeded.
    set_seed(training_args.seed)
    with suppress_seqcls_warning():  # "score.weight MISSING" is expected: the head is new
        model = load_model(model_args, gradient_checkpointing=training_args.gradient_checkpointing, num_labels=1)
    peft_config = reward_peft_config(model_args)

    # The RM evaluation (per rating bucket, calibration) reads its scores from the trainer's evaluation loop: one
    # forward pass over the eval pairs per evaluation (eval_dataset keeps the pairs' ratings, in the trainer's order).
    rm_eval = None
    if eval_dataset is not None:
        rm_eval = RewardModelEvalCallback(
            eval_dataset, tokenizer, rm_args.rating_column, training_args.per_device_eval_batch_size,
            rm_args.calibration_bins, rm_args.safety_threshold,
        )  # fmt: skip
    evaluating = rm_eval is not None and training_args.eval_strategy != "no"
    run = init_wandb(
        training_args.report_to,
        project=recipe_args.wandb_project,
        run_name=training_args.run_name or f"reward-{rm_args.reward_kind}-{rm_args.margin_set}",
        stage="reward",
        method=f"reward-{rm_args.reward_kind}",
        seed=training_args.seed,
        config=config_to_dict(recipe_args, training_args, model_args, rm_args),
        group=recipe_args.wandb_group,
        entity=recipe_args.wandb_entity,
        extra_tags=[f"margin:{rm_args.margin_set}", *recipe_args.wandb_tags],
    )

    trainer = RewardTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if evaluating else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[rm_eval] if evaluating else [],
        compute_metrics=rm_eval.compute_metrics if evaluating else None,
        preprocess_logits_for_metrics=rm_eval.preprocess_logits_for_metrics if evaluating else None,
    )
    upcast = keep_trainable_float32(trainer.model)
    print(
        f"[reward] {rm_args.reward_kind} RM, margin {rm_args.margin_set}, process {training_args.process_index} of "
        f"{training_args.world_size}: {describe_precision(model)} base, {upcast} trainable tensors in float32 "
        f"(LoRA + score head), {len(train_dataset)} train pairs, output {training_args.output_dir}",
        flush=True,
    )
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = {f"train/{k}": v for k, v in train_result.metrics.items()}

    # Final evaluation on the whole eval split: accuracy per rating bucket, gap, calibration (Table 28 layout).
    result = None
    if rm_eval is not None and trainer.accelerator.is_main_process:
        result = rm_eval.final(trainer.model, training_args, trainer.state)
        metrics.update(flatten_rm_metrics(result))
        print(format_table({f"{rm_args.reward_kind} RM, margin {rm_args.margin_set}": result}), flush=True)

    # Save: the adapter with the score head (modules_to_save), the tokenizer, how to load it, the evaluation.
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(training_args.output_dir)
        save_json(rm_info(model_args, rm_args, training_args), f"{training_args.output_dir}/{RM_INFO_FILE}")
        if result is not None:
            save_json(
                {"final": result, "history": rm_eval.history, "margin_set": rm_args.margin_set,
                 "reward_kind": rm_args.reward_kind},
                f"{training_args.output_dir}/{RM_EVAL_FILE}",
            )  # fmt: skip
        mark_finished(training_args.output_dir, {"stage": "reward", "metrics": metrics, "wandb": run_location(run)})
        print(f"[reward] adapter + score head saved to {training_args.output_dir}; W&B run: {run_location(run)}")
    if run is not None:
        run.summary.update(metrics)
        run.finish()
    return trainer


def check_options(recipe_args: RecipeArguments, rm_args: RewardScriptArguments, model_args: QLoRAModelConfig) -> None:
    if adapter_base(model_args.model_name_or_path) is not None:
        raise ModelLoadError(
            f"{model_args.model_name_or_path!r} is a LoRA adapter; a reward model starts from a full model. Start from "
            "the base, or from a merged SFT model (SFT with `merge_adapter: true` writes `<sft output>/merged`)."
        )
    if [task for task in recipe_args.eval_tasks if task]:
        raise ConfigError(
            f"eval_tasks {recipe_args.eval_tasks} are generation tasks for a policy; a reward model does not generate. "
            "Remove eval_tasks: the reward recipe evaluates pairwise accuracy, gap and calibration on its eval split."
        )


def rm_info(model_args: QLoRAModelConfig, rm_args: RewardScriptArguments, training_args: RewardConfig) -> dict:
    """What `recipes.common.reward.load_reward_model` needs to load this RM as it was trained."""
    return {
        "reward_kind": rm_args.reward_kind,
        "margin_set": rm_args.margin_set,
        "base_model": model_args.model_name_or_path,
        "load_in_4bit": bool(model_args.load_in_4bit),
        "use_bnb_nested_quant": bool(model_args.use_bnb_nested_quant),
        "bnb_4bit_quant_type": model_args.bnb_4bit_quant_type,
        "dtype": model_args.dtype,
        "max_length": training_args.max_length,
    }


if __name__ == "__main__":
    run_cli(main)  # a user error prints `error: <message>` and exits 2, without a traceback
