"""The rounds of rejection sampling as files on disk, so that a killed run continues where it stopped.

    <output_dir>/run_config.json          config fingerprint (a relaunch with another config is an error), W&B run id
    <output_dir>/round_0/eval.json        the starting (SFT) policy, evaluated like every round
    <output_dir>/round_<k>/round.json     the round's fingerprint, temperature and policies
                          generations.jsonl   N samples per prompt from policy k-1 (per-rank `.part-*` files while
                                              under way: finished prompts are kept, an interrupted one is redone)
                          samples.jsonl       the same samples with their scores
                          selected.jsonl      what is kept (SFT rows, or chosen/rejected pairs for iterative DPO)
                          selection.json      reward, acceptance, best-of-N, length and diversity statistics
                          adapter/            the round's policy (checkpoints while training; run_complete.json when
                                              done)
                          eval.json           the evaluation suite and the held-out reward of the round's policy

A stage runs only when its file is missing; every file is written atomically (temp file + rename).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from recipes.common.config import ConfigError
from recipes.common.errors import UserError
from recipes.common.files import read_jsonl, write_json_atomic, write_jsonl_atomic
from recipes.common.outputs import FINISHED_MARKER
from recipes.rejection_sampling.selection import (
    best_of_n_curve,
    by_prompt,
    check_scores,
    kl_best_of_n,
    sample_stats,
    select_best,
    select_pairs,
    selection_stats,
    summarize,
)

RUN_CONFIG = "run_config.json"
ROUND_RECORD = "round.json"
# Settings that change how a run is logged or how fast it goes, never what a round produces.
NOT_FINGERPRINTED = {
    "output_dir", "run_name", "report_to", "overwrite_output_dir", "num_rounds", "generation_batch_size",
    "wandb_project", "wandb_entity", "wandb_group", "wandb_tags", "parent_run", "disable_tqdm", "log_table_prompts",
    "resume_from_checkpoint", "logging_dir", "push_to_hub", "per_device_eval_batch_size", "dataloader_num_workers",
}  # fmt: skip
NOT_FINGERPRINTED_PREFIXES = ("logging_", "save_", "hub_", "eval_steps", "ddp_")

Sampler = Callable[[Sequence[str], int, float, int], list[list[dict[str, Any]]]]
Scorer = Callable[[Sequence[dict[str, Any]], Sequence[str]], list[float]]


class RoundStateError(UserError):
    """The output dir holds rounds this config did not produce; the message says what differs and how to proceed."""


# --- run directory, fingerprint -----------------------------------------------------------------------------------


def fingerprinted(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The settings that decide what the rounds produce, flattened to `section.key`."""
    flat = {}
    for section, values in config.items():
        for key, value in values.items():
            if key in NOT_FINGERPRINTED or key.startswith(NOT_FINGERPRINTED_PREFIXES):
                continue
            flat[f"{section}.{key}"] = value
    return flat


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys[:8]]
    return "; ".join(shown) + (f"; and {len(keys) - 8} more" if len(keys) > 8 else "")


def round_dir(output_dir: str | Path, k: int) -> Path:
    return Path(output_dir) / f"round_{k}"


