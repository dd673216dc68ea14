#!/usr/bin/env python
"""AI feedback end to end on the embedded demo: Constitutional AI's revisions -> SFT, RLAIF's labels -> reward models,
scored against the demo's human labels.

    python scripts/ai_feedback_pipeline.py [--demo_dir outputs/aif/demo] [--output_dir outputs/aif/pipeline]
        [--num_pairs 512] [--judge_rm_pairs 512] [--rm_steps 64] [--critique_prompts 64]

Stages (each a recipe launched as a user would, skipped when its output dir holds a finished run):

1. `prepare`: the demo (`scripts/prepare_demo.py`, kept when built) and its SFT policy (`recipes/sft`);
2. `critique_revise`: `recipes/ai_feedback` (mode critique_revise) on the demo prompts, then `recipes/sft` on the
   revisions (a short run: the data feeds the SFT recipe unchanged);
3. the human-labelled helpfulness pairs of the demo (`data/preferences/train.jsonl`, 4 rating levels) are split, seeded,
   into part A (`--judge_rm_pairs`, trains the reward-model judge) and part B (`--num_pairs`, the pairs to label);
4. `judge-lm`: `recipes/ai_feedback` (mode judge, responses dataset) relabels part B with the SFT policy as the causal-LM
   judge (label log-probabilities, both orders); `judge-rm`: a reward model trained on part A's human labels
   (`recipes/reward`) relabels part B as the judge's stand-in (disjoint from what it was trained on);
5. `rm-human`, `rm-ai-lm`, `rm-ai-rm`: `recipes/reward` on part B with the human, the LM judge's and the RM judge's
   labels (same pairs, same settings), each evaluated on the demo's held-out human test pairs (`data/preferences/test`);
6. `report.md`: the judges' agreement with the human labels on part B (RLAIF's AI-labeler alignment), overall and per
   human rating, and the three reward models' test accuracy per rating bucket.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from eval.reward_model import RATING_LABELS, RATINGS  # noqa: E402
from recipes.common.errors import UserError, run_cli  # noqa: E402
from recipes.common.files import read_jsonl, write_jsonl_atomic  # noqa: E402
from recipes.common.outputs import FINISHED_MARKER  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo_dir", default="outputs/aif/demo", help="Demo dir (built there when missing).")
    parser.add_argument("--output_dir", default="outputs/aif/pipeline")
    parser.add_argument("--num_pairs", type=int, default=512, help="Human pairs relabelled by the judges (part B).")
    parser.add_argument("--judge_rm_pairs", type=int, default=512, help="Human pairs the RM judge trains on (part A).")
    parser.add_argument("--rm_steps", type=int, default=64, help="Steps of each reward model (batch 16).")
    parser.add_argument("--critique_prompts", type=int, default=64)
    parser.add_argument("--sft_steps", type=int, default=120, help="Steps of the SFT policy (the demo's 120).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.num_pairs, args.judge_rm_pairs, args.rm_steps, args.critique_prompts, args.sft_steps) < 1:
        raise UserError("--num_pairs, --judge_rm_pairs, --rm_steps, --critique_prompts and --sft_steps must be >= 1.")
    return args


def run_stage(name: str, command: list[str], done_dir: Path | None, log_dir: Path, times: dict[str, float]) -> None:
    """Run one stage, its output in `<log_dir>/<name>.log`; skipped when `done_dir` holds a finished run."""
    if done_dir is not None and (done_dir / FINISHED_MARKER).is_file():
        print(f"[aif] {name}: done before ({done_dir})", flush=True)
        return
    log = log_dir / f"{name}.log"
    print(f"[aif] {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT)
    times[name] = round(time.perf_counter() - started, 1)
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise UserError(f"stage {name} failed (exit {result.returncode}); its log {log} ends:\n{tail}")
    print(f"[aif] {name}: {times[name]} s", flush=True)


def recipe(path: str, config: str, **overrides: object) -> list[str]:
    command = [sys.executable, str(REPO_ROOT / path), "--config", str(REPO_ROOT / config)]
    for key, value in overrides.items():
        command += [f"--{key}", *(value if isinstance(value, list) else [str(value)])]
    return command


def split_human_pairs(demo: Path, out: Path, judge_rm_pairs: int, num_pairs: int, seed: int) -> tuple[Path, Path]:
    """Parts A and B of the demo's human-labelled train pairs, seeded and disjoint."""
    pairs = read_jsonl(demo / "data" / "preferences" / "train.jsonl")
    if judge_rm_pairs + num_pairs > len(pairs):
        raise UserError(f"--judge_rm_pairs + --num_pairs = {judge_rm_pairs + num_pairs} > {len(pairs)} human pairs.")
    random.Random(seed).shuffle(pairs)
    part_a, part_b = out / "human_a", out / "human_b"
    write_jsonl_atomic(part_a / "train.jsonl", pairs[:judge_rm_pairs])
    write_jsonl_atomic(part_b / "train.jsonl", pairs[judge_rm_pairs : judge_rm_pairs + num_pairs])
    return part_a, part_b


