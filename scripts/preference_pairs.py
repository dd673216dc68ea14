#!/usr/bin/env python
"""Math preference pairs from a policy's own samples: right vs wrong by the GSM8K grader (Ivison et al. 2024's setup).

    python scripts/preference_pairs.py [--policy outputs/demo/sft] [--prompts outputs/demo/data/prompts]
        [--num_prompts 256] [--num_samples 8] [--max_new_tokens 64] [--test_fraction 0.125]
        [--output_dir outputs/demo/math_pairs]

For a fair PPO-vs-DPO comparison both methods learn from one preference set: DPO trains on these pairs, a reward
model trains on the same pairs, and PPO trains on that reward model (scripts/studies/demo.yaml does all three).
Each training prompt gets `num_samples` responses from the policy at temperature 1; each is graded by the evaluation
suite's GSM8K grader (`eval.gsm8k.grade`, the one grader); a prompt whose samples are all right or all wrong gives
no pair, any other gives one pair, a right sample (chosen) against a wrong one (rejected), picked as the rejection
sampling recipe picks DPO pairs (`recipes.rejection_sampling.selection.select_pairs`: best vs worst, duplicates
dropped, truncated samples skipped). Every pair is rated `significantly_better` (a right final answer against a
wrong one), so the reward recipe's Llama 2 margin applies.

Writes TRL conversational preference data, `train.jsonl` and `test.jsonl` (split by prompt, seeded), that the reward
and DPO recipes read as `dataset_name: <output_dir>`, and `pairs.json` (settings and counts). An existing output
dir is never overwritten: it is reused when it was built with the same settings, refused otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from recipes.common.config import QLoRAModelConfig  # noqa: E402
from recipes.common.errors import UserError, run_cli  # noqa: E402
from recipes.common.files import write_json_atomic, write_jsonl_atomic  # noqa: E402
from recipes.common.policy import load_policy_tokenizer  # noqa: E402
from recipes.rejection_sampling.prompts import build_scorer, load_prompts  # noqa: E402
from recipes.rejection_sampling.sampling import hf_sampler, load_generation_model  # noqa: E402
from recipes.rejection_sampling.selection import check_scores, select_pairs  # noqa: E402
from recipes.rejection_sampling.training import training_rows  # noqa: E402

RATING = "significantly_better"  # a right final answer against a wrong one: Llama 2's strongest preference


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="outputs/demo/sft", help="The policy that samples (SFT adapter or model).")
    parser.add_argument("--prompts", default="outputs/demo/data/prompts", help="Prompts dir (rows with an `answer`).")
    parser.add_argument("--split", default="train")
    parser.add_argument("--prompt_tasks", nargs="*", default=["math"], help="Keep prompts of these `task`s only.")
    parser.add_argument("--num_prompts", type=int, default=256)
    parser.add_argument("--num_samples", type=int, default=8, help="Responses per prompt (2 or more).")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=32, help="Prompts per generate call (x num_samples).")
    parser.add_argument("--grader_mode", choices=("flexible", "strict"), default="flexible")
    parser.add_argument("--test_fraction", type=float, default=0.125, help="Share of pairs held out as `test`.")
    parser.add_argument("--load_in_4bit", type=lambda v: v.lower() == "true", default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/demo/math_pairs")
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        raise UserError(f"--num_samples {args.num_samples}: a pair needs 2 or more samples per prompt.")
    if args.num_prompts < 2:
        raise UserError(f"--num_prompts {args.num_prompts}: give 2 or more (a train and a test pair at least).")
    if not 0 < args.test_fraction < 1:
        raise UserError(f"--test_fraction {args.test_fraction}: give a share strictly between 0 and 1.")
    return args


def settings_of(args: argparse.Namespace) -> dict:
    return {key: value for key, value in vars(args).items() if key != "output_dir"}


def existing_build(out: Path, settings: dict) -> bool:
    """True when `out` already holds pairs built with these settings; an error when it holds anything else."""
    if not out.exists() or not any(out.iterdir()):
        return False
    summary = out / "pairs.json"
    if summary.is_file() and json.loads(summary.read_text()).get("settings") == settings:
        return True
    raise UserError(
        f"{out} already exists and holds other files or pairs built with other settings (see {summary}). "
        "It is not overwritten: give another --output_dir, or delete that directory yourself."
    )


def conversational_pairs(pairs: list[dict], prompts: dict[int, dict]) -> list[dict]:
    """The rejection-sampling recipe's DPO rows (prompt, chosen, rejected), rated for the reward recipe's margin."""
    return [{**row, "rating": RATING, "task": "math"} for row in training_rows("iterative_dpo", pairs, prompts)]


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    out, settings = Path(args.output_dir), settings_of(args)
    if existing_build(out, settings):
        print(f"[pairs] {out} already holds these pairs (same settings): kept")
        return out
    started = time.perf_counter()
    model_args = QLoRAModelConfig(model_name_or_path=args.policy, load_in_4bit=args.load_in_4bit, dtype="float32")
    tokenizer = load_policy_tokenizer(model_args)
    data = SimpleNamespace(dataset_name=args.prompts, dataset_config=None)
    filters = SimpleNamespace(prompt_tasks=args.prompt_tasks, scorer="gsm8k")
    prompts = load_prompts(data, filters, args.split, args.num_prompts, tokenizer, args.seed)
    grade = build_scorer(SimpleNamespace(scorer="gsm8k", grader_mode=args.grader_mode))

    model = load_generation_model(model_args, args.policy)
    sampler = hf_sampler(model, tokenizer, args.max_new_tokens, args.batch_size, top_p=1.0)
    groups = sampler([p["text"] for p in prompts], args.num_samples, args.temperature, args.seed)
    samples = [
        {"prompt_id": p["prompt_id"], "round": 1, "sample_id": j, **s}
        for p, group in zip(prompts, groups, strict=True)
        for j, s in enumerate(group)
    ]
    rows = [prompts[s["prompt_id"]] for s in samples]
    rewards = check_scores(grade(rows, [s["completion"] for s in samples]), len(samples), "pair samples", "gsm8k")
    for sample, reward in zip(samples, rewards):
        sample["reward"] = reward
    pairs = select_pairs(samples)
    if len(pairs) < 2:
        raise UserError(
            f"Only {len(pairs)} of {len(prompts)} prompts have both a right and a wrong sample among "
            f"{args.num_samples} (accuracy of the samples: {sum(rewards) / len(rewards):.2f}): no preference data. "
            "Raise --num_samples or --num_prompts, or sample from a policy that solves some problems."
        )

    random.Random(args.seed).shuffle(pairs)
    num_test = max(1, round(len(pairs) * args.test_fraction))
    by_id = {p["prompt_id"]: p for p in prompts}
    write_jsonl_atomic(out / "test.jsonl", conversational_pairs(pairs[:num_test], by_id))
    write_jsonl_atomic(out / "train.jsonl", conversational_pairs(pairs[num_test:], by_id))
    write_jsonl_atomic(out / "samples.jsonl", samples)
    counts = {
        "prompts": len(prompts),
        "samples": len(samples),
        "sample_accuracy": sum(rewards) / len(rewards),
        "pairs": len(pairs),
        "train_pairs": len(pairs) - num_test,
        "test_pairs": num_test,
    }
    summary = {"settings": settings, "counts": counts, "seconds": round(time.perf_counter() - started, 1)}
    write_json_atomic(out / "pairs.json", summary)  # last: its presence marks a finished build
    print(
        f"[pairs] {len(pairs)} pairs from {len(prompts)} prompts x {args.num_samples} samples of {args.policy} "
        f"(sample accuracy {counts['sample_accuracy']:.2f}): {counts['train_pairs']} train, {num_test} test -> {out}"
    )
    return out


if __name__ == "__main__":
    run_cli(main)