def open_run_dir(output_dir: str, config: dict[str, dict[str, Any]], overwrite: bool, state: PartialState) -> dict:
    """Create or reopen the run directory; returns its record ({"fingerprint", "settings", "wandb_id", ...}).

    A run dir written with other settings is an error naming the differences, unless `overwrite` (then the old
    contents move to `previous-<time>/` inside it: nothing is deleted). Checked on every rank, written by the main.
    """
    path = Path(output_dir)
    record_file = path / RUN_CONFIG
    settings = fingerprinted(config)
    current = fingerprint(settings)
    if state.is_main_process:
        if record_file.is_file():
            record = json.loads(record_file.read_text())
            if record["fingerprint"] != current:
                if not overwrite:
                    raise RoundStateError(
                        f"{output_dir} holds rounds made with another config ({_differences(record['settings'], settings)}). "
                        "Relaunch with the same settings to continue it, choose another `--output_dir`, or pass "
                        "`--overwrite_output_dir true` (the old rounds are moved to previous-<time>/ inside it)."
                    )
                _set_aside(path)
        elif path.is_dir() and any(p.name != "wandb" for p in path.iterdir()):
            raise RoundStateError(
                f"{output_dir} is not empty and holds no {RUN_CONFIG}: it is not a rejection-sampling run dir. "
                "Choose another `--output_dir` (nothing in this one was touched)."
            )
        if not record_file.is_file():
            import uuid

            record = {"fingerprint": current, "settings": settings, "wandb_id": uuid.uuid4().hex[:8]}
            record["created_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            write_json_atomic(record_file, record)
    state.wait_for_everyone()
    record = json.loads(record_file.read_text())
    for existing in sorted(path.glob("round_*/" + ROUND_RECORD)):
        if json.loads(existing.read_text()).get("fingerprint") != record["fingerprint"]:
            raise RoundStateError(
                f"{existing.parent} was made by a different config than {record_file} (fingerprints differ): it was "
                "copied or mixed in from another run. Move it out of this run dir, or use another `--output_dir`."
            )
    return record


def _set_aside(path: Path) -> None:
    backup = path / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    backup.mkdir()
    for item in path.iterdir():
        if item.name.startswith(("round_", RUN_CONFIG, "run_complete")):
            shutil.move(str(item), backup / item.name)
    print(f"[rejection_sampling] overwrite_output_dir: earlier rounds moved to {backup}", flush=True)


def start_round(path: Path, k: int, record: dict, details: dict[str, Any], state: PartialState) -> None:
    if state.is_main_process and not (path / ROUND_RECORD).is_file():
        write_json_atomic(path / ROUND_RECORD, {"round": k, "fingerprint": record["fingerprint"], **details})
    state.wait_for_everyone()


# --- sharded, resumable work ----------------------------------------------------------------------------------------


def _read_parts(parts: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    """Finished items of earlier (possibly killed) attempts: one JSON line per item; a torn last line is ignored."""
    done: dict[str, list[dict[str, Any]]] = {}
    for part in parts:
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue  # only ever the line a kill interrupted
            done[item["key"]] = item["records"]
    return done


def _repair(part: Path) -> None:
    """Drop a line torn by a kill, so that appending starts on a fresh line."""
    if part.is_file() and part.stat().st_size and not part.read_bytes().endswith(b"\n"):
        text = part.read_text(encoding="utf-8")
        part.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")


def _append(part: Path, key: str, records: list[dict[str, Any]]) -> None:
    with part.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"key": key, "records": records}, ensure_ascii=False) + "\n")


def run_sharded(
    items: Sequence[dict[str, Any]],
    key: Callable[[dict[str, Any]], str],
    work: Callable[[list[dict[str, Any]]], list[list[dict[str, Any]]]],
    out_path: Path,
    chunk_size: int,
    state: PartialState,
) -> list[dict[str, Any]]:
    """`work` on every item, split across processes (item i goes to rank i % world size) in chunks, returning the
    records of all items in item order from `out_path` (written by the main process once all ranks are done).

    `work(chunk)` returns one list of records per item. Each finished chunk is appended to this rank's part file,
    one line per item, so a relaunch redoes only unfinished chunks. Chunks are the same on a relaunch with the same
    number of processes, so a redone chunk (with its seed) gives what the uninterrupted run would have given.
    """
    if not out_path.is_file():
        parts = sorted(out_path.parent.glob(f"{out_path.stem}.part-*.jsonl"))
        done = _read_parts(parts)
        mine = [it for i, it in enumerate(items) if i % state.num_processes == state.process_index]
        part = out_path.with_name(f"{out_path.stem}.part-{state.process_index}.jsonl")
        _repair(part)
        for start in range(0, len(mine), chunk_size):
            chunk = mine[start : start + chunk_size]
            if all(key(it) in done for it in chunk):
                continue
            for item, records in zip(chunk, work(chunk), strict=True):
                if key(item) not in done:
                    _append(part, key(item), records)
        state.wait_for_everyone()
        if state.is_main_process:
            parts = sorted(out_path.parent.glob(f"{out_path.stem}.part-*.jsonl"))
            done = _read_parts(parts)
            missing = [key(it) for it in items if key(it) not in done]
            if missing:
                raise RuntimeError(f"{out_path}: {len(missing)} items have no records (first: {missing[0]}).")
            write_jsonl_atomic(out_path, [r for it in items for r in done[key(it)]])
            for part in parts:
                part.unlink()
        state.wait_for_everyone()
    return read_jsonl(out_path)


# --- sampling -----------------------------------------------------------------------------------------------------


def chunk_seed(seed: int, k: int, first_key: str) -> int:
    """A seed per (round, chunk), so an interrupted chunk redone after a relaunch draws the same samples."""
    return int(hashlib.sha256(f"{seed}/{k}/{first_key}".encode()).hexdigest()[:8], 16)


