"""`python -m eval --model PATH_OR_HUB_ID [--adapter DIR] --tasks gsm8k,mmlu,length,diversity,reward --output r.json`

Evaluates a causal LM (or scores a predictions file with `--predictions`), prints a table, writes JSON and, with
`--wandb_project`, logs to W&B. Every input is checked before the model loads; the output is written only at the
end, whole (a failed run leaves no file).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from eval.data import EvalError
from eval.reward_kl import ADAPTER_OFF, resolve_kl_reference
from eval.suite import (
    DEFAULT_GSM8K,
    DEFAULT_MMLU,
    TASKS,
    flatten_metrics,
    load_eval_data,
    parse_tasks,
    resolve_chat,
    run_tasks,
    score_predictions,
)
from recipes.common.errors import UserError, run_cli
from recipes.common.files import read_jsonl, write_json_atomic, write_jsonl_atomic
from recipes.common.modeling import check_model_path
from recipes.common.tracking import package_versions


def _bool_or_auto(value: str) -> bool | None:
    lowered = value.lower()
    if lowered in ("auto", "none"):
        return None
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true, false or auto, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval",
        description="Evaluate a causal LM (full, LoRA adapter, 4-bit) on GSM8K, MMLU, response length, diversity "
        "and reward/KL, or score completions made elsewhere (--predictions).",
    )
    source = parser.add_argument_group("what to evaluate")
    source.add_argument("--model", help="Local model directory or hub id (a LoRA adapter directory works too).")
    source.add_argument("--adapter", help="peft LoRA adapter directory loaded on top of --model.")
    source.add_argument("--load_in_4bit", action="store_true", help="Load the model 4-bit NF4 with double quant.")
    source.add_argument("--predictions", help="JSONL of task records plus a 'completion' string: score, no model.")
    source.add_argument("--tokenizer", help="Tokenizer for token counts with --predictions (default: --model's).")
    source.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available).")
    source.add_argument("--dtype", default="auto", help="Weights dtype: auto, float32, bfloat16, float16.")

    tasks = parser.add_argument_group("tasks and data")
    tasks.add_argument("--tasks", required=True, help=f"Comma-separated, from: {','.join(TASKS)}.")
    tasks.add_argument("--gsm8k", default=None, help=f"GSM8K jsonl, directory or hub name (default {DEFAULT_GSM8K}).")
    tasks.add_argument("--gsm8k_split", default="test", help="Split to evaluate when --gsm8k is a directory/hub name.")
    tasks.add_argument("--gsm8k_fewshot", help="Exemplar source (default: train.jsonl beside --gsm8k / hub train).")
    tasks.add_argument("--num_fewshot", type=int, default=5, help="GSM8K exemplars for the k-shot variant.")
    tasks.add_argument(
        "--gsm8k_chat",
        type=_bool_or_auto,
        default=False,
        help="true: 0-shot chat-template prompts (instruction-tuned models); false: k-shot (lm-eval); auto: chat "
        "when the tokenizer has a chat template. Default false.",
    )
    tasks.add_argument("--mmlu", default=None, help=f"MMLU CSV directory or cais/mmlu (default {DEFAULT_MMLU}).")
    tasks.add_argument("--mmlu_split", default=None, help="MMLU split to score (default: test, else val).")
    tasks.add_argument("--mmlu_num_fewshot", type=int, default=5)
    tasks.add_argument(
        "--prompts",
        help="JSONL with 'prompt' (text or chat messages) for length/diversity/reward (default: the GSM8K questions).",
    )
    tasks.add_argument(
        "--limit", type=int, default=None, help="A fixed subset of this many items per task (chosen by --data_seed)."
    )
    tasks.add_argument(
        "--data_seed", type=int, default=0, help="Seed of the --limit subset: the same items whatever --seed."
    )
    tasks.add_argument("--seed", type=int, default=0, help="Sampling seed (the length/diversity/reward samples).")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--max_new_tokens", type=int, default=256)
    gen.add_argument("--batch_size", type=int, default=16)
    gen.add_argument("--samples_per_prompt", type=int, default=4, help="Sampled responses per prompt.")
    gen.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (1.0 for an unbiased KL).")
    gen.add_argument("--no_embeddings", action="store_true", help="Skip the sentence-embedding diversity.")
    gen.add_argument("--no_progress", action="store_true", help="No progress bars.")

    reward = parser.add_argument_group("reward and KL")
    reward.add_argument(
        "--reward_model",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="Sequence-classification reward model or adapter dir; repeat for several.",
    )
    reward.add_argument(
        "--ref_model",
        help="Reference for KL: a model or adapter dir (or hub id), or `base` for the adapter's base model (the "
        "adapter disabled). Default: the policy's starting point as its run recorded it (start_model or parent_run "
        "in run_complete.json; an SFT adapter: its base); an adapter without that record needs --ref_model.",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--output", help="Write results JSON here.")
    out.add_argument(
        "--samples_output",
        help="Write per-sample records as JSONL (task, item = position in the source data, prompt, completion, "
        "correctness / reward / KL / n_tokens), for paired comparisons item by item.",
    )
    out.add_argument("--wandb_project", help="Log metrics and a samples table to this W&B project.")
    out.add_argument("--wandb_run_name")
    out.add_argument("--wandb_entity")
    return parser


def _reward_specs(specs: list[str]) -> dict[str, str]:
    named = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name or "reward", spec
        if name in named:
            raise EvalError(f"Two reward models named {name!r}: name them, e.g. --reward_model helpful=PATH.")
        named[name] = path
    return named


def _check_paths(args: argparse.Namespace) -> None:
    if args.predictions is None and not args.model:
        raise EvalError(
            "Give --model PATH_OR_HUB_ID (or --predictions FILE.jsonl to score completions made elsewhere)."
        )
    if args.model:
        check_model_path(args.model, allow_adapter=True)
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise EvalError(f"Adapter directory {args.adapter!r} has no adapter_config.json (not a saved peft adapter).")
    for path in _reward_specs(args.reward_model).values():
        check_model_path(path, what="reward model", allow_adapter=True)
    if args.ref_model and args.ref_model != ADAPTER_OFF:
        check_model_path(args.ref_model, what="reference model", allow_adapter=True)
    for flag in ("output", "samples_output"):
        value = getattr(args, flag)
        if value and Path(value).is_dir():
            raise EvalError(f"--{flag} {value!r} is a directory; give a file path.")


def format_table(results: dict[str, dict[str, Any]]) -> str:
    rows = [("task", "metric", "value")]
    for task, metrics in results.items():
        for name, value in metrics.items():
            if isinstance(value, dict):
                continue
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            rows.append((task, name, shown))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    tasks = parse_tasks(args.tasks)
    _check_paths(args)
    reward_paths = _reward_specs(args.reward_model)
    embedder: Any = None if args.no_embeddings else "auto"
    progress = not args.no_progress
    start = time.perf_counter()
    if args.predictions:
        records = read_jsonl(args.predictions)
        tokenizer = None
        if args.tokenizer or args.model:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, trust_remote_code=False)
            except (OSError, ValueError) as err:
                raise EvalError(f"Could not load tokenizer {args.tokenizer or args.model!r}: {err}") from err
        from eval.reward_kl import load_reward_model

        reward_fns = {name: load_reward_model(path, device=args.device) for name, path in reward_paths.items()}
        full = score_predictions(
            tasks,
            records,
            where=args.predictions,
            tokenizer=tokenizer,
            max_new_tokens=args.max_new_tokens,
            reward_fns=reward_fns,
            embedder=embedder,
        )
    else:
        from transformers import AutoTokenizer

        from eval.loading import load_model_and_tokenizer
        from eval.reward_kl import load_reward_model

        # The tokenizer decides the chat variant, so the data can be checked before the (slow) model load.
        tokenizer_source = (
            args.adapter if args.adapter and (Path(args.adapter) / "tokenizer_config.json").is_file() else args.model
        )
        try:
            probe_tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=False)
        except (OSError, ValueError):
            probe_tokenizer = None  # load_model_and_tokenizer reports the problem with its fix
        chat = resolve_chat(args.gsm8k_chat, probe_tokenizer)
        kl_reference = resolve_kl_reference(args.model, args.adapter, args.ref_model) if "reward" in tasks else None
        if kl_reference is not None and kl_reference.path:
            check_model_path(kl_reference.path, what=f"KL reference {kl_reference.description}", allow_adapter=True)
        data = load_eval_data(
            tasks,
            gsm8k_path=args.gsm8k,
            gsm8k_split=args.gsm8k_split,
            gsm8k_fewshot_path=args.gsm8k_fewshot,
            num_fewshot=args.num_fewshot,
            chat=chat,
            mmlu_dir=args.mmlu,
            mmlu_split=args.mmlu_split,
            prompts_path=args.prompts,
            num_samples=args.limit,
            seed=args.data_seed,
        )
        model, tokenizer = load_model_and_tokenizer(
            args.model, adapter=args.adapter, load_in_4bit=args.load_in_4bit, device=args.device, dtype=args.dtype
        )
        ref_model = None
        if kl_reference is not None and kl_reference.path:  # loaded as the policy is: same 4-bit and dtype settings
            ref_model, _ = load_model_and_tokenizer(
                kl_reference.path, load_in_4bit=args.load_in_4bit, device=args.device, dtype=args.dtype
            )
        reward_fns = {
            name: load_reward_model(path, load_in_4bit=args.load_in_4bit, device=args.device)
            for name, path in reward_paths.items()
        }
        full = run_tasks(
            model,
            tokenizer,
            tasks,
            data,
            chat=chat,
            num_fewshot=args.num_fewshot,
            mmlu_num_fewshot=args.mmlu_num_fewshot,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            samples_per_prompt=args.samples_per_prompt,
            temperature=args.temperature,
            seed=args.seed,
            reward_fns=reward_fns,
            ref_model=ref_model,
            embedder=embedder,
            progress=progress,
        )
        full["config"] = {"gsm8k_chat": chat, "mmlu_split": data.mmlu_split}
        if "kl" in full["results"].get("reward", {}):
            full["results"]["reward"]["kl_reference"] = kl_reference.description
            full["config"]["kl_reference"] = kl_reference.description
    config = {
        key: getattr(args, key)
        for key in (
            "model", "adapter", "load_in_4bit", "predictions", "tasks", "gsm8k", "gsm8k_split", "num_fewshot", "mmlu",
            "mmlu_num_fewshot", "prompts", "limit", "data_seed", "seed", "max_new_tokens", "samples_per_prompt",
            "temperature",
            "ref_model",
        )
    }  # fmt: skip
    config.update(full.get("config", {}))
    config["reward_models"] = reward_paths
    return {
        "results": full["results"],
        "config": config,
        "versions": package_versions(("torch", "transformers", "peft", "bitsandbytes")),
        "runtime_s": round(time.perf_counter() - start, 2),
        "samples": full["samples"],
    }


def log_wandb(args: argparse.Namespace, payload: dict[str, Any]) -> str:
    import wandb

    from eval.callback import TABLE_COLUMNS, samples_table_rows

    run = wandb.init(
        project=args.wandb_project,
        name=args.wandb_run_name,
        entity=args.wandb_entity,
        job_type="eval",
        config=payload["config"],
    )
    metrics = flatten_metrics(payload["results"])
    rows = samples_table_rows(0, payload["samples"])
    log: dict[str, Any] = dict(metrics)
    if rows:
        log["eval/samples"] = wandb.Table(columns=TABLE_COLUMNS, data=rows)
    run.log(log)
    run.summary.update(metrics)
    run_dir = run.dir
    run.finish()
    return run_dir


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        payload = run(args)
    except UserError as err:  # EvalError, and the shared layer's (a malformed jsonl file, a model that will not load)
        print(f"error: {err}", file=sys.stderr)
        return 2
    samples = payload.pop("samples")
    print(format_table(payload["results"]))
    if args.output:
        write_json_atomic(args.output, payload)
        print(f"results written to {args.output}")
    if args.samples_output:
        write_jsonl_atomic(args.samples_output, [{"task": t, **r} for t, recs in samples.items() for r in recs])
        print(f"samples written to {args.samples_output}")
    if args.wandb_project:
        run_dir = log_wandb(args, {**payload, "samples": samples})
        print(f"logged to W&B ({run_dir})")
    return 0


def main_logged(argv: list[str], log_file: str) -> int:
    """`main(argv)` with its output in `log_file`, for a process that runs many evaluations: the study's evaluation
    workers import torch, transformers and peft once (10-20 s on a small CPU) instead of once per model. Same code
    path and results as `python -m eval ...` (every sampling seed is set per evaluation). Returns the exit code the
    command would have: 2 for a user error, 1 for a bug (its traceback is in the log)."""
    with open(log_file, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            return main(argv)
        except UserError as err:
            print(f"error: {err}")
            return 2
        except Exception:
            traceback.print_exc()
            return 1


if __name__ == "__main__":
    run_cli(main)
