"""AI feedback (Constitutional AI's critique-and-revise, RLAIF's AI preference labels) from a policy and an AI judge.

    accelerate launch recipes/ai_feedback/train.py --config recipes/ai_feedback/config.yaml [--key value]
    accelerate launch recipes/ai_feedback/train.py --config recipes/ai_feedback/config.yaml --mode judge

`mode: critique_revise` (Bai et al. 2022): per prompt, the policy samples a response, critiques it against a principle
drawn from the constitution, and revises it; writes the (prompt, revision) conversations as TRL SFT data (`messages`),
with the first response, the principle and the critique kept for inspection.
`mode: judge` (Lee et al. 2023): per prompt, two responses (sampled from the policy, or a preference dataset's own
chosen/rejected with its labels hidden from the judge); an AI judge says which is better by the probabilities of the
option labels after a judge prompt, averaged over both orders (position bias cancels), and the confidence becomes one
of Llama 2's four ratings; writes TRL preference data (prompt/chosen/rejected, conversational) with `rating`.

Rows are appended to `rows.jsonl` as each batch finishes; a relaunch with the same settings skips the prompts done.
At the end: `<output_split>.jsonl` (what the SFT, reward and DPO recipes read as `dataset_name: <output_dir>`),
`ai_feedback.json` (counts, the judge's agreement with the dataset's labels) and `run_complete.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import PartialState

from eval.generation import generate
from eval.reward_model import RATINGS
from eval.suite import eval_mode
from recipes.ai_feedback import feedback
from recipes.common.config import ConfigError, QLoRAModelConfig, RecipeArguments, config_to_dict, parse_config
from recipes.common.data import DataError, load_split, take, validate_columns
from recipes.common.errors import run_cli
from recipes.common.files import write_json_atomic, write_jsonl_atomic
from recipes.common.modeling import check_model_path
from recipes.common.outputs import mark_finished, prepare_output_dir
from recipes.common.policy import adapter_base, load_policy_tokenizer
from recipes.common.tracking import check_parent_runs, init_wandb, run_location

ROWS_FILE = "rows.jsonl"  # every finished row, appended batch by batch (the resume point)
SETTINGS_FILE = "ai_feedback_settings.json"  # what the rows were made with; a relaunch must match
SUMMARY_FILE = "ai_feedback.json"


@dataclass
class AIFeedbackArguments:
    """What to generate and how to judge (the policy is QLoRAModelConfig's `model_name_or_path`)."""

    mode: Literal["critique_revise", "judge"] = field(
        default="critique_revise", metadata={"help": "critique_revise (SFT data) or judge (preference data)."}
    )
    constitution_path: str = field(
        default="recipes/ai_feedback/constitutions/default.yaml",
        metadata={"help": "YAML with `principles` (critique/revision requests) and an optional `judge_instruction`."},
    )
    responses: Literal["sample", "dataset"] = field(
        default="sample",
        metadata={"help": "judge: two responses sampled from the policy, or the dataset's chosen/rejected."},
    )
    prompt_tasks: list[str] = field(default_factory=list, metadata={"help": "Keep rows of these `task`s only."})
    judge_type: Literal["causal_lm", "reward_model"] = field(
        default="causal_lm",
        metadata={"help": "causal_lm (label log-probabilities, RLAIF) or reward_model (a trained RM as stand-in)."},
    )
    judge_model_path: str | None = field(
        default=None, metadata={"help": "The judge (a causal LM or LoRA adapter; an RM dir); default: the policy."}
    )
    judge_labels: list[str] = field(
        default_factory=lambda: [" A", " B"],
        metadata={"help": "Option labels, each one token for the judge; the text after the prompt's last colon."},
    )
    judge_chat_template: bool = field(
        default=False, metadata={"help": "Put the judge prompt in the judge's chat template (instruct judges)."}
    )
    rating_thresholds: list[float] = field(
        default_factory=lambda: [0.9, 0.75, 0.6],
        metadata={"help": "Confidence for significantly better / better / slightly better; below: negligibly."},
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Longest response, critique and revision."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0: greedy)."})
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts per batch (rows are saved per batch)."})
    judge_batch_size: int = field(default=16, metadata={"help": "Judge prompts per forward pass."})
    output_split: str = field(default="train", metadata={"help": "Name of the data file written: <split>.jsonl."})
    output_dir: str = field(default="outputs/demo/ai_feedback", metadata={"help": "Where the rows go."})
    seed: int = field(default=0, metadata={"help": "Seeds the subset, the sampling, principles and tie-breaks."})
    run_name: str | None = field(default=None, metadata={"help": "W&B run name."})
    report_to: list[str] = field(default_factory=lambda: ["none"], metadata={"help": "[wandb] or [none]."})
    log_table_rows: int = field(default=16, metadata={"help": "Rows shown in the W&B table."})


