"""Rejection sampling (Llama 2 / RAFT) and iterative DPO from the SFT policy with QLoRA, in K resumable rounds.

    accelerate launch recipes/rejection_sampling/train.py --config recipes/rejection_sampling/config.yaml [--key value]

Each round: sample N responses per prompt from the current policy, score them (the GSM8K grader, a reward model or
the combined helpfulness + safety reward), keep the best per prompt (of this round, or of all rounds so far), fine-
tune with SFT on the kept set (or, `method: iterative_dpo`, DPO on best-vs-worst pairs), evaluate. Every stage is a
file under `output_dir/round_<k>/` (see rundir.py), so a killed run relaunched with the same command redoes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from accelerate import PartialState
from trl import SFTConfig

from recipes.common.config import ConfigError, QLoRAModelConfig, RecipeArguments, config_to_dict, parse_config
from recipes.common.errors import run_cli
from recipes.common.outputs import mark_finished
from recipes.common.policy import load_policy_tokenizer
from recipes.common.tracking import check_parent_runs, init_wandb, run_location
from recipes.rejection_sampling.loop import PolicyCache, run_round
from recipes.rejection_sampling.prompts import build_scorer, load_prompts
from recipes.rejection_sampling.reporting import copy_policy_files, log_summary, summary_table
from recipes.rejection_sampling.rundir import open_run_dir
from recipes.rejection_sampling.sampling import check_backend


@dataclass
class RejectionSamplingArguments:
    """The loop's choices (the SFT settings of each round are TRL's `SFTConfig`)."""

    method: Literal["rejection_sampling", "iterative_dpo"] = field(
        default="rejection_sampling", metadata={"help": "rejection_sampling (SFT on the best) or iterative_dpo."}
    )
    num_rounds: int = field(default=2, metadata={"help": "Rounds K; raising it on a finished run continues it."})
    num_samples: int = field(default=8, metadata={"help": "N responses sampled per prompt per round."})
    temperatures: list[float] = field(
        default_factory=lambda: [1.0],
        metadata={"help": "Sampling temperature per round (the last one repeats; Llama 2 went up to 1.2-1.3)."},
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling cutoff (1.0: plain sampling)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest response sampled."})
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts per generate call (x N sequences)."})
    generation_backend: Literal["hf", "vllm"] = field(
        default="hf", metadata={"help": "hf (transformers generate) or vllm (GPU only)."}
    )
    selection: Literal["best_of_round", "best_of_all_rounds"] = field(  # selection.SELECTIONS
        default="best_of_round", metadata={"help": "best_of_round, or best_of_all_rounds (Llama 2's regression fix)."}
    )
    keep_per_prompt: int = field(default=1, metadata={"help": "Highest-reward samples kept per prompt."})
    reward_threshold: float | None = field(default=None, metadata={"help": "Keep only samples scoring >= this."})
    dedupe: bool = field(default=True, metadata={"help": "Identical responses to a prompt count once."})
    keep_truncated: bool = field(default=False, metadata={"help": "Also keep responses cut by max_new_tokens."})
    train_from: Literal["sft", "last_round"] = field(
        default="last_round", metadata={"help": "sft (original policy) or last_round."}
    )
    scorer: Literal["gsm8k", "reward_model", "combined"] = field(
        default="gsm8k", metadata={"help": "gsm8k (the eval suite's grader), reward_model, combined."}
    )
    grader_mode: Literal["flexible", "strict"] = field(
        default="flexible", metadata={"help": "GSM8K grading: flexible (last number) or strict."}
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward model (helpfulness RM for combined)."}
    )
    safety_reward_model_path: str | None = field(default=None, metadata={"help": "Safety RM, for the combined scorer."})
    prompt_tasks: list[str] = field(default_factory=list, metadata={"help": "Keep prompts of these `task`s only."})
    eval_reward_samples: int = field(
        default=4, metadata={"help": "Samples per held-out prompt for the policy's mean reward (0: off)."}
    )
    eval_temperature: float = field(default=1.0, metadata={"help": "Temperature of the held-out reward samples."})
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO beta of the iterative_dpo rounds."})
    log_table_prompts: int = field(default=8, metadata={"help": "Prompts whose samples go in each round's W&B table."})


CONFIG_TYPES = (RecipeArguments, SFTConfig, QLoRAModelConfig, RejectionSamplingArguments)


def check_settings(rs: RejectionSamplingArguments, training_args: SFTConfig) -> None:
    """Every choice checked before anything loads or is written."""
    for name in ("num_rounds", "num_samples", "max_new_tokens", "generation_batch_size", "keep_per_prompt"):
        if getattr(rs, name) < 1:
            raise ConfigError(f"{name} must be >= 1 (got {getattr(rs, name)}).")
    if rs.method == "iterative_dpo" and rs.num_samples < 2:
        raise ConfigError("iterative_dpo pairs the best and worst of N samples: num_samples must be >= 2.")
    if not rs.temperatures or any(t <= 0 for t in rs.temperatures) or not 0 < rs.top_p <= 1:
        raise ConfigError(f"temperatures must be positive (got {rs.temperatures}) and 0 < top_p <= 1 (got {rs.top_p}).")
    if rs.scorer != "gsm8k" and not rs.reward_model_path:
        raise ConfigError(f"scorer: {rs.scorer} needs `reward_model_path` (a reward-model output dir).")
    if rs.scorer == "combined" and not rs.safety_reward_model_path:
        raise ConfigError("scorer: combined needs `safety_reward_model_path` as well as `reward_model_path`.")
    if training_args.eval_strategy != "no":
        raise ConfigError("Rounds are evaluated by the evaluation suite after each round: set `eval_strategy: no`.")
    check_backend(rs.generation_backend)


def main(argv: list[str] | None = None) -> dict:
    recipe_args, training_args, model_args, rs = parse_config(CONFIG_TYPES, argv)
    check_settings(rs, training_args)
    check_parent_runs(recipe_args.parent_run)
    state = PartialState()
    sft_policy = model_args.model_name_or_path

    # Prompts and scorer: checked before any model loads, so a missing answer or RM path fails in seconds.
    tokenizer = load_policy_tokenizer(model_args, require_chat_template=True)
    prompts = load_prompts(
        recipe_args, rs, recipe_args.dataset_train_split, recipe_args.max_train_samples, tokenizer, training_args.seed
    )
    heldout = []
    if rs.eval_reward_samples > 0 and recipe_args.dataset_test_split:
        heldout = load_prompts(
            recipe_args, rs, recipe_args.dataset_test_split, recipe_args.max_eval_samples, tokenizer, training_args.seed
        )
    scorer = build_scorer(rs)

    config = config_to_dict(recipe_args, training_args, model_args, rs)
    record = open_run_dir(training_args.output_dir, config, recipe_args.overwrite_output_dir, state)
    run = init_wandb(
        training_args.report_to,
        project=recipe_args.wandb_project,
        run_name=training_args.run_name or f"{rs.method}-{sft_policy.rstrip('/').split('/')[-1]}",
        stage="rejection_sampling",
        method=rs.method if rs.method == "iterative_dpo" else f"rejection_sampling-{rs.selection}",
        seed=training_args.seed,
        config=config,
        group=recipe_args.wandb_group,
        entity=recipe_args.wandb_entity,
        extra_tags=recipe_args.wandb_tags,
        run_id=record["wandb_id"],  # a relaunch continues the same W&B run
    )
    print(
        f"[rejection_sampling] process {state.process_index} of {state.num_processes}: {rs.method}, {rs.num_rounds} "
        f"rounds x {len(prompts)} prompts x N={rs.num_samples}, scorer {rs.scorer}, selection {rs.selection}, "
        f"output {training_args.output_dir}",
        flush=True,
    )

    # Round 0 is the starting policy, evaluated; round k samples from policy k-1, selects, trains policy k.
    cache = PolicyCache(model_args)
    try:
        results = [
            run_round(
                k,
                rs,
                recipe_args,
                training_args,
                model_args,
                tokenizer,
                prompts,
                heldout,
                scorer,
                record,
                state,
                run,
                cache,
            )
            for k in range(rs.num_rounds + 1)
        ]
    except BaseException:  # a failed round (bad scores, Ctrl-C) marks the W&B run failed; finished rounds stay
        if run is not None:
            run.finish(exit_code=1)
        raise

    summary = summary_table(results)
    if state.is_main_process:
        log_summary(run, results)
        final = {f"round_{r['round']}/{name}": value for r in results for name, value in r["metrics"].items()}
        final.update(results[-1]["metrics"])  # the final policy's figures under the names every recipe uses
        # The final policy also sits at output_dir itself, so the run loads like every other recipe's output.
        copy_policy_files(results[-1]["policy"], training_args.output_dir)
        mark_finished(
            training_args.output_dir,
            {"stage": "rejection_sampling", "metrics": final, "wandb": run_location(run), "start_model": sft_policy},
        )
        print(summary)
        print(f"[rejection_sampling] rounds in {training_args.output_dir}; W&B run: {run_location(run)}", flush=True)
    if run is not None:
        run.finish()
    return {"rounds": results, "summary": summary, "output_dir": training_args.output_dir}


if __name__ == "__main__":
    run_cli(main)  # a user error prints `error: <message>` and exits 2, without a traceback
