#!/usr/bin/env python
"""Best-of-N as an inference-time baseline, for the reward-overoptimization plot (Gao et al. 2022).

    python scripts/best_of_n.py [--policy outputs/demo/sft] [--prompts outputs/demo/data/prompts] [--split test]
        [--prompt_tasks math] [--num_prompts 64] [--max_n 64] [--proxy gsm8k | reward_model | combined]
        [--proxy_model PATH] [--proxy_safety_model PATH] [--gold gsm8k | reward_model | none] [--gold_model PATH]
        [--output_dir outputs/demo/best_of_n] [--report_to wandb]

Samples `max_n` responses per prompt once from the policy at temperature 1 (the KL formula assumes samples from the
policy itself), scores each with the proxy reward (what best-of-N selects on) and, when given, a gold reward, and
reports for N = 1, 2, 4, ..., max_n:

- `proxy`: expected proxy reward of the best of N (unbiased estimate from the max_n samples),
- `gold`: expected gold reward of that proxy-best sample (the over-optimization curve),
- `kl_bon` = log N - (N - 1) / N, the KL of best-of-N to the policy, and `sqrt_kl`, Gao et al.'s x axis.

Scorers are the rejection-sampling recipe's (`gsm8k` = the evaluation suite's grader). Writes `best_of_n.json`,
`samples.jsonl` and `best_of_n.png` to `--output_dir`; with `--report_to wandb`, also a W&B run with the table and
plots.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from recipes.common.config import QLoRAModelConfig  # noqa: E402
from recipes.common.errors import run_cli  # noqa: E402
from recipes.common.files import write_json_atomic, write_jsonl_atomic  # noqa: E402
from recipes.common.policy import load_policy_tokenizer  # noqa: E402
from recipes.rejection_sampling.prompts import build_scorer, load_prompts  # noqa: E402
from recipes.rejection_sampling.sampling import hf_sampler, load_generation_model  # noqa: E402
from recipes.rejection_sampling.selection import check_scores, expected_best_of_n, kl_best_of_n  # noqa: E402

SCORERS = ("gsm8k", "reward_model", "combined")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="outputs/demo/sft", help="SFT (or any) adapter dir, or a full model.")
    parser.add_argument("--prompts", default="outputs/demo/data/prompts", help="Prompts dir or file (`prompt` column).")
    parser.add_argument("--split", default="test")
    parser.add_argument("--prompt_tasks", nargs="*", default=["math"], help="Keep prompts of these `task`s only.")
    parser.add_argument("--num_prompts", type=int, default=64)
    parser.add_argument("--max_n", type=int, default=64, help="Samples per prompt; N runs over powers of 2 up to it.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=4, help="Prompts per generate call (x max_n sequences).")
    parser.add_argument("--proxy", choices=SCORERS, default="gsm8k")
    parser.add_argument("--proxy_model", default=None, help="Reward model dir for --proxy reward_model/combined.")
    parser.add_argument("--proxy_safety_model", default=None, help="Safety RM dir for --proxy combined.")
    parser.add_argument("--gold", choices=(*SCORERS, "none"), default="none")
    parser.add_argument("--gold_model", default=None, help="Reward model dir for --gold reward_model.")
    parser.add_argument("--grader_mode", choices=("flexible", "strict"), default="flexible")
    parser.add_argument("--load_in_4bit", type=lambda v: v.lower() == "true", default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/demo/best_of_n")
    parser.add_argument("--report_to", default="none", choices=("none", "wandb"))
    parser.add_argument("--wandb_project", default="post-training-recipes")
    args = parser.parse_args(argv)
    if args.max_n < 1 or args.num_prompts < 1:
        parser.error(f"--max_n and --num_prompts must be >= 1 (got {args.max_n}, {args.num_prompts}).")
    for role, kind, model in (("proxy", args.proxy, args.proxy_model), ("gold", args.gold, args.gold_model)):
        if kind in ("reward_model", "combined") and not model:
            parser.error(f"--{role} {kind} needs --{role}_model PATH (a reward-model output dir).")
    if args.proxy == "combined" and not args.proxy_safety_model:
        parser.error("--proxy combined needs --proxy_safety_model PATH as well.")
    if args.gold == "combined":
        parser.error("--gold combined is not supported; use a single gold reward model or the GSM8K grader.")
    return args


def scorer_settings(kind: str, model: str | None, safety: str | None, grader_mode: str) -> SimpleNamespace:
    return SimpleNamespace(
        scorer=kind, reward_model_path=model, safety_reward_model_path=safety, grader_mode=grader_mode
    )


def powers_of_two(limit: int) -> list[int]:
    ns = [2**i for i in range(int(math.log2(limit)) + 1)]
    return ns if ns[-1] == limit else [*ns, limit]


def plot(results: list[dict], path: Path, proxy: str, gold: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["sqrt_kl"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["proxy"] for r in results], "o-", label=f"proxy ({proxy})")
    if gold != "none":
        ax.plot(x, [r["gold"] for r in results], "s-", label=f"gold ({gold})")
    for r in results:
        ax.annotate(f"N={r['n']}", (r["sqrt_kl"], r["proxy"]), textcoords="offset points", xytext=(3, 4), fontsize=7)
    ax.set_xlabel("sqrt(KL_bon), KL_bon = log N - (N-1)/N  [nats]")
    ax.set_ylabel("expected reward of the best of N")
    ax.set_title("Best-of-N: proxy vs gold reward" if gold != "none" else "Best-of-N: proxy reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    started = time.perf_counter()
    model_args = QLoRAModelConfig(model_name_or_path=args.policy, load_in_4bit=args.load_in_4bit, dtype="float32")
    tokenizer = load_policy_tokenizer(model_args)
    proxy_settings = scorer_settings(args.proxy, args.proxy_model, args.proxy_safety_model, args.grader_mode)
    gold_settings = scorer_settings(args.gold, args.gold_model, None, args.grader_mode)
    data = SimpleNamespace(dataset_name=args.prompts, dataset_config=None)
    needs_answer = "gsm8k" in (args.proxy, args.gold)
    filters = SimpleNamespace(prompt_tasks=args.prompt_tasks, scorer="gsm8k" if needs_answer else args.proxy)
    prompts = load_prompts(data, filters, args.split, args.num_prompts, tokenizer, args.seed)
    proxy_fn = build_scorer(proxy_settings)
    gold_fn = build_scorer(gold_settings) if args.gold != "none" else None

    model = load_generation_model(model_args, args.policy)
    sampler = hf_sampler(model, tokenizer, args.max_new_tokens, args.batch_size, top_p=1.0)
    groups = sampler([p["text"] for p in prompts], args.max_n, 1.0, args.seed)
    flat = [(p, s) for p, group in zip(prompts, groups) for s in group]
    rows, texts = [p for p, _ in flat], [s["completion"] for _, s in flat]
    proxy = check_scores(proxy_fn(rows, texts), len(flat), "best-of-N samples", args.proxy)
    gold = check_scores(gold_fn(rows, texts), len(flat), "best-of-N samples", args.gold) if gold_fn else None

    results = []
    k = args.max_n
    for n in powers_of_two(args.max_n):
        proxy_values = [expected_best_of_n(proxy[i * k : (i + 1) * k], n) for i in range(len(prompts))]
        row = {"n": n, "kl_bon": kl_best_of_n(n), "sqrt_kl": math.sqrt(kl_best_of_n(n))}
        row["proxy"] = sum(proxy_values) / len(proxy_values)
        if gold is not None:
            gold_values = [
                expected_best_of_n(proxy[i * k : (i + 1) * k], n, gold[i * k : (i + 1) * k])
                for i in range(len(prompts))
            ]
            row["gold"] = sum(gold_values) / len(gold_values)
        results.append(row)

    out = Path(args.output_dir)
    samples = [
        {"prompt_id": p["prompt_id"], "prompt": p["user"], "completion": s["completion"], "proxy": proxy[i]}
        | ({"gold": gold[i]} if gold is not None else {})
        for i, (p, s) in enumerate(flat)
    ]
    write_jsonl_atomic(out / "samples.jsonl", samples)
    summary = {"settings": vars(args), "results": results, "seconds": time.perf_counter() - started}
    write_json_atomic(out / "best_of_n.json", summary)
    plot(results, out / "best_of_n.png", args.proxy, args.gold)

    header = f"{'N':>4} {'KL_bon':>7} {'proxy':>8}" + (f" {'gold':>8}" if gold is not None else "")
    print(f"best-of-N on {len(prompts)} prompts x {args.max_n} samples from {args.policy} (proxy {args.proxy})")
    print(header)
    for r in results:
        print(f"{r['n']:>4} {r['kl_bon']:>7.3f} {r['proxy']:>8.4f}" + (f" {r['gold']:>8.4f}" if "gold" in r else ""))
    print(f"written to {out}/ (best_of_n.json, samples.jsonl, best_of_n.png)")

    if args.report_to == "wandb":
        from recipes.common.tracking import init_wandb, run_location

        run = init_wandb(
            "wandb", project=args.wandb_project, run_name=f"best-of-n-{Path(args.policy).name}", stage="best_of_n",
            method=f"best_of_n-{args.proxy}", seed=args.seed, config={"best_of_n": vars(args)},
        )  # fmt: skip
        import wandb

        table = wandb.Table(columns=list(results[0]), data=[list(r.values()) for r in results])
        logged = {"best_of_n/table": table, "best_of_n/proxy": wandb.plot.line(table, "sqrt_kl", "proxy")}
        if gold is not None:
            logged["best_of_n/gold"] = wandb.plot.line(table, "sqrt_kl", "gold")
        logged["best_of_n/plot"] = wandb.Image(str(out / "best_of_n.png"))
        run.log(logged)
        print(f"W&B run: {run_location(run)}")
        run.finish()
    return results


if __name__ == "__main__":
    run_cli(main)