CONFIG_TYPES = (RecipeArguments, QLoRAModelConfig, AIFeedbackArguments)
# Settings that change where or how fast rows are made, never what they are.
NOT_FINGERPRINTED = {
    "output_dir", "run_name", "report_to", "log_table_rows", "generation_batch_size", "judge_batch_size",
    "overwrite_output_dir", "wandb_project", "wandb_entity", "wandb_group", "wandb_tags", "parent_run",
}  # fmt: skip


def check_settings(af: AIFeedbackArguments) -> None:
    """Every choice checked before anything loads."""
    for name in ("max_new_tokens", "generation_batch_size", "judge_batch_size"):
        if getattr(af, name) < 1:
            raise ConfigError(f"{name} must be >= 1 (got {getattr(af, name)}).")
    if af.temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0: greedy; got {af.temperature}).")
    if af.mode == "judge" and af.responses == "sample" and af.temperature == 0:
        raise ConfigError("judge with responses: sample needs two different responses: set temperature > 0.")
    if af.mode == "judge" and af.judge_type == "reward_model" and not af.judge_model_path:
        raise ConfigError("judge_type: reward_model needs `judge_model_path` (a reward-model output dir).")
    feedback.check_thresholds(af.rating_thresholds)


def load_rows(recipe_args: RecipeArguments, af: AIFeedbackArguments) -> list[dict[str, Any]]:
    """The input rows {key, prompt (messages), task, and with responses: dataset a, b, reference_rating}, checked and
    cut to a seeded subset of `max_train_samples`."""
    name, split = recipe_args.dataset_name, recipe_args.dataset_train_split
    if not name:
        raise DataError("No prompts: set `dataset_name` (e.g. outputs/demo/data/prompts, rows with a `prompt`).")
    dataset = load_split(name, split, recipe_args.dataset_config)
    where = f"Dataset {name!r} (split {split!r})"
    from_pairs = af.mode == "judge" and af.responses == "dataset"
    validate_columns(dataset, [["prompt", "chosen", "rejected"]] if from_pairs else [["prompt"]], where, "ai_feedback")
    if af.prompt_tasks:
        if "task" not in dataset.column_names:
            raise DataError(f"{where} has no `task` column, so `prompt_tasks: {af.prompt_tasks}` cannot filter it.")
        dataset = dataset.filter(lambda row: row["task"] in af.prompt_tasks)
    dataset = take(dataset, recipe_args.max_train_samples, af.seed)
    if len(dataset) == 0:
        raise DataError(f"{where} holds no rows{f' of tasks {af.prompt_tasks}' if af.prompt_tasks else ''}.")
    rows = []
    for index, record in enumerate(dataset):
        prompt = record["prompt"]
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        row = {"prompt": messages, "task": record.get("task")}
        if from_pairs:
            row.update(a=response_text(record["chosen"]), b=response_text(record["rejected"]))
            row["reference_rating"] = record.get("rating")
        digest = hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:10]
        rows.append({"key": f"{index}-{digest}", **row})
    return rows


def response_text(response: Any) -> str:
    """A response as text: a string, or the last message of a conversational response."""
    if isinstance(response, str):
        return response
    if isinstance(response, dict):
        return str(response.get("content", ""))
    return str(response[-1]["content"]) if response else ""


def open_output_dir(out: Path, settings: dict[str, Any], overwrite: bool) -> list[dict[str, Any]]:
    """The rows an earlier launch finished (resume), after checking they were made with these settings."""
    prepare_output_dir(str(out), overwrite, None)  # a finished run is refused unless overwrite_output_dir
    settings_file = out / SETTINGS_FILE
    if overwrite and (out / ROWS_FILE).is_file():
        backup = out / f"rows.previous-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        (out / ROWS_FILE).rename(backup)  # nothing deleted: the old rows stay beside the new
        print(f"[ai_feedback] overwrite_output_dir: earlier rows moved to {backup}", flush=True)
    elif settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        old = json.loads(settings_file.read_text())
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise ConfigError(
            f"{out} holds rows made with other settings ({', '.join(changed[:6])} differ). Relaunch with the same "
            "settings to continue, choose another `--output_dir`, or pass `--overwrite_output_dir true`."
        )
    write_json_atomic(settings_file, settings)
    done = feedback.read_done_rows(out / ROWS_FILE)
    if done:
        print(f"[ai_feedback] resuming: {len(done)} rows already in {out / ROWS_FILE}", flush=True)
    return done


