"""The evaluation suite (`eval/`) wired into the recipes: a callback every `eval_steps` and a final evaluation."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback

from recipes.common.config import RecipeArguments


def eval_settings(recipe_args: RecipeArguments, seed: int) -> dict[str, Any]:
    return {
        "tasks": [task for task in recipe_args.eval_tasks if task],  # `--eval_tasks ""` turns evaluation off
        "gsm8k_path": recipe_args.eval_gsm8k_path,
        "mmlu_dir": recipe_args.eval_mmlu_dir,
        "num_samples": recipe_args.eval_num_samples,
        "max_new_tokens": recipe_args.eval_max_new_tokens,
        "batch_size": recipe_args.eval_batch_size,
        "seed": seed,
    }


def build_eval_callback(
    recipe_args: RecipeArguments, tokenizer: PreTrainedTokenizerBase, seed: int
) -> list[TrainerCallback]:
    """The evaluation-suite callback, or none when `eval_tasks` is empty."""
    settings = eval_settings(recipe_args, seed)
    if not settings["tasks"]:
        return []
    from eval.callback import EvalCallback

    return [EvalCallback(tokenizer=tokenizer, **settings)]


def final_evaluation(recipe_args: RecipeArguments, trainer: Trainer, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Run the evaluation suite once on the trained model (main process), returning `eval/<task>/<metric>` values."""
    settings = eval_settings(recipe_args, trainer.args.seed)
    if not settings["tasks"] or not trainer.accelerator.is_main_process:
        return {}
    from eval import evaluate_model
    from eval.callback import EvalCallback

    # The callback evaluates on the last step and at train end: reuse that instead of generating everything again.
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, EvalCallback) and callback.history:
            last = callback.history[-1]
            if last["step"] == trainer.state.global_step:
                return {key: value for key, value in last.items() if key != "step"}

    model = trainer.accelerator.unwrap_model(trainer.model)
    return evaluate_model(model, tokenizer, **settings)
