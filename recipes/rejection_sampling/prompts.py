"""The prompts of a run (chat template applied, filtered, subset) and the scorer of their completions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Scorer = Callable[[Sequence[dict[str, Any]], Sequence[str]], list[float]]


def load_prompts(recipe_args: Any, rs: Any, split: str, limit: int | None, tokenizer: Any, seed: int) -> list[dict]:
    """The prompts of one split as rows {prompt_id, messages, user, text (chat template applied), num_tokens, answer,
    task}, filtered to `prompt_tasks` and cut to a seeded subset of `limit`. A `prompt` column holds chat messages
    (or a string); without one, a GSM8K-style `question` column is the user turn."""
    from eval.generation import encode
    from recipes.common.data import DataError, load_split, take, validate_columns

    name = recipe_args.dataset_name
    if not name:
        raise DataError("No prompts: set `dataset_name` (e.g. outputs/demo/data/prompts, rows with a `prompt`).")
    dataset = load_split(name, split, recipe_args.dataset_config)
    where = f"Dataset {name!r} (split {split!r})"
    column = validate_columns(dataset, [["prompt"], ["question"]], where, "rejection sampling")[0]
    if rs.prompt_tasks:
        if "task" not in dataset.column_names:
            raise DataError(f"{where} has no `task` column, so `prompt_tasks: {rs.prompt_tasks}` cannot filter it.")
        dataset = dataset.filter(lambda row: row["task"] in rs.prompt_tasks)
    dataset = take(dataset, limit, seed)
    if len(dataset) == 0:
        tasks = f" of tasks {rs.prompt_tasks}" if rs.prompt_tasks else ""
        raise DataError(f"{where} holds no prompts{tasks}: nothing to sample from. Check the path, split and filter.")
    rows = []
    for index, record in enumerate(dataset):
        prompt = record[column]  # a list of messages, or a plain question (GSM8K's layout) as one user turn
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), messages[-1]["content"])
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        rows.append(
            {
                "prompt_id": index, "messages": messages, "user": user, "text": text,
                "num_tokens": len(encode(tokenizer, text)), "answer": record.get("answer"), "task": record.get("task"),
            }
        )  # fmt: skip
    if rs.scorer == "gsm8k":
        unanswered = [r["prompt_id"] for r in rows if not r["answer"]]
        if unanswered:
            raise DataError(
                f"{where}: {len(unanswered)} of {len(rows)} prompts have no reference `answer` (first: row "
                f"{unanswered[0]}), and the gsm8k scorer grades against it. Keep math prompts only (`prompt_tasks: "
                "[math]`) or use a reward-model scorer (`scorer: reward_model` or `combined`)."
            )
    return rows


def build_scorer(rs: Any) -> Scorer:
    """`scorer(prompt_rows, completions) -> one float per completion`: the evaluation suite's GSM8K grader (1 correct,
    0 wrong; the very function behind `eval/gsm8k/accuracy`), one reward model, or Llama 2's combined helpfulness +
    safety reward (`recipes.common.reward.CombinedReward`; a prompt's `task` "unsafe" selects the safety score)."""
    if rs.scorer == "gsm8k":
        from eval.gsm8k import grade

        def grade_rows(rows: Sequence[dict[str, Any]], completions: Sequence[str]) -> list[float]:
            return [float(grade(c, r["answer"], rs.grader_mode)) for r, c in zip(rows, completions, strict=True)]

        return grade_rows
    from recipes.common.reward import CombinedReward, RewardCombination

    # Raw scores, not whitened per call: samples of one prompt may be scored in different calls, and selection
    # compares them (any fixed affine whitening would select the same samples).
    safety = rs.safety_reward_model_path if rs.scorer == "combined" else None
    reward = CombinedReward(rs.reward_model_path, safety, RewardCombination(whitening="none"), name=rs.scorer)

    def score_rows(rows: Sequence[dict[str, Any]], completions: Sequence[str]) -> list[float]:
        return reward([r["messages"] for r in rows], list(completions), task=[r["task"] or "" for r in rows])

    return score_rows