def sample(model: Any, tokenizer: Any, conversations: list[list[dict]], n: int, af: AIFeedbackArguments, seed: int):
    """`n` responses per conversation from the policy (chat template, generation prompt), batched; [[text, ...]]."""
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    with eval_mode(model), torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        groups = generate(
            model, tokenizer, texts, max_new_tokens=af.max_new_tokens, batch_size=af.generation_batch_size,
            do_sample=af.temperature > 0, temperature=af.temperature or 1.0, num_return_sequences=n, seed=seed,
            progress=False,
        )  # fmt: skip
    return [[c.text.strip() for c in group] for group in groups]


def critique_revise(chunk, policy, tokenizer, principles, af: AIFeedbackArguments) -> list[dict[str, Any]]:
    """Constitutional AI's supervised stage for a batch: response, critique against a principle, revision."""
    seed = feedback.stable_int(chunk[0]["key"], af.seed, "sample")
    prompts = [row["prompt"] for row in chunk]
    responses = [group[0] for group in sample(policy, tokenizer, prompts, 1, af, seed)]
    chosen = [feedback.pick_principle(principles, row["key"], af.seed) for row in chunk]
    critique_turns = [feedback.critique_messages(p, r, c) for p, r, c in zip(prompts, responses, chosen)]
    critiques = [group[0] for group in sample(policy, tokenizer, critique_turns, 1, af, seed + 1)]
    revision_turns = [
        feedback.revision_messages(p, r, k, c) for p, r, k, c in zip(prompts, responses, critiques, chosen)
    ]
    revisions = [group[0] for group in sample(policy, tokenizer, revision_turns, 1, af, seed + 2)]
    rows = []
    for row, response, principle, critique, revision in zip(chunk, responses, chosen, critiques, revisions):
        out = {"key": row["key"], "task": row["task"]}
        if not revision:
            out["skipped"] = "empty revision"  # kept in rows.jsonl (so a resume does not redo it), not in the data
        out.update(
            messages=[*row["prompt"], {"role": "assistant", "content": revision}],
            initial_response=response, principle=principle["name"], critique=critique,
        )  # fmt: skip
        rows.append(out)
    return rows


def judge(chunk, policy, tokenizer, judge_fn, af: AIFeedbackArguments, instruction: str) -> list[dict[str, Any]]:
    """RLAIF for a batch: two responses per prompt (sampled, or the dataset's), the judge's order-averaged
    preference, the preference row with its rating."""
    if af.responses == "sample":
        seed = feedback.stable_int(chunk[0]["key"], af.seed, "sample")
        pairs = sample(policy, tokenizer, [row["prompt"] for row in chunk], 2, af, seed)
    else:
        pairs = [(row["a"], row["b"]) for row in chunk]
    rows, to_judge = [], []
    for row, (a, b) in zip(chunk, pairs):
        if a.strip() == b.strip() or not a.strip() or not b.strip():
            rows.append({"key": row["key"], "skipped": "identical or empty responses", "a": a, "b": b})
        else:
            to_judge.append((row, a, b))
    if to_judge:
        judged = judge_fn([r["prompt"] for r, _, _ in to_judge], [a for _, a, _ in to_judge], [b for *_, b in to_judge])
        for (row, a, b), verdict in zip(to_judge, judged, strict=True):
            out = feedback.preference_row(row["key"], row["prompt"], a, b, verdict, af.rating_thresholds, af.seed)
            out["task"] = row["task"]
            if af.responses == "dataset":  # a is the dataset's chosen: the judge agrees when it picks a
                out.update(reference_rating=row["reference_rating"], agrees_with_reference=out["chosen_is_a"])
            rows.append(out)
    return rows


