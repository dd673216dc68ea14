"""Batched evaluation vs one prompt at a time, on the tiny model, in one process.

    python scripts/benchmarks/eval_speed.py [--model outputs/demo/base] [--n 32] [--batch_size 16] [--repeats 2] [--threads 2]

Two workloads, each timed batched (`batch_size` prompts per forward pass, length-sorted, left-padded) and one at a
time (`batch_size=1`) with the same code path, alternating after a warm-up so drift in machine load hits both alike:
- generation: greedy GSM8K-style answers (`eval.generation.generate`), `--max_new_tokens` tokens;
- log-likelihood: MMLU-style " A".." D" scoring of 5-shot-length contexts (`eval.generation.loglikelihood`); one at
  a time means one request per call, so the batched figure also includes the four answers sharing one forward pass.
Prints the median wall time of each and the speed-up ratio (target >= 4x on 2 CPU cores). The model is the demo base
model when it has been built (`python scripts/prepare_demo.py`), else a randomly initialised tiny Llama with a
character tokenizer (`eval.testing`); the greedy outputs of both modes are checked to be identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
from eval.generation import generate, loglikelihood  # noqa: E402
from eval.testing import build_char_tokenizer, build_tiny_model  # noqa: E402
from recipes.common.errors import UserError, run_cli  # noqa: E402

QUESTIONS = [
    "Tom has {a} apples and buys {b} more. How many apples does he have now?",
    "A shop sold {a} pens in the morning and {b} in the afternoon. How many pens did it sell?",
    "Mia reads {a} pages a day for {b} days. How many pages does she read?",
    "There are {a} birds on a tree and {b} fly away. How many are left?",
]


def load(model_path: str | None):
    default = REPO_ROOT / "outputs" / "demo" / "base"
    path = Path(model_path) if model_path else default
    if (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer, str(path)
    if model_path:
        raise UserError(f"{model_path} holds no config.json (not a saved HF model): give a model dir or omit --model.")
    tokenizer = build_char_tokenizer()
    return build_tiny_model(tokenizer, hidden_size=128, num_layers=3), tokenizer, "random tiny Llama (eval.testing)"


def timed(fn, batch_size: int) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(batch_size)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="Saved causal LM directory (default: outputs/demo/base, else a random tiny one)."
    )
    parser.add_argument("--n", type=int, default=32, help="Prompts per workload.")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (2: the 2-core target). On a machine shared with other jobs use 1: oversubscribed "
        "OpenMP threads spin and slow both modes erratically.",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tokenizer, name = load(args.model)
    prompts = [
        f"Question: {QUESTIONS[i % len(QUESTIONS)].format(a=3 + i % 17, b=2 + (i * 7) % 13)}\nAnswer:"
        for i in range(args.n)
    ]
    context = "".join(f"{p} {i}\n\n" for i, p in enumerate(prompts[:5]))  # a 5-shot-length context
    requests = [(context + p, f" {letter}") for p in prompts for letter in "ABCD"]

    def gen(batch_size: int):
        return generate(
            model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=batch_size, progress=False
        )

    def ll(batch_size: int):
        if batch_size == 1:  # one request per call: no batching and no sharing of a context's forward pass
            return [loglikelihood(model, tokenizer, [r], batch_size=1, progress=False)[0] for r in requests]
        return loglikelihood(model, tokenizer, requests, batch_size=batch_size, progress=False)

    print(f"model: {name}; {args.n} prompts, batch size {args.batch_size}, torch threads {torch.get_num_threads()}")
    for label, fn in (("generation", gen), ("log-likelihood", ll)):
        fn(args.batch_size), fn(1)  # warm-up: allocator, kernels
        batched_times, single_times = [], []
        for _ in range(args.repeats):
            t_batched, batched = timed(fn, args.batch_size)
            t_single, single = timed(fn, 1)
            batched_times.append(t_batched)
            single_times.append(t_single)
        if label == "generation":
            same = [b[0].text for b in batched] == [s[0].text for s in single]
        else:
            same = max(abs(a - b) for a, b in zip(batched, single)) < 1e-3
        t_b, t_s = statistics.median(batched_times), statistics.median(single_times)
        print(
            f"{label:15s} batched {t_b:7.2f}s | one at a time {t_s:7.2f}s | speed-up {t_s / t_b:5.1f}x "
            f"(target >= 4x) | same results: {same}"
        )


if __name__ == "__main__":
    run_cli(main)  # a user error prints `error: <message>` and exits 2, without a traceback