def hf_sampler(model: Any, tokenizer: Any, max_new_tokens: int, batch_size: int, top_p: float) -> Sampler:
    """Sampling with transformers' `generate`, through the evaluation suite's batched generation (left padding,
    length-sorted batches, `num_return_sequences` per prompt)."""
    from eval.generation import generate
    from eval.suite import eval_mode

    def sample(prompts: Sequence[str], n: int, temperature: float, seed: int) -> list[list[dict[str, Any]]]:
        devices = list(range(torch.cuda.device_count()))
        with eval_mode(model), torch.random.fork_rng(devices=devices):
            groups = generate(
                model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                do_sample=True, temperature=temperature, top_p=top_p, num_return_sequences=n, seed=seed,
                progress=False,
            )  # fmt: skip
        return [
            [{"completion": c.text, "num_tokens": len(c.token_ids), "hit_limit": c.hit_limit} for c in group]
            for group in groups
        ]

    return sample


def vllm_sampler(
    policy_path: str, base: str | None, tokenizer: Any, max_new_tokens: int, top_p: float, load_in_4bit: bool
) -> Sampler:
    """The hook for a faster backend: vLLM on a GPU (`generation_backend: vllm`), never needed otherwise.

    The base loads once per round with the round's LoRA adapter; prompts go in as token ids (the rendered chat
    template already holds BOS). Not exercised by the CPU tests.
    """
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from eval.generation import encode

    llm = LLM(
        model=base or policy_path, tokenizer=policy_path if base else None, enable_lora=base is not None,
        quantization="bitsandbytes" if load_in_4bit else None, max_lora_rank=64, seed=0,
    )  # fmt: skip
    lora = LoRARequest("policy", 1, policy_path) if base else None

    def sample(prompts: Sequence[str], n: int, temperature: float, seed: int) -> list[list[dict[str, Any]]]:
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
        inputs = [{"prompt_token_ids": encode(tokenizer, p)} for p in prompts]
        outputs = llm.generate(inputs, params, lora_request=lora, use_tqdm=False)
        return [
            [
                {"completion": o.text, "num_tokens": len(o.token_ids), "hit_limit": o.finish_reason == "length"}
                for o in out.outputs
            ]
            for out in outputs
        ]

    return sample


def check_backend(backend: str) -> None:
    if backend == "hf":
        return
    if not torch.cuda.is_available():
        raise ConfigError("generation_backend: vllm needs a CUDA GPU; use `generation_backend: hf` on this machine.")
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "generation_backend: vllm asked for, but vllm is not installed (`pip install vllm`); or use `hf`."
        ) from err


