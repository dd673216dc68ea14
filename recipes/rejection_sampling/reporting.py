"""Evaluating a round's policy, logging rounds and the run summary to W&B, and copying the final policy out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from recipes.common.outputs import FINISHED_MARKER
from recipes.rejection_sampling.prompts import Scorer
from recipes.rejection_sampling.rundir import read_records
from recipes.rejection_sampling.sampling import hf_sampler
from recipes.rejection_sampling.selection import check_scores, kl_best_of_n, summarize

HEADLINE = ("eval/gsm8k/accuracy", "eval/policy_reward/mean", "rs/samples/reward_mean", "rs/selected/acceptance_rate")


def headline(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{name} {metrics[name]:.3f}" for name in HEADLINE if name in metrics)


def flat_stats(stats: dict[str, Any]) -> dict[str, float]:
    flat = {}
    for group, values in stats.items():
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"rs/{group}/{'n_' + name if group == 'best_of_n' else name}"] = value
    return flat


def evaluate_policy(
    model: Any,
    tokenizer: Any,
    recipe_args: Any,
    rs: Any,
    heldout: list[dict],
    scorer: Scorer,
    seed: int,
    batch_size: int = 16,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The evaluation suite (`eval_tasks`: GSM8K, MMLU, length, diversity) and the mean score of the policy's samples
    on held-out prompts (`eval/policy_reward/*`: the reward the rounds optimise, measured where they do not train)."""
    from eval import evaluate_model
    from eval.callback import eval_settings

    metrics: dict[str, float] = {}
    settings = eval_settings(recipe_args, seed)
    if settings["tasks"]:
        # batch_size: sequences per generate call (`per_device_eval_batch_size`); the suite splits it by samples.
        metrics.update(evaluate_model(model, tokenizer, **{**settings, "batch_size": batch_size}))
    table: list[dict[str, Any]] = []
    if heldout:
        sampler = hf_sampler(model, tokenizer, rs.max_new_tokens, rs.generation_batch_size, rs.top_p)
        groups = sampler([p["text"] for p in heldout], rs.eval_reward_samples, rs.eval_temperature, seed)
        flat = [(p, s) for p, group in zip(heldout, groups) for s in group]
        raw = scorer([p for p, _ in flat], [s["completion"] for _, s in flat])
        scores = check_scores(raw, len(flat), "held-out prompts", rs.scorer)
        for name, value in summarize(scores).items():
            metrics[f"eval/policy_reward/{name}"] = value
        metrics["eval/policy_reward/mean_tokens"] = sum(s["num_tokens"] for _, s in flat) / len(flat)
        table = [{"prompt": p["user"], "completion": s["completion"], "reward": r} for (p, s), r in zip(flat, scores)]
    return metrics, table[: 4 * rs.log_table_prompts]


def log_round(run: Any, k: int, path: Path, metrics: dict[str, float], heldout: list[dict], rs: Any) -> None:
    """One W&B step per round (x axis `round`): eval metrics, reward distributions of all and of the kept samples
    (max / median per prompt: Llama 2 Figure 7), the best-of-N curve, acceptance, length and diversity of the kept
    set, and sample tables."""
    if run is None:
        return
    import wandb

    run.define_metric("round")
    for prefix in ("rs/*", "eval/*"):
        run.define_metric(prefix, step_metric="round")
    log: dict[str, Any] = {"round": k, **metrics}
    if heldout:
        log["eval/policy_reward/samples"] = wandb.Table(
            columns=["round", "prompt", "completion", "reward"],
            data=[[k, r["prompt"], r["completion"], r["reward"]] for r in heldout],
        )
    if k > 0:
        stats = json.loads((path / "selection.json").read_text())
        log.update(flat_stats(stats))
        samples = read_records(path / "samples.jsonl")
        selected = read_records(path / "selected.jsonl")
        kept = [s["chosen"] if "chosen" in s else s for s in selected]
        log["rs/samples/reward_hist"] = wandb.Histogram([s["reward"] for s in samples])
        log["rs/selected/reward_hist"] = wandb.Histogram([s["reward"] for s in kept])
        curve = wandb.Table(
            columns=["n", "expected_max_reward", "kl_bon"],
            data=[[int(n), v, kl_best_of_n(int(n))] for n, v in stats["best_of_n"].items()],
        )
        log["rs/best_of_n_curve"] = wandb.plot.line(curve, "n", "expected_max_reward", title=f"Best-of-N, round {k}")
        kept_ids = {(s["round"], s["prompt_id"], s["sample_id"]) for s in kept}
        shown = sorted({s["prompt_id"] for s in samples})[: rs.log_table_prompts]
        log["rs/samples_table"] = wandb.Table(
            columns=["round", "prompt_id", "prompt", "completion", "reward", "selected"],
            data=[
                [
                    k,
                    s["prompt_id"],
                    s["prompt"],
                    s["completion"],
                    s["reward"],
                    (k, s["prompt_id"], s["sample_id"]) in kept_ids,
                ]
                for s in samples
                if s["prompt_id"] in shown
            ],
        )
    run.log(log)


def summary_table(results: list[dict[str, Any]]) -> str:
    columns = [name for name in HEADLINE if any(name in r["metrics"] for r in results)]
    lines = ["| round | policy | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for r in results:
        values = [f"{r['metrics'][c]:.4f}" if c in r["metrics"] else "" for c in columns]
        lines.append(f"| {r['round']} | {r['policy']} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def log_summary(run: Any, results: list[dict[str, Any]]) -> None:
    """The per-round headline metrics as one table (and a line per metric over rounds) and in the run summary."""
    if run is None:
        return
    import wandb

    columns = ["round", *[name for name in HEADLINE if all(name in r["metrics"] for r in results)]]
    table = wandb.Table(columns=columns, data=[[r["round"], *[r["metrics"][c] for c in columns[1:]]] for r in results])
    log: dict[str, Any] = {"rs/rounds": table}
    for name in columns[1:]:
        log[f"rs/rounds_plot/{name}"] = wandb.plot.line(table, "round", name, title=f"{name} by round")
    run.log(log)
    run.summary.update({f"round_{r['round']}/{n}": v for r in results for n, v in r["metrics"].items()})


def copy_policy_files(policy_dir: str, output_dir: str) -> None:
    """Copy a round's adapter (or full model) and tokenizer files into `output_dir` (not its checkpoints)."""
    for item in Path(policy_dir).iterdir():
        if item.is_file() and item.name not in (FINISHED_MARKER, "training_args.bin"):
            shutil.copy2(item, Path(output_dir) / item.name)
