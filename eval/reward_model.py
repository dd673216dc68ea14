"""Reward-model evaluation on held-out preference pairs: accuracy overall and per rating bucket (the layout of
Llama 2's Table 28), mean reward gap, calibration of sigmoid(gap), and, on safety data, the 0.15 threshold's
precision and recall on unsafe responses.

    result = evaluate_reward_model(model, tokenizer, test_pairs)        # nested dict, JSON-ready
    flat = flatten_rm_metrics(result)                                   # {"eval/rm/accuracy": ..., ...}
    print(format_table({"no margin": result, "small margin": other}))   # Table 28 layout

`RewardModelEvalCallback` runs the same evaluation inside a trainer after each of its evaluations and logs the flat
metrics to W&B (`eval/rm/...`, against `train/global_step`) and to `state.log_history`.

Calibration: the RM's probability that the chosen response is preferred is sigmoid(r_chosen - r_rejected) (Bradley-
Terry). Looking at each pair from the side the RM prefers, its confidence is sigmoid(|gap|) in [0.5, 1] and it is
right when gap > 0; the expected calibration error (ECE) bins confidence and averages |accuracy - confidence|
weighted by bin size. A margin in the loss pushes gaps up by about the margin, which shows up here as
over-confidence on nearly-tied pairs.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    EvalPrediction,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from recipes.common.reward import RATINGS, normalize_rating, score

# Table 28's column labels, for `RATINGS` (the scale itself is the reward code's: recipes.common.reward).
RATING_LABELS = {
    "significantly_better": "Significantly Better",
    "better": "Better",
    "slightly_better": "Slightly Better",
    "negligibly_better": "Negligibly Better / Unsure",
}
PREFIX = "eval/rm"


def pairwise_metrics(
    chosen: torch.Tensor | Sequence[float],
    rejected: torch.Tensor | Sequence[float],
    ratings: Sequence[Any] | None = None,
    bins: int = 10,
) -> dict[str, Any]:
    """Accuracy, reward gap and calibration of raw RM scores on pairs; per rating bucket when `ratings` are given
    (None for an unrated pair, which then counts overall only)."""
    chosen = torch.as_tensor(chosen, dtype=torch.float64)
    rejected = torch.as_tensor(rejected, dtype=torch.float64)
    if chosen.shape != rejected.shape or chosen.numel() == 0:
        raise ValueError(f"need as many chosen as rejected scores, at least one ({chosen.numel()}, {rejected.numel()})")
    gap = chosen - rejected
    result: dict[str, Any] = {
        "n": int(gap.numel()),
        "accuracy": float((gap > 0).double().mean()),
        "mean_gap": float(gap.mean()),
        "median_gap": float(gap.median()),
        "mean_chosen": float(chosen.mean()),
        "mean_rejected": float(rejected.mean()),
        # Statistics of every scored response: natural fixed whitening statistics for the combined reward.
        "score_mean": float(torch.cat([chosen, rejected]).mean()),
        "score_std": float(torch.cat([chosen, rejected]).std()),
        "calibration": calibration(gap, bins),
    }
    if ratings is not None:
        if len(ratings) != gap.numel():
            raise ValueError(f"{len(ratings)} ratings for {gap.numel()} pairs")
        normalized = [None if r is None else normalize_rating(r) for r in ratings]  # unrated pairs: no bucket
        buckets = {}
        for rating in RATINGS:
            index = torch.tensor([i for i, r in enumerate(normalized) if r == rating], dtype=torch.long)
            if index.numel() == 0:
                continue
            bucket_gap = gap[index]
            buckets[rating] = {
                "n": int(index.numel()),
                "accuracy": float((bucket_gap > 0).double().mean()),
                "mean_gap": float(bucket_gap.mean()),
            }
        result["buckets"] = buckets
    return result


def calibration(gap: torch.Tensor, bins: int = 10) -> dict[str, Any]:
    """ECE, Brier score and log loss of sigmoid(gap) as P(chosen preferred), with the reliability bins."""
    gap = torch.as_tensor(gap, dtype=torch.float64)
    probability = torch.sigmoid(gap)
    confidence = torch.sigmoid(gap.abs())
    correct = (gap > 0).double()
    edges = torch.linspace(0.5, 1.0, bins + 1, dtype=torch.float64)
    table, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence >= lo) & ((confidence < hi) if hi < 1.0 else (confidence <= hi))
        n = int(inside.sum())
        if n == 0:
            continue
        conf, acc = float(confidence[inside].mean()), float(correct[inside].mean())
        ece += n / gap.numel() * abs(acc - conf)
        table.append({"lo": float(lo), "hi": float(hi), "n": n, "confidence": conf, "accuracy": acc})
    return {
        "ece": ece,
        "brier": float(((1.0 - probability) ** 2).mean()),
        "log_loss": float(-torch.nn.functional.logsigmoid(gap).mean()),
        "mean_confidence": float(confidence.mean()),
        "bins": table,
    }


def safety_threshold_metrics(
    scores: torch.Tensor | Sequence[float], is_safe: Sequence[bool], threshold: float = 0.15
) -> dict[str, float]:
    """How well sigmoid(score) < threshold flags unsafe responses (Llama 2: precision 0.89, recall 0.55 at 0.15)."""
    probability = torch.sigmoid(torch.as_tensor(scores, dtype=torch.float64))
    flagged = probability < threshold
    unsafe = ~torch.as_tensor(list(is_safe), dtype=torch.bool)
    true_positive = int((flagged & unsafe).sum())
    return {
        "threshold": threshold,
        "n_responses": int(unsafe.numel()),
        "n_unsafe": int(unsafe.sum()),
        "n_flagged": int(flagged.sum()),
        "precision": true_positive / int(flagged.sum()) if int(flagged.sum()) else float("nan"),
        "recall": true_positive / int(unsafe.sum()) if int(unsafe.sum()) else float("nan"),
    }


def evaluate_reward_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Any,
    rating_column: str | None = "rating",
    batch_size: int = 32,
    bins: int = 10,
    safety_threshold: float = 0.15,
) -> dict[str, Any]:
    """Score every pair of `dataset` (columns chosen/rejected, optional prompt, rating, chosen_safe/rejected_safe)
    with the RM and return `pairwise_metrics` (+ `safety_threshold` when the dataset marks safe responses)."""
    start = time.perf_counter()  # `score` is the one scoring path: the same tokenization as training
    columns = set(dataset.column_names)
    prompts = list(dataset["prompt"]) if "prompt" in columns else [None] * len(dataset)
    chosen_scores = score(model, tokenizer, prompts, list(dataset["chosen"]), batch_size=batch_size)
    rejected_scores = score(model, tokenizer, prompts, list(dataset["rejected"]), batch_size=batch_size)
    result = reward_model_metrics(chosen_scores, rejected_scores, dataset, rating_column, bins, safety_threshold)
    result["runtime_s"] = time.perf_counter() - start
    return result


def reward_model_metrics(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    dataset: Any,
    rating_column: str | None = "rating",
    bins: int = 10,
    safety_threshold: float = 0.15,
) -> dict[str, Any]:
    """`evaluate_reward_model`'s metrics from scores already computed, one chosen and one rejected score per row of
    `dataset` (whose rating, chosen_safe/rejected_safe and task columns are read when present)."""
    columns = set(dataset.column_names)
    ratings = list(dataset[rating_column]) if rating_column and rating_column in columns else None
    result = pairwise_metrics(chosen_scores, rejected_scores, ratings, bins)
    if {"chosen_safe", "rejected_safe"} <= columns:
        scores = torch.cat([chosen_scores, rejected_scores])
        flags = list(dataset["chosen_safe"]) + list(dataset["rejected_safe"])
        result["safety_threshold"] = safety_threshold_metrics(scores, flags, safety_threshold)
    if "task" in columns:
        tasks, correct = list(dataset["task"]), (chosen_scores > rejected_scores).tolist()
        result["tasks"] = {
            task: sum(c for c, t in zip(correct, tasks) if t == task) / tasks.count(task) for task in sorted(set(tasks))
        }
    return result


def flatten_rm_metrics(result: Mapping[str, Any], prefix: str = PREFIX) -> dict[str, float]:
    """`eval/rm/<metric>` scalars of an `evaluate_reward_model` result (bins and nested tables left out)."""
    flat = {f"{prefix}/{k}": v for k, v in result.items() if isinstance(v, (int, float))}
    for key in ("ece", "brier", "log_loss", "mean_confidence"):
        flat[f"{prefix}/{key}"] = result["calibration"][key]
    for rating, bucket in result.get("buckets", {}).items():
        flat[f"{prefix}/accuracy_{rating}"] = bucket["accuracy"]
        flat[f"{prefix}/mean_gap_{rating}"] = bucket["mean_gap"]
    for key, value in result.get("safety_threshold", {}).items():
        flat[f"{prefix}/unsafe_{key}"] = value
    for task, accuracy in result.get("tasks", {}).items():
        flat[f"{prefix}/accuracy_task_{task}"] = accuracy
    return flat


def format_table(results: Mapping[str, Mapping[str, Any]], digits: int = 1) -> str:
    """A markdown table in the layout of Llama 2's Table 28: one row per RM, accuracy (%) per rating bucket, Avg."""
    header = "| | " + " | ".join(RATING_LABELS[r] for r in RATINGS) + " | Avg | n |"
    lines = [header, "|" + "---|" * (len(RATINGS) + 3)]
    for name, result in results.items():
        buckets = result.get("buckets", {})
        cells = [f"{100 * buckets[r]['accuracy']:.{digits}f}" if r in buckets else "-" for r in RATINGS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * result['accuracy']:.{digits}f} | {result['n']} |")
    return "\n".join(lines)