def reward_model(dataset: Path, demo: Path, output: Path, steps: int) -> list[str]:
    """The reward recipe's demo config on `dataset`'s train pairs, evaluated on the demo's human test pairs."""
    return recipe(
        "recipes/reward/train.py", "recipes/reward/config.yaml", model_name_or_path=demo / "base",
        dataset_name=dataset, eval_dataset_name=demo / "data" / "preferences", max_steps=steps, warmup_steps=4,
        eval_strategy="no", save_strategy="no", output_dir=output, run_name=output.name,
    )  # fmt: skip


def judge(dataset: Path, policy: Path, output: Path, num_pairs: int, **judge_args: object) -> list[str]:
    return recipe(
        "recipes/ai_feedback/train.py", "recipes/ai_feedback/config.yaml", mode="judge", responses="dataset",
        model_name_or_path=policy, parent_run=policy, dataset_name=dataset, max_train_samples=num_pairs,
        output_dir=output, run_name=output.name, **judge_args,
    )  # fmt: skip


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def report(out: Path, args: argparse.Namespace, times: dict[str, float]) -> Path:
    """report.md: judge agreement with the human labels, RM accuracy per rating bucket, stage times."""
    judges = {"LM judge (SFT policy, label log-probs, both orders)": out / "ai_labels_lm",
              "RM judge (reward model trained on part A's human labels)": out / "ai_labels_rm"}  # fmt: skip
    lines = [
        "# AI feedback on the demo: judge agreement and reward models from AI labels",
        "",
        f"Part B: {args.num_pairs} human-labelled helpfulness pairs of the demo, relabelled by each judge; the RM judge "
        f"trained on {args.judge_rm_pairs} other human pairs (part A). Seed {args.seed}.",
        "",
        "## Judge agreement with the human labels (part B)",
        "",
        "| judge | agreement | " + " | ".join(RATING_LABELS[r] for r in RATINGS) + " | ties | order-consistent | "
        "first position wins | AI ratings (sig/better/slight/negl) |",
        "|---|---|" + "---|" * len(RATINGS) + "---|---|---|---|",
    ]
    for name, path in judges.items():
        s = json.loads((path / "ai_feedback.json").read_text())
        per = s.get("agreement_by_reference_rating", {})
        cells = [f"{fmt(per[r]['agreement'])} (n={per[r]['n']})" if r in per else "—" for r in RATINGS]
        ratings = "/".join(str(s["ratings"][r]) for r in RATINGS)
        lines.append(
            f"| {name} | **{fmt(s['agreement'])}** | {' | '.join(cells)} | {s['ties']} | {fmt(s['order_consistent'])} "
            f"| {fmt(s['first_position_rate'])} | {ratings} |"
        )
    lines += [
        "",
        "## Reward models on the same part-B pairs, accuracy on the demo's held-out human test pairs",
        "",
        "| labels | test accuracy | " + " | ".join(RATING_LABELS[r] for r in RATINGS) + " |",
        "|---|---|" + "---|" * len(RATINGS),
    ]
    for name, path in (("human", "rm_human"), ("AI: LM judge", "rm_ai_lm"), ("AI: RM judge", "rm_ai_rm")):
        final = json.loads((out / path / "rm_eval.json").read_text())["final"]
        buckets = final.get("buckets", {})
        cells = [fmt(buckets[r]["accuracy"]) if r in buckets else "—" for r in RATINGS]
        lines.append(
            f"| {name} (`{out / path}`) | **{fmt(final['accuracy'])}** (n={final['n']}) | {' | '.join(cells)} |"
        )
    revisions = json.loads((out / "revisions" / "ai_feedback.json").read_text())
    lines += [
        "",
        f"Critique and revise: {revisions['rows']} revisions ({revisions['skipped']} skipped, empty) from "
        f"{args.critique_prompts} prompts, principles {revisions['principles']}; SFT on them: `{out / 'sft_revisions'}`.",
        "",
        "## Stage times (s, this launch; stages done before are not timed)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name} | {seconds} |" for name, seconds in times.items()],
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    demo, out = Path(args.demo_dir), Path(args.output_dir)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    started = time.perf_counter()

    run_stage("prepare-demo", [sys.executable, str(REPO_ROOT / "scripts/prepare_demo.py"), "--output_dir", str(demo)],
              None, logs, times)  # fmt: skip
    sft = out / "sft"
    run_stage("sft", recipe(
        "recipes/sft/train.py", "recipes/sft/config.yaml", model_name_or_path=demo / "base",
        dataset_name=demo / "data" / "sft", eval_gsm8k_path=demo / "data" / "math" / "test.jsonl",
        max_steps=args.sft_steps, eval_strategy="no", output_dir=sft, run_name="aif-sft",
    ), sft, logs, times)  # fmt: skip

    # Constitutional AI: the SFT policy revises its own responses; SFT (from the base, as the SFT recipe starts) on them.
    revisions = out / "revisions"
    run_stage("critique_revise", recipe(
        "recipes/ai_feedback/train.py", "recipes/ai_feedback/config.yaml", mode="critique_revise",
        model_name_or_path=sft, parent_run=sft, dataset_name=demo / "data" / "prompts",
        max_train_samples=args.critique_prompts, output_dir=revisions, run_name="aif-critique-revise",
    ), revisions, logs, times)  # fmt: skip
    run_stage("sft-on-revisions", recipe(
        "recipes/sft/train.py", "recipes/sft/config.yaml", model_name_or_path=demo / "base", dataset_name=revisions,
        max_steps=8, eval_strategy="no", eval_tasks="", output_dir=out / "sft_revisions", run_name="aif-sft-revisions",
    ), out / "sft_revisions", logs, times)  # fmt: skip

    # RLAIF: two judges relabel part B of the human pairs.
    part_a, part_b = split_human_pairs(demo, out, args.judge_rm_pairs, args.num_pairs, args.seed)
    run_stage("judge-lm", judge(part_b, sft, out / "ai_labels_lm", args.num_pairs), out / "ai_labels_lm", logs, times)
    run_stage("rm-judge", reward_model(part_a, demo, out / "rm_judge", args.rm_steps), out / "rm_judge", logs, times)
    run_stage("judge-rm", judge(part_b, sft, out / "ai_labels_rm", args.num_pairs, judge_type="reward_model",
                                judge_model_path=out / "rm_judge"), out / "ai_labels_rm", logs, times)  # fmt: skip

    # Reward models on the same pairs: human labels vs each judge's, evaluated on the same human test pairs.
    for name, labels in (("rm_human", part_b), ("rm_ai_lm", out / "ai_labels_lm"), ("rm_ai_rm", out / "ai_labels_rm")):
        run_stage(
            name.replace("_", "-"), reward_model(labels, demo, out / name, args.rm_steps), out / name, logs, times
        )

    times["total"] = round(time.perf_counter() - started, 1)
    path = report(out, args, times)
    print(path.read_text())
    print(f"[aif] report: {path}  (stage logs in {logs})", flush=True)
    return path


if __name__ == "__main__":
    run_cli(main)
