"""One round of rejection sampling (sample, score, select, train, evaluate), each stage skipped when its file in
the run directory (see rundir.py) exists."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelerate import PartialState

from recipes.common.errors import UserError
from recipes.common.files import write_json_atomic, write_jsonl_atomic
from recipes.common.outputs import FINISHED_MARKER
from recipes.rejection_sampling.prompts import Scorer
from recipes.rejection_sampling.reporting import evaluate_policy, flat_stats, headline, log_round
from recipes.rejection_sampling.rundir import read_records, round_dir, start_round
from recipes.rejection_sampling.sampling import (
    Sampler,
    hf_sampler,
    load_generation_model,
    release_memory,
    sample_round,
    score_samples,
    vllm_sampler,
)
from recipes.rejection_sampling.selection import (
    best_of_n_curve,
    by_prompt,
    sample_stats,
    select_best,
    select_pairs,
    selection_stats,
)
from recipes.rejection_sampling.training import train_round, training_rows


class RejectionSamplingError(UserError):
    """A round cannot go on (e.g. nothing passed the selection); the message says why and what to change."""


class PolicyCache:
    """The sampling model of one policy, kept between evaluating policy k and sampling round k + 1 from it."""

    def __init__(self, model_args: Any) -> None:
        self.model_args, self.path, self.model = model_args, None, None

    def get(self, path: str) -> Any:
        if self.path != path:
            self.release()
            self.model, self.path = load_generation_model(self.model_args, path), path
        return self.model

    def release(self) -> None:
        self.model, self.path = None, None
        release_memory()


def temperature_of(rs: Any, k: int) -> float:
    return rs.temperatures[min(k, len(rs.temperatures)) - 1]


def run_round(
    k: int,
    rs: Any,
    recipe_args: Any,
    training_args: Any,
    model_args: Any,
    tokenizer: Any,
    prompts: list[dict],
    heldout: list[dict],
    scorer: Scorer,
    record: dict,
    state: PartialState,
    run: Any,
    cache: PolicyCache,
) -> dict[str, Any]:
    """Round k >= 1: sample from policy k-1, score, select, train policy k; then (every k) evaluate policy k.
    Each stage is skipped when its file exists. Returns {"round", "policy", "metrics"}."""
    out = Path(training_args.output_dir)
    path = round_dir(out, k)
    sft_policy = model_args.model_name_or_path
    policy = sft_policy if k == 0 else str(path / "adapter")
    seed = training_args.seed
    timings: dict[str, float] = {}  # seconds of the stages run by this launch (skipped stages are not timed)
    if k > 0:
        previous = sft_policy if k == 1 else str(round_dir(out, k - 1) / "adapter")
        start = sft_policy if rs.train_from == "sft" else previous
        temperature = temperature_of(rs, k)
        details = {"temperature": temperature, "sampled_from": previous, "trained_from": start, "method": rs.method}
        start_round(path, k, record, details, state)
        if not (path / "generations.jsonl").is_file():
            with timed(timings, "sample"):
                sampler = make_sampler(rs, model_args, previous, tokenizer, cache)
                sample_round(
                    sampler, prompts, k, rs.num_samples, temperature, seed, path / "generations.jsonl",
                    rs.generation_batch_size, state,
                )  # fmt: skip
        if not (path / "samples.jsonl").is_file():
            with timed(timings, "score"):
                generations = sorted(
                    read_records(path / "generations.jsonl"), key=lambda r: (r["prompt_id"], r["sample_id"])
                )
                score_samples(scorer, rs.scorer, generations, prompts, path / "samples.jsonl", state)
        if not (path / "selected.jsonl").is_file():
            with timed(timings, "select"):
                select_round(k, rs, out, path, len(prompts), tokenizer, state)
        if not (path / "adapter" / FINISHED_MARKER).is_file():
            cache.release()
            with timed(timings, "train"):
                selected = read_records(path / "selected.jsonl")
                rows = training_rows(rs.method, selected, {p["prompt_id"]: p for p in prompts})
                run_name = f"{training_args.run_name or rs.method}-round{k}"
                train_round(
                    rs.method, rows, path / "adapter", start, training_args, model_args, tokenizer, rs.dpo_beta,
                    run_name,
                )  # fmt: skip

    metrics_file = path / "eval.json"
    if not metrics_file.is_file():
        with timed(timings, "evaluate"):
            if state.is_main_process:
                model = cache.get(policy)
                batch_size = training_args.per_device_eval_batch_size
                metrics, table = evaluate_policy(model, tokenizer, recipe_args, rs, heldout, scorer, seed, batch_size)
                write_json_atomic(metrics_file, {"round": k, "policy": policy, "metrics": metrics, "samples": table})
                log_round(run, k, path, metrics, table, rs)
            state.wait_for_everyone()
        if k == rs.num_rounds:
            cache.release()
    if timings and state.is_main_process:
        print(f"[rejection_sampling] round {k} stage times: {', '.join(f'{n} {t:.0f} s' for n, t in timings.items())}")
    evaluation = json.loads(metrics_file.read_text())
    metrics = dict(evaluation["metrics"])
    if k > 0:
        stats = json.loads((path / "selection.json").read_text())
        metrics.update(flat_stats(stats))
    if state.is_main_process:
        print(f"[rejection_sampling] round {k} done: {headline(metrics)}", flush=True)
    return {"round": k, "policy": policy, "metrics": metrics, "seconds": timings}


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - started


def make_sampler(rs: Any, model_args: Any, policy: str, tokenizer: Any, cache: PolicyCache) -> Sampler:
    if rs.generation_backend == "vllm":
        from recipes.common.policy import adapter_base

        cache.release()
        base = adapter_base(policy)
        return vllm_sampler(policy, base, tokenizer, rs.max_new_tokens, rs.top_p, model_args.load_in_4bit)
    model = cache.get(policy)
    return hf_sampler(model, tokenizer, rs.max_new_tokens, rs.generation_batch_size, rs.top_p)


def select_round(k: int, rs: Any, out: Path, path: Path, num_prompts: int, tokenizer: Any, state: PartialState) -> None:
    """Write selected.jsonl and selection.json (main process). An empty selection is an error, written nowhere."""
    from eval.diversity import set_diversity
    from eval.length import length_metrics

    if state.is_main_process:
        samples = read_records(path / "samples.jsonl")
        pool = samples
        if rs.selection == "best_of_all_rounds":
            pool = [s for j in range(1, k) for s in read_records(round_dir(out, j) / "samples.jsonl")] + samples
        options = {"reward_threshold": rs.reward_threshold, "dedupe": rs.dedupe, "keep_truncated": rs.keep_truncated}
        if rs.method == "rejection_sampling":
            selected = select_best(pool, keep_per_prompt=rs.keep_per_prompt, **options)
            kept = selected
        else:
            selected = select_pairs(pool, **options)
            kept = [p["chosen"] for p in selected]
        stats = {"samples": sample_stats(samples), "selected": selection_stats(kept, num_prompts, k)}
        if rs.method == "iterative_dpo" and selected:
            margins = [p["chosen"]["reward"] - p["rejected"]["reward"] for p in selected]
            stats["selected"]["pair_margin_mean"] = sum(margins) / len(margins)
        curve = best_of_n_curve([[s["reward"] for s in g] for g in by_prompt(samples).values()])
        stats["best_of_n"] = {str(n): value for n, value in curve.items()}
        if not kept:
            raise RejectionSamplingError(
                f"Round {k} kept nothing: none of the {len(samples)} samples of {num_prompts} prompts passed the "
                f"selection (reward_threshold {rs.reward_threshold}, keep_truncated {rs.keep_truncated}; rewards: "
                f"max {stats['samples']['reward_max']:.4g}, mean {stats['samples']['reward_mean']:.4g}; "
                f"{stats['samples']['frac_hit_limit']:.0%} cut by max_new_tokens). The samples and their scores are "
                f"in {path / 'samples.jsonl'}. Lower `reward_threshold`, or raise `num_samples`, `max_new_tokens` or "
                "the temperature, then run into a new `--output_dir` (or pass `--overwrite_output_dir true`)."
            )
        texts = [s["completion"] for s in kept]
        stats["length"] = length_metrics(texts, tokenizer)
        stats["diversity"] = set_diversity(texts)
        write_json_atomic(path / "selection.json", stats)
        write_jsonl_atomic(path / "selected.jsonl", selected)
    state.wait_for_everyone()
    if not (path / "selected.jsonl").is_file():
        raise RejectionSamplingError(f"Round {k}: the main process selected nothing (see its error above).")