def load_generation_model(model_args: Any, policy_path: str) -> Any:
    """The policy for sampling only: the base as configured (4-bit by default) plus the round's adapter, frozen."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from recipes.common.modeling import check_model_path, keep_4bit_weights_unpacked, quantization_kwargs
    from recipes.common.policy import adapter_base

    base = adapter_base(policy_path)
    kwargs = quantization_kwargs(model_args)
    model = keep_4bit_weights_unpacked(
        AutoModelForCausalLM.from_pretrained(check_model_path(base or policy_path), **kwargs)
    )
    if "quantization_config" not in kwargs:
        model.to(PartialState().device)
    if base is not None:
        model = PeftModel.from_pretrained(model, policy_path)
    return model.eval()


def release_memory() -> None:
    """Give back what a model just dropped by the caller held (the next stage loads another)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sample_round(
    sampler: Sampler,
    prompts: Sequence[dict[str, Any]],
    k: int,
    n: int,
    temperature: float,
    seed: int,
    path: Path,
    chunk_size: int,
    state: PartialState,
) -> list[dict[str, Any]]:
    """`n` samples per prompt at `temperature`; prompts are sorted by length before sharding, so every batch holds
    similar lengths and every rank a similar load."""
    ordered = sorted(prompts, key=lambda p: (-p["num_tokens"], p["prompt_id"]))

    def work(chunk: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        groups = sampler([p["text"] for p in chunk], n, temperature, chunk_seed(seed, k, str(chunk[0]["prompt_id"])))
        return [
            [
                {
                    "round": k,
                    "prompt_id": p["prompt_id"],
                    "sample_id": j,
                    "prompt": p["user"],
                    "temperature": temperature,
                    **s,
                }
                for j, s in enumerate(group)
            ]
            for p, group in zip(chunk, groups, strict=True)
        ]

    records = run_sharded(ordered, lambda p: str(p["prompt_id"]), work, path, chunk_size, state)
    return sorted(records, key=lambda r: (r["prompt_id"], r["sample_id"]))


def score_samples(
    scorer: Scorer,
    scorer_name: str,
    samples: Sequence[dict[str, Any]],
    prompts: Sequence[dict[str, Any]],
    path: Path,
    state: PartialState,
    chunk_size: int = 256,
) -> list[dict[str, Any]]:
    """Scores for every sample (checked: one finite number each), written next to the samples in `path`."""
    by_id = {p["prompt_id"]: p for p in prompts}

    def work(chunk: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        rows = [by_id[s["prompt_id"]] for s in chunk]
        scores = check_scores(scorer(rows, [s["completion"] for s in chunk]), len(chunk), str(path), scorer_name)
        return [[{**s, "reward": score}] for s, score in zip(chunk, scores)]

    return run_sharded(list(samples), lambda s: f"{s['prompt_id']}:{s['sample_id']}", work, path, chunk_size, state)


# --- training -----------------------------------------------------------------------------------------------------


def training_rows(method: str, selected: Sequence[dict[str, Any]], prompts: dict[int, dict]) -> list[dict]:
    """TRL rows: prompt-completion (completion-only loss) for SFT, prompt/chosen/rejected for DPO."""

    def reply(text: str) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": text}]

    if method == "rejection_sampling":
        return [{"prompt": prompts[s["prompt_id"]]["messages"], "completion": reply(s["completion"])} for s in selected]
    return [
        {
            "prompt": prompts[p["prompt_id"]]["messages"],
            "chosen": reply(p["chosen"]["completion"]),
            "rejected": reply(p["rejected"]["completion"]),
        }
        for p in selected
    ]


def train_round(
    method: str,
    rows: list[dict[str, Any]],
    out_dir: Path,
    start_policy: str,
    training_args: Any,
    model_args: Any,
    tokenizer: Any,
    dpo_beta: float,
    run_name: str,
) -> dict[str, float]:
    """Fine-tune `start_policy` on `rows` into `out_dir` (SFT, or DPO with the start policy as the reference);
    resumes from the last checkpoint in `out_dir`, and marks it finished at the end."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTTrainer

    from recipes.common.outputs import mark_finished, prepare_output_dir
    from recipes.common.policy import load_policy

    resume_from = prepare_output_dir(str(out_dir), False, None)
    settings = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(training_args) if f.init}
    settings.update(output_dir=str(out_dir), run_name=run_name)
    start_args = dataclasses.replace(model_args, model_name_or_path=start_policy)
    model, peft_config = load_policy(start_args, gradient_checkpointing=training_args.gradient_checkpointing)
    dataset = Dataset.from_list(rows)
    if method == "rejection_sampling":
        args = type(training_args)(**settings)
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
        )
    else:
        # Shared settings carry over; `loss_type` means different things in SFT and DPO (DPO keeps its sigmoid).
        accepted = {f.name for f in dataclasses.fields(DPOConfig) if f.init} - {"loss_type"}
        args = DPOConfig(**{k: v for k, v in settings.items() if k in accepted}, beta=dpo_beta)
        trainer = DPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
        )
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(str(out_dir))
    metrics = {f"train/{k}": v for k, v in result.metrics.items()}
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(out_dir))
        mark_finished(str(out_dir), {"stage": method, "metrics": metrics, "start_policy": start_policy})
    trainer.accelerator.wait_for_everyone()
    del trainer, model
    release_memory()
    return metrics


# --- prompts and scorers ------------------------------------------------------------------------------------------


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


# --- one round ----------------------------------------------------------------------------------------------------


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


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
        metrics.update(_flat_stats(stats))
    if state.is_main_process:
        print(f"[rejection_sampling] round {k} done: {_headline(metrics)}", flush=True)
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


class RejectionSamplingError(UserError):
    """A round cannot go on (e.g. nothing passed the selection); the message says why and what to change."""


def _flat_stats(stats: dict[str, Any]) -> dict[str, float]:
    flat = {}
    for group, values in stats.items():
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"rs/{group}/{'n_' + name if group == 'best_of_n' else name}"] = value
    return flat


HEADLINE = ("eval/gsm8k/accuracy", "eval/policy_reward/mean", "rs/samples/reward_mean", "rs/selected/acceptance_rate")


def _headline(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{name} {metrics[name]:.3f}" for name in HEADLINE if name in metrics)


# --- evaluation and logging ---------------------------------------------------------------------------------------


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
        log.update(_flat_stats(stats))
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