def save_json(payload: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)


class RewardModelEvalCallback(TrainerCallback):
    """`evaluate_reward_model` after each of the trainer's evaluations, logged as `eval/rm/...` (main process).

    One forward pass per evaluation: give the trainer this callback's `compute_metrics` and
    `preprocess_logits_for_metrics`, and the metrics come from the scores of the trainer's own evaluation loop (TRL's
    RewardTrainer puts each batch's chosen rows first, then its rejected rows). `dataset` must then hold the trainer's
    eval pairs in its order, with their rating / safety / task columns. Without them wired (or with
    `prediction_loss_only`) the callback scores the pairs itself, with `evaluate_reward_model`, on the main process;
    under DDP the other ranks go on to their next collective and wait there (the unwrapped model's forward starts no
    collective). Runs under the same autocast as training (a bf16-trained 4-bit model expects it).
    """

    def __init__(
        self,
        dataset: Any,
        tokenizer: PreTrainedTokenizerBase,
        rating_column: str | None = "rating",
        batch_size: int = 32,
        bins: int = 10,
        safety_threshold: float = 0.15,
    ) -> None:
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.kwargs = {"rating_column": rating_column, "batch_size": batch_size, "bins": bins}
        self.kwargs["safety_threshold"] = safety_threshold
        self.history: list[dict[str, Any]] = []
        self.last: tuple[int, dict[str, Any]] | None = None  # (step, full result) of the latest evaluation
        self._from_trainer: dict[str, Any] | None = None  # metrics of the trainer's evaluation now in progress

    @staticmethod
    def preprocess_logits_for_metrics(logits: torch.Tensor, labels: Any) -> torch.Tensor:
        """A batch's (2B, 1) scores, chosen rows then rejected rows, as (B, 2) [chosen, rejected] rows, so that the
        trainer's concatenation over batches (and gathering over ranks) keeps one row per pair in dataset order."""
        chosen, rejected = logits.detach().float().reshape(-1).chunk(2)
        return torch.stack([chosen, rejected], dim=1)

    def compute_metrics(self, prediction: EvalPrediction, compute_result: bool | None = None) -> dict[str, float]:
        """The trainer's `compute_metrics`: this evaluation's metrics from its scores, kept for `on_evaluate`, which
        logs them (`eval/rm/...`); returns nothing to add to the trainer's own `eval_*` metrics."""
        if compute_result is not None:
            raise ValueError("RewardModelEvalCallback needs the whole eval set at once: set batch_eval_metrics: false")
        scores = torch.as_tensor(prediction.predictions, dtype=torch.float32)
        if scores.ndim != 2 or scores.shape != (len(self.dataset), 2):
            raise ValueError(
                f"the trainer's evaluation produced scores of shape {tuple(scores.shape)}, not one [chosen, rejected] "
                f"row for each of the {len(self.dataset)} pairs of the callback's dataset: give the callback the "
                "trainer's eval dataset and the trainer this callback's preprocess_logits_for_metrics"
            )
        self._from_trainer = reward_model_metrics(scores[:, 0], scores[:, 1], self.dataset, **self._metric_kwargs())
        return {}

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, metrics=None, **kwargs
    ) -> None:
        result, self._from_trainer = self._from_trainer, None
        if result is not None and metrics:
            result["runtime_s"] = metrics.get("eval_runtime")  # the shared pass: the trainer's evaluation time
        if state.is_world_process_zero and model is not None:
            self.evaluate_step(model, args, state, result)

    def final(self, model: torch.nn.Module, args: TrainingArguments, state: TrainerState) -> dict[str, Any]:
        """The evaluation at the end of training (reused when the last step was just evaluated), plus a W&B table of
        accuracy per rating bucket. Call it on the main process."""
        if self.last is None or self.last[0] != state.global_step:
            self.evaluate_step(model, args, state)
        result = self.last[1]
        wandb_run = _wandb_run()
        if wandb_run is not None and result.get("buckets"):
            import wandb

            columns = ["rating", "n", "accuracy", "mean_gap"]
            rows = [[RATING_LABELS[r], b["n"], b["accuracy"], b["mean_gap"]] for r, b in result["buckets"].items()]
            rows.append(["Avg", result["n"], result["accuracy"], result["mean_gap"]])
            wandb_run.log({f"{PREFIX}/accuracy_by_rating": wandb.Table(columns=columns, data=rows)})
        return result

    def evaluate_step(
        self,
        model: torch.nn.Module,
        args: TrainingArguments,
        state: TrainerState,
        result: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Log `result` (the trainer's evaluation) as this step's, or score the pairs here when it is None."""
        if result is None:
            result = self.evaluate(model, args)
        flat = flatten_rm_metrics(result)
        step = state.global_step
        self.last = (step, result)
        state.log_history.append({**flat, "step": step})
        self.history.append({"step": step, **flat})
        buckets = ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in result.get("buckets", {}).items())
        print(f"[rm-eval] step {step}: accuracy {result['accuracy']:.3f} ({buckets})", flush=True)
        wandb_run = _wandb_run()
        if wandb_run is not None:
            wandb_run.log({**flat, "train/global_step": step})
        return result

    def evaluate(self, model: torch.nn.Module, args: TrainingArguments) -> dict[str, Any]:
        model = _unwrap(model)
        device_type = next(model.parameters()).device.type
        bf16 = torch.autocast(device_type=device_type, dtype=torch.bfloat16) if args.bf16 else None
        with bf16 or contextlib.nullcontext():
            return evaluate_reward_model(model, self.tokenizer, self.dataset, **self.kwargs)

    def _metric_kwargs(self) -> dict[str, Any]:
        return {key: value for key, value in self.kwargs.items() if key != "batch_size"}


def _wandb_run() -> Any:
    try:
        import wandb
    except ImportError:
        return None
    return wandb.run
