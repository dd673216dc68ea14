"""Rejection-sampling generation: batched across prompts and samples vs one prompt at a time, in one process.

    python scripts/benchmarks/rs_generation.py [--policy outputs/demo/sft] [--prompts outputs/demo/data/prompts]
        [--num_prompts 16] [--num_samples 8] [--max_new_tokens 32] [--batch_size 16] [--repeats 2] [--per_sample]

The same policy (4-bit QLoRA adapter by default) draws N samples for each of the same prompts three ways:

- batched: what the recipe does (`eval.generation.generate`): `batch_size` prompts per `generate` call, each with
  `num_return_sequences=N`, left-padded, in length-sorted batches;
- per prompt: one `generate` call per prompt with `num_return_sequences=N`;
- per sample (with `--per_sample`): one `generate` call per sample, the naive loop (N times slower again).

Runs alternate (batched, per prompt, ...) after a short warm-up, so drift in machine load hits all
alike. Prints the median wall time of each and the speed-up of batched over the others (target >= 4x over per
prompt on 2 cores with the tiny demo model), and the generated tokens per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
from eval.generation import generate  # noqa: E402
from recipes.common.config import QLoRAModelConfig  # noqa: E402
from recipes.common.errors import UserError, run_cli  # noqa: E402
from recipes.common.policy import load_policy_tokenizer  # noqa: E402
from recipes.rejection_sampling.sampling import load_generation_model  # noqa: E402


def load_prompt_texts(prompts_dir: Path, tokenizer, num_prompts: int) -> list[str]:
    rows = [json.loads(line) for line in (prompts_dir / "train.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("task", "math") == "math"][:num_prompts]
    if len(rows) < num_prompts:
        raise UserError(f"{prompts_dir}/train.jsonl has only {len(rows)} math prompts; lower --num_prompts.")
    return [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    groups = fn()
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(c.token_ids) for group in groups for c in group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="outputs/demo/sft", help="SFT adapter dir (or a full model).")
    parser.add_argument("--prompts", default="outputs/demo/data/prompts", help="Dir with train.jsonl prompts.")
    parser.add_argument("--num_prompts", type=int, default=16)
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16, help="Prompts per batched generate call.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--per_sample", action="store_true", help="Also time one generate call per sample.")
    parser.add_argument("--load_in_4bit", type=lambda v: v.lower() == "true", default=True)
    parser.add_argument("--output_json", default=None, help="Also write the results here.")
    args = parser.parse_args()

    model_args = QLoRAModelConfig(model_name_or_path=args.policy, load_in_4bit=args.load_in_4bit, dtype="float32")
    tokenizer = load_policy_tokenizer(model_args)
    model = load_generation_model(model_args, args.policy)
    prompts = load_prompt_texts(Path(args.prompts), tokenizer, args.num_prompts)
    n, common = args.num_samples, {"max_new_tokens": args.max_new_tokens, "do_sample": True, "progress": False}

    ways = {
        "batched": lambda: generate(
            model, tokenizer, prompts, batch_size=args.batch_size, num_return_sequences=n, seed=0, **common
        ),
        "per_prompt": lambda: [
            generate(model, tokenizer, [p], batch_size=1, num_return_sequences=n, seed=i, **common)[0]
            for i, p in enumerate(prompts)
        ],
    }
    if args.per_sample:
        ways["per_sample"] = lambda: [
            [generate(model, tokenizer, [p], batch_size=1, seed=i * n + j, **common)[0][0] for j in range(n)]
            for i, p in enumerate(prompts)
        ]
    times: dict[str, list[float]] = {name: [] for name in ways}
    tokens: dict[str, list[int]] = {name: [] for name in ways}
    with torch.inference_mode():
        # Warm-up: the first calls pay for allocation and kernel selection.
        generate(model, tokenizer, prompts[:2], batch_size=2, num_return_sequences=n, seed=0, **common)
        for _ in range(args.repeats):
            for name, fn in ways.items():
                elapsed, count = timed(fn)
                times[name].append(elapsed)
                tokens[name].append(count)

    median = {name: statistics.median(values) for name, values in times.items()}
    results = {
        "settings": {**vars(args), "torch_threads": torch.get_num_threads()},
        "median_seconds": median,
        "tokens_per_second": {name: statistics.fmean(tokens[name]) / median[name] for name in ways},
        "speedup_batched_over_per_prompt": median["per_prompt"] / median["batched"],
    }
    if "per_sample" in median:
        results["speedup_batched_over_per_sample"] = median["per_sample"] / median["batched"]
    print(
        f"{args.num_prompts} prompts x N={n}, max_new_tokens {args.max_new_tokens}, {torch.get_num_threads()} threads"
    )
    for name in ways:
        print(f"  {name:<11} {median[name]:7.2f} s  ({results['tokens_per_second'][name]:7.1f} generated tokens/s)")
    print(f"batched vs per prompt: {results['speedup_batched_over_per_prompt']:.2f}x (target >= 4x)")
    if "per_sample" in median:
        print(f"batched vs per sample: {results['speedup_batched_over_per_sample']:.2f}x")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_cli(main)  # a user error prints `error: <message>` and exits 2, without a traceback
