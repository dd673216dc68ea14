#!/usr/bin/env python
"""Llama 2's margin ablation (Table 28): train the reward model with no, small and large margins on the same data and
seeds, and print accuracy per rating bucket.

    python scripts/reward_margin_ablation.py [--config recipes/reward/config.yaml] [--output_dir outputs/ablation/margin]
        [--seeds 0 1 2] [--margin_sets none small large] [-- --max_steps 60 ...extra recipe overrides]

Each run is `recipes/reward/train.py` with `--margin_set <set> --seed <seed>` into `<output_dir>/<set>-seed<seed>`; a
finished run there is reused, not retrained. Results: the table on stdout (mean over seeds), and
`<output_dir>/ablation.json` (per run and averaged). W&B runs share the group `margin-ablation`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `recipes` and `eval`

from eval.reward_model import format_table, save_json  # noqa: E402
from recipes.common.errors import run_cli  # noqa: E402
from recipes.common.outputs import FINISHED_MARKER  # noqa: E402
from recipes.common.reward import RATINGS  # noqa: E402

LLAMA2_TABLE_28 = (
    "Llama 2 (Table 28, helpfulness RM, Meta Helpful test set; avg over test sets: 62.5 / 63.0 / 62.9): the margin "
    "helps on the clearly separable pairs (significantly better, better), the large margin hurts the nearly tied."
)


def run_one(config: str, output_dir: Path, margin_set: str, seed: int, extra: list[str]) -> dict:
    """One reward-recipe run (or the finished one already in `output_dir`); returns its final RM evaluation."""
    result_file = output_dir / "rm_eval.json"
    if not ((output_dir / FINISHED_MARKER).is_file() and result_file.is_file()):
        from recipes.reward.train import main

        started = time.perf_counter()
        main(
            [
                "--config", config, "--output_dir", str(output_dir), "--margin_set", margin_set, "--seed", str(seed),
                "--run_name", f"reward-margin-{margin_set}-seed{seed}", "--wandb_group", "margin-ablation",
                "--overwrite_output_dir", "true", *extra,
            ]
        )  # fmt: skip
        print(f"[ablation] margin {margin_set}, seed {seed}: {time.perf_counter() - started:.0f}s", flush=True)
    else:
        print(f"[ablation] margin {margin_set}, seed {seed}: reusing {output_dir}", flush=True)
    return json.loads(result_file.read_text())["final"]


def average(results: list[dict]) -> dict:
    """Mean accuracy and gap over seeds, overall and per bucket (a result shaped like one run's)."""
    mean = {
        "n": results[0]["n"],
        "accuracy": sum(r["accuracy"] for r in results) / len(results),
        "mean_gap": sum(r["mean_gap"] for r in results) / len(results),
        "ece": sum(r["calibration"]["ece"] for r in results) / len(results),
        "seeds": len(results),
    }
    buckets = {}
    for rating in RATINGS:
        present = [r["buckets"][rating] for r in results if rating in r.get("buckets", {})]
        if present:
            buckets[rating] = {
                "n": present[0]["n"],
                "accuracy": sum(b["accuracy"] for b in present) / len(present),
                "mean_gap": sum(b["mean_gap"] for b in present) / len(present),
            }
    mean["buckets"] = buckets
    return mean


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="recipes/reward/config.yaml")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/ablation/margin"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--margin_sets", nargs="+", default=["none", "small", "large"])
    args = parser.parse_args(argv)

    runs: dict[str, list[dict]] = {}
    for margin_set in args.margin_sets:
        for seed in args.seeds:
            out = args.output_dir / f"{margin_set}-seed{seed}"
            runs.setdefault(margin_set, []).append(run_one(args.config, out, margin_set, seed, extra))
    averaged = {f"margin {name}": average(results) for name, results in runs.items()}

    seeds = ", ".join(map(str, args.seeds))
    print(f"\nReward-model accuracy (%) per rating bucket, mean over seeds {seeds} ({args.config}):\n")
    print(format_table(averaged))
    print("\nMean reward gap per bucket and calibration (ECE of sigmoid(gap)):")
    for name, result in averaged.items():
        gaps = ", ".join(f"{r} {b['mean_gap']:.2f}" for r, b in result["buckets"].items())
        print(f"  {name}: {gaps}; ECE {result['ece']:.3f}")
    print(f"\n{LLAMA2_TABLE_28}")
    payload = {"config": args.config, "seeds": args.seeds, "extra_args": extra, "runs": runs, "mean": averaged}
    path = save_json(payload, args.output_dir / "ablation.json")
    print(f"\nsaved {path}")
    return payload


if __name__ == "__main__":
    run_cli(main)