def load_judge(af: AIFeedbackArguments, model_args: QLoRAModelConfig, policy: Any, policy_tokenizer: Any):
    """The judge as `judge_fn(prompts, responses_a, responses_b) -> [{p_a, ...}]`, loaded like the policy (a causal LM
    or LoRA adapter, 4-bit as configured), or a reward model; the policy itself when no judge is named."""
    from recipes.common.reward import load_reward_model
    from recipes.rejection_sampling.sampling import load_generation_model

    if af.judge_type == "reward_model":
        rm, rm_tokenizer = load_reward_model(af.judge_model_path)
        return lambda p, a, b: feedback.reward_model_preferences(rm, rm_tokenizer, p, a, b, af.judge_batch_size)
    path = af.judge_model_path or model_args.model_name_or_path
    if policy is not None and path == model_args.model_name_or_path:
        model, tokenizer = policy, policy_tokenizer
    else:
        judge_args = dataclasses.replace(model_args, model_name_or_path=path)
        model, tokenizer = load_generation_model(judge_args, path), judge_tokenizer(af, model_args)
    label_ids = feedback.label_token_ids(tokenizer, af.judge_labels, path)
    label_logprobs = feedback.causal_lm_judge(model, tokenizer, label_ids, af.judge_chat_template, af.judge_batch_size)
    constitution = feedback.load_constitution(af.constitution_path, need_principles=False)
    return lambda p, a, b: feedback.judge_pairs(
        label_logprobs, p, a, b, constitution["judge_instruction"], af.judge_labels
    )


def judge_tokenizer(af: AIFeedbackArguments, model_args: QLoRAModelConfig) -> Any:
    path = af.judge_model_path or model_args.model_name_or_path
    args = dataclasses.replace(model_args, model_name_or_path=path)
    return load_policy_tokenizer(args, require_chat_template=af.judge_chat_template)


