"""Supervised fine-tuning (SFT) with QLoRA on TRL's `SFTTrainer`.

    accelerate launch recipes/sft/train.py --config recipes/sft/config.yaml [--key value ...]

Reads top to bottom: parse config, check the output dir, load data, load tokenizer and model, set up W&B and the
evaluation callback, train, evaluate, save the adapter (and optionally a merged bf16 copy).
"""

from __future__ import annotations

from datasets import Dataset
from trl import SFTConfig, SFTTrainer, get_peft_config

from eval.callback import build_eval_callback, final_evaluation
from recipes.common.config import QLoRAModelConfig, RecipeArguments, config_to_dict, parse_config
from recipes.common.data import load_train_eval, take
from recipes.common.errors import run_cli
from recipes.common.modeling import (
    describe_precision,
    load_model,
    load_tokenizer,
    merge_adapter_into_base,
    set_model_pad_token_id,
    training_chat_template,
)
from recipes.common.outputs import mark_finished, prepare_output_dir
from recipes.common.tracking import init_wandb, run_location

# TRL's SFT formats: conversational `messages`, prompt-completion (completion-only loss), or plain `text`.
CONFIG_TYPES = (RecipeArguments, SFTConfig, QLoRAModelConfig)
SFT_FORMATS = [["messages"], ["prompt", "completion"], ["text"]]


def only_messages(dataset: Dataset) -> Dataset:
    return dataset.remove_columns([name for name in ("prompt", "completion") if name in dataset.column_names])


def main(argv: list[str] | None = None) -> SFTTrainer:
    recipe_args, training_args, model_args = parse_config(CONFIG_TYPES, argv)
    resume_from = prepare_output_dir(
        training_args.output_dir, recipe_args.overwrite_output_dir, training_args.resume_from_checkpoint
    )

    # Data: validated before the model loads, so a wrong column fails in seconds.
    train_dataset, eval_dataset = load_train_eval(
        recipe_args.dataset_name,
        recipe_args.dataset_train_split,
        recipe_args.dataset_test_split if training_args.eval_strategy != "no" else None,
        recipe_args.dataset_config,
        SFT_FORMATS,
        recipe="SFT",
        eval_name_or_path=recipe_args.eval_dataset_name,
    )
    train_dataset = take(train_dataset, recipe_args.max_train_samples, training_args.seed)
    if eval_dataset is not None:
        eval_dataset = take(eval_dataset, recipe_args.max_eval_samples, training_args.seed)
    if "messages" in train_dataset.column_names:
        # UltraChat also carries its first user turn as a string `prompt`, which TRL would take for prompt-completion
        # data (and for "not conversational"): with `messages`, the conversation is all SFT reads.
        train_dataset = only_messages(train_dataset)
        eval_dataset = only_messages(eval_dataset) if eval_dataset is not None else None
    conversational = "text" not in train_dataset.column_names

    # Tokenizer and model: QLoRA (4-bit NF4 base + LoRA adapter added by the trainer) unless configured otherwise.
    # The tokenizer pads with a token other than EOS (chosen here when the model has none; saved with it).
    tokenizer = load_tokenizer(model_args, require_chat_template=conversational, pad_token=training_args.pad_token)
    # Assistant-only loss trains through a template with {% generation %} markers that renders the model's own text;
    # the model's own template is what gets saved, for inference. A user's `chat_template_path` wins (TRL applies it).
    inference_chat_template = tokenizer.chat_template
    if training_args.assistant_only_loss and not training_args.chat_template_path:
        tokenizer.chat_template = training_chat_template(tokenizer, model_args.model_name_or_path)
    model = load_model(model_args, gradient_checkpointing=training_args.gradient_checkpointing)
    set_model_pad_token_id(model, tokenizer)

    callbacks = build_eval_callback(recipe_args, tokenizer, training_args.seed)  # checks eval data before W&B starts
    run = init_wandb(
        training_args.report_to,
        project=recipe_args.wandb_project,
        run_name=training_args.run_name or f"sft-{model_args.model_name_or_path.rstrip('/').split('/')[-1]}",
        stage="sft",
        method="sft",
        seed=training_args.seed,
        config=config_to_dict(recipe_args, training_args, model_args),
        group=recipe_args.wandb_group,
        entity=recipe_args.wandb_entity,
        extra_tags=recipe_args.wandb_tags,
    )

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
    )
    print(
        f"[sft] process {training_args.process_index} of {training_args.world_size}: {describe_precision(model)} base, "
        f"{len(train_dataset)} train rows, output {training_args.output_dir}",
        flush=True,
    )
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = {f"train/{k}": v for k, v in train_result.metrics.items()}
    if eval_dataset is not None:
        metrics.update({f"eval/{k.removeprefix('eval_')}": v for k, v in trainer.evaluate().items()})
    metrics.update(final_evaluation(recipe_args, trainer, tokenizer))

    # Save: the LoRA adapter (or full model), the tokenizer, and optionally a merged bf16 copy.
    if not training_args.chat_template_path:
        tokenizer.chat_template = inference_chat_template
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        trainer.processing_class.save_pretrained(training_args.output_dir)  # TRL's, if `chat_template_path` cloned one
        if model_args.merge_adapter and model_args.use_peft:
            merged_dir = merge_adapter_into_base(model_args, training_args.output_dir)
            print(f"[sft] merged bf16 model saved to {merged_dir}")
        mark_finished(training_args.output_dir, {"stage": "sft", "metrics": metrics, "wandb": run_location(run)})
        print(f"[sft] adapter saved to {training_args.output_dir}; W&B run: {run_location(run)}")
    if run is not None:
        run.summary.update(metrics)
        run.finish()
    return trainer


if __name__ == "__main__":
    run_cli(main)  # a user error prints `error: <message>` and exits 2, without a traceback