def summarize(rows: list[dict[str, Any]], skipped: list[dict[str, Any]], af: AIFeedbackArguments) -> dict[str, Any]:
    """Counts, and for judged pairs the rating mix, position consistency and agreement with the dataset's labels."""
    summary: dict[str, Any] = {"mode": af.mode, "rows": len(rows), "skipped": len(skipped)}
    if af.mode == "critique_revise":
        summary["principles"] = dict(Counter(r["principle"] for r in rows))
        summary["revision_changed"] = sum(r["messages"][-1]["content"] != r["initial_response"] for r in rows)
        return summary
    if not rows:
        return summary
    summary["ratings"] = {rating: sum(r["rating"] == rating for r in rows) for rating in RATINGS}
    summary["ties"] = sum(r["tie"] for r in rows)
    summary["mean_confidence"] = sum(r["p_chosen"] for r in rows) / len(rows)
    # The two orders pick the same response: a judge ruled by position fails this on every pair.
    summary["order_consistent"] = sum(
        (r["p_a_shown_first"] > 0.5) == (r["p_a_shown_second"] > 0.5) for r in rows
    ) / len(rows)
    summary["first_position_rate"] = sum((r["p_a_shown_first"] > 0.5) + (r["p_a_shown_second"] < 0.5) for r in rows) / (
        2 * len(rows)
    )  # how often the response shown first wins, over both orders (0.5: no position bias)
    if af.responses == "dataset":
        summary["agreement"] = sum(r["agrees_with_reference"] for r in rows) / len(rows)
        by_rating = {}
        for rating in RATINGS:
            bucket = [r for r in rows if r.get("reference_rating") == rating]
            if bucket:
                by_rating[rating] = {
                    "n": len(bucket),
                    "agreement": sum(r["agrees_with_reference"] for r in bucket) / len(bucket),
                }
        summary["agreement_by_reference_rating"] = by_rating
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    recipe_args, model_args, af = parse_config(CONFIG_TYPES, argv)
    check_settings(af)
    if PartialState().num_processes > 1:
        raise ConfigError("The AI-feedback recipe runs in one process (generation is batched): launch it without "
                          "--num_processes, or with --num_processes 1.")  # fmt: skip
    started = time.perf_counter()

    # Everything that can be wrong is checked before a model loads: constitution, tokenizers and labels, data.
    constitution = feedback.load_constitution(af.constitution_path, need_principles=af.mode == "critique_revise")
    check_parent_runs(recipe_args.parent_run or None)  # "" (on the command line): unset
    needs_policy = af.mode == "critique_revise" or af.responses == "sample"
    tokenizer = load_policy_tokenizer(model_args, require_chat_template=True) if needs_policy else None
    if af.mode == "judge" and af.judge_type == "causal_lm":
        feedback.label_token_ids(judge_tokenizer(af, model_args), af.judge_labels, af.judge_model_path or "the policy")
    elif af.mode == "judge":
        check_model_path(adapter_base(af.judge_model_path) or af.judge_model_path)
    rows = load_rows(recipe_args, af)
    config = config_to_dict(recipe_args, model_args, af)
    settings = {
        f"{section}.{key}": value for section, values in config.items() for key, value in values.items()
        if key not in NOT_FINGERPRINTED
    }  # fmt: skip
    out = Path(af.output_dir)
    done = open_output_dir(out, settings, recipe_args.overwrite_output_dir)
    done_keys = {row["key"] for row in done}
    todo = [row for row in rows if row["key"] not in done_keys]
    run = init_wandb(
        af.report_to, project=recipe_args.wandb_project,
        run_name=af.run_name or f"ai_feedback-{af.mode}", stage="ai_feedback", method=f"ai_feedback-{af.mode}",
        seed=af.seed, config=config, group=recipe_args.wandb_group, entity=recipe_args.wandb_entity,
        extra_tags=recipe_args.wandb_tags,
    )  # fmt: skip
    print(
        f"[ai_feedback] {af.mode}: {len(rows)} prompts ({len(todo)} to do), policy {model_args.model_name_or_path}"
        + (f", judge {af.judge_type} {af.judge_model_path or 'the policy'}" if af.mode == "judge" else "")
        + f", output {out}",
        flush=True,
    )

    # Models: the policy loaded for sampling as rejection sampling loads it (4-bit base + the SFT adapter), the judge.
    try:
        if todo:
            from recipes.rejection_sampling.sampling import load_generation_model

            policy = load_generation_model(model_args, model_args.model_name_or_path) if needs_policy else None
            judge_fn = load_judge(af, model_args, policy, tokenizer) if af.mode == "judge" else None
        for start in range(0, len(todo), af.generation_batch_size):
            chunk = todo[start : start + af.generation_batch_size]
            if af.mode == "critique_revise":
                new = critique_revise(chunk, policy, tokenizer, constitution["principles"], af)
            else:
                new = judge(chunk, policy, tokenizer, judge_fn, af, constitution["judge_instruction"])
            feedback.append_rows(out / ROWS_FILE, new)  # saved before the next batch starts
            done.extend(new)
            print(f"[ai_feedback] {len(done)} of {len(rows)} rows", flush=True)
    except BaseException:  # a crash (or Ctrl-C) marks the W&B run failed; the rows written so far stay
        if run is not None:
            run.finish(exit_code=1)
        raise

    # The data file, in the input's order, without skipped rows; then the summary and the finished marker.
    by_key = {row["key"]: row for row in done}
    finished = [by_key[row["key"]] for row in rows]
    kept, skipped = [r for r in finished if "skipped" not in r], [r for r in finished if "skipped" in r]
    data_file = out / f"{af.output_split}.jsonl"
    write_jsonl_atomic(data_file, kept)
    summary = summarize(kept, skipped, af)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomic(out / SUMMARY_FILE, summary)
    metrics = {f"ai_feedback/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
    if run is not None:
        import wandb

        run.summary.update(metrics)
        columns = (
            ["key", "prompt", "chosen", "rejected", "rating"]
            if af.mode == "judge"
            else ["key", "principle", "initial_response", "critique", "messages"]
        )
        table = wandb.Table(
            columns=columns,
            data=[[json.dumps(r.get(c), ensure_ascii=False) for c in columns] for r in kept[: af.log_table_rows]],
        )
        run.log({"ai_feedback/rows": table})
        run.finish()
    mark_finished(
        str(out), {"stage": "ai_feedback", "mode": af.mode, "metrics": metrics, "data": str(data_file),
                   "wandb": run_location(run), "start_model": model_args.model_name_or_path},
    )  # fmt: skip
    print(f"[ai_feedback] {len(kept)} rows ({len(skipped)} skipped) -> {data_file}; summary {out / SUMMARY_FILE}")
    print(json.dumps(summary, indent=2))
    return {"summary": summary, "data_file": str(data_file), "output_dir": str(out)}


if __name__ == "__main__":
    run_cli(main)  # a user error prints `error: <message>` and exits 2, without a traceback
