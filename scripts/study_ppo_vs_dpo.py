"""The PPO-vs-DPO study: one SFT model, one preference set, one prompt set; DPO, PPO (and GRPO, rejection sampling)
trained with matched budgets over several seeds, every final model evaluated the same way, one report.

    python scripts/study_ppo_vs_dpo.py                                    # embedded default (CPU), 2 seeds
    python scripts/study_ppo_vs_dpo.py --seeds 0 --methods dpo ppo        # smaller
    python scripts/study_ppo_vs_dpo.py --study scripts/studies/llama31_8b.yaml   # real models on GPUs

Each run is a normal recipe launch (`accelerate launch recipes/<method>/train.py --config ...`) with the study's
overrides, W&B group `<study name>` and tags `study:<name>`, `method:<m>`, `seed:<s>`; each final model is then
evaluated by `python -m eval` on the same data with the same settings (GSM8K, MMLU, length, diversity, reward, KL to
the SFT policy). Finished runs are reused, so an interrupted study resumes where it stopped.
Writes `<output_dir>/report.md` (mean and spread per method, deltas to SFT, which published effects it reproduces),
`results.json`, and the curves via `scripts/compare_runs.py` logic.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from recipes.common.errors import run_cli  # noqa: E402
from recipes.common.runs import CompareError, compare_runs, load_local_runs  # noqa: E402

DEFAULT_STUDY = REPO_ROOT / "scripts" / "studies" / "demo.yaml"
# Headline metrics of the report: (label, key in the eval JSON, higher is "more").
HEADLINES = [
    ("GSM8K accuracy", "eval/gsm8k/exact_match_flexible"),
    ("GSM8K strict", "eval/gsm8k/exact_match_strict"),
    ("MMLU accuracy", "eval/mmlu/accuracy"),
    ("mean length (tokens)", "eval/length/mean_tokens"),
    ("distinct-n (mean, across prompts)", "eval/diversity/distinct_mean"),
    ("distinct-n (mean, samples of one prompt)", "eval/diversity/per_input_distinct_mean"),
    ("embedding diversity (samples of one prompt)", "eval/diversity/per_input_embedding_diversity"),
    ("reward (mean)", "eval/reward/mean"),
    ("KL to SFT", "eval/reward/kl"),
]
REFERENCE_ONLY = ("eval/reward/kl",)  # measured against the SFT policy: not a property of the SFT model itself


CHILD_ENV: dict[str, str] = {}  # what every training and evaluation subprocess sees (set in main)


def log(message: str) -> None:
    sys.stdout.write(f"[study] {message}\n")  # one write: lines from the two lanes never interleave
    sys.stdout.flush()


def run(cmd: list[str], log_file: Path) -> None:
    """Run one step with its output in a log file; on failure, show the end of the log and stop."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as out:
        result = subprocess.run(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=CHILD_ENV)
    if result.returncode != 0:
        tail = log_file.read_text().splitlines()[-40:]
        raise SystemExit(
            f"[study] step failed ({' '.join(cmd[:6])} ...); last lines of {log_file}:\n" + "\n".join(tail)
        )


def train(study: dict, method: str, seed: int, output_dir: Path) -> float:
    """Launch the method's recipe with the study's overrides; returns its wall seconds (as recorded, when reused)."""
    seconds_file = output_dir.parent / "logs" / f"{output_dir.name}.train_seconds"
    if (output_dir / "run_complete.json").is_file():
        log(f"{method} seed {seed}: already trained ({output_dir})")
        return float(seconds_file.read_text()) if seconds_file.is_file() else float("nan")
    spec = study["methods"][method]
    overrides = {**study.get("common_overrides", {}), **spec.get("overrides", {})}
    overrides.update(
        model_name_or_path=study["sft"], output_dir=str(output_dir), seed=seed, run_name=f"{study['name']}-{method}-s{seed}",
        wandb_group=study["name"], parent_run=study["sft"],
    )  # fmt: skip
    cmd = ["accelerate", "launch", "recipes/" + method + "/train.py", "--config", spec["config"]]
    for key, value in overrides.items():
        cmd += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}", str(value)]
    cmd += ["--wandb_tags", f"study:{study['name']}"]
    log(f"{method} seed {seed}: training -> {output_dir}")
    start = time.time()
    run(cmd, output_dir.parent / "logs" / f"{output_dir.name}.train.log")
    seconds = time.time() - start
    seconds_file.write_text(f"{seconds:.1f}\n")
    return seconds


def evaluate(study: dict, model_dir: str, output_file: Path, seed: int) -> dict[str, float]:
    """The same standalone evaluation for every model (and the SFT baseline); an earlier result is reused only when
    it was made with the same settings."""
    settings = study["eval"]
    if output_file.is_file() and stale_settings(json.loads(output_file.read_text()), settings, seed):
        log(f"{output_file} was made with other evaluation settings: evaluating again")
        output_file.unlink()
    if not output_file.is_file():
        cmd = [sys.executable, "-m", "eval", "--model", model_dir, "--tasks", settings["tasks"], "--seed", str(seed),
               "--output", str(output_file), "--no_progress"]  # fmt: skip
        if study.get("load_in_4bit", True):
            cmd.append("--load_in_4bit")
        for flag in ("gsm8k", "gsm8k_chat", "mmlu", "limit", "max_new_tokens", "samples_per_prompt", "batch_size",
                     "prompts"):  # fmt: skip
            value = settings.get(flag)
            if value is not None:
                cmd += [f"--{flag}", str(value).lower() if isinstance(value, bool) else str(value)]
        for reward_model in settings.get("reward_models", []):
            cmd += ["--reward_model", reward_model]
        if model_dir != study["sft"] and "reward" in settings["tasks"]:
            cmd += ["--ref_model", study["sft"]]  # KL to the policy every method started from
        log(f"evaluating {model_dir}")
        run(cmd, output_file.with_suffix(".log"))
    payload = json.loads(output_file.read_text())
    return flatten(payload)


def stale_settings(payload: dict[str, Any], settings: dict[str, Any], seed: int) -> bool:
    recorded = payload.get("config", {})
    wanted = {key: value for key, value in settings.items() if key not in ("reward_models", "batch_size")}
    wanted["seed"] = seed
    return any(str(recorded.get(key)).lower() != str(value).lower() for key, value in wanted.items())


def flatten(payload: dict[str, Any]) -> dict[str, float]:
    from eval import flatten_metrics

    results = payload.get("results", payload)
    return flatten_metrics(results)


def summarize(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def effects(table: dict[str, dict[str, list[float]]], baseline: dict[str, float]) -> list[str]:
    """State plainly which published effects the figures reproduce."""
    lines = []

    def mean(method: str, key: str) -> tuple[float, float] | None:
        values = table.get(method, {}).get(key)
        return summarize(values) if values else None

    gsm = "eval/gsm8k/exact_match_flexible"
    ppo, dpo = mean("ppo", gsm), mean("dpo", gsm)
    if ppo and dpo:
        gap = ppo[0] - dpo[0]
        verdict = "reproduced" if gap >= 0 else "not reproduced"
        n = baseline.get("eval/gsm8k/n", 0)
        # Two-sided 95% band of a difference of two accuracies on n problems each (binomial sampling noise).
        band = 1.96 * ((ppo[0] * (1 - ppo[0]) + dpo[0] * (1 - dpo[0])) / n) ** 0.5 if n else 0.0
        noise = ""
        if abs(gap) <= max(ppo[1], dpo[1]) or abs(gap) <= band:
            verdict = "inconclusive"
            noise = f" (within noise: seed spread {max(ppo[1], dpo[1]):.3f}, sampling ±{band:.3f} on {n:.0f} problems)"
        lines.append(
            f"- PPO >= DPO on math (Ivison et al. 2024: PPO 58.0 vs DPO 50.5 GSM8K, Tulu 2.5 13B): **{verdict}** — "
            f"PPO {ppo[0]:.3f} ± {ppo[1]:.3f} vs DPO {dpo[0]:.3f} ± {dpo[1]:.3f}, gap {gap:+.3f}{noise}."
        )
    for key, name, paper, sign in (
        ("eval/length/mean_tokens", "Longer responses after RLHF", "Singhal et al. 2023: ~100 -> 230 tokens", 1),
        ("eval/diversity/per_input_distinct_mean", "Lower diversity after RLHF", "Kirk et al. 2024", -1),
    ):
        if key not in baseline:
            lines.append(f"- {name} ({paper}): not measured (no `{key}`).")
            continue
        parts, agree = [], 0
        for method in table:
            stats = mean(method, key)
            if stats:
                delta = stats[0] - baseline[key]
                agree += int(delta * sign > 0)
                parts.append(f"{method} {stats[0]:.3g} ({delta:+.3g})")
        verdict = f"reproduced by {agree} of {len(parts)} methods"
        lines.append(f"- {name} ({paper}): **{verdict}** — SFT {baseline[key]:.3g}; " + ", ".join(parts) + ".")
    mmlu = "eval/mmlu/accuracy"
    if mmlu in baseline:
        parts = [f"{m} {s[0]:.3f} ({s[0] - baseline[mmlu]:+.3f})" for m in table if (s := mean(m, mmlu))]
        worst = max((abs(mean(m, mmlu)[0] - baseline[mmlu]) for m in table if mean(m, mmlu)), default=0.0)
        verdict = "reproduced" if worst <= 0.05 else f"not reproduced (largest change {worst:.3f})"
        lines.append(
            f"- MMLU roughly unchanged by RLHF (GPT-4 report, Llama 2): **{verdict}** (threshold ±0.05) — "
            f"SFT {baseline[mmlu]:.3f}; " + ", ".join(parts) + "."
        )
    return lines


def write_report(study: dict, out: Path, table: dict, baseline: dict, seconds: dict, seeds: list[int]) -> Path:
    rows = ["| metric | SFT | " + " | ".join(table) + " |", "|---|---|" + "---|" * len(table)]
    for label, key in HEADLINES:
        if key not in baseline and not any(key in v for v in table.values()):
            continue
        cells = ["(reference)" if key in REFERENCE_ONLY else f"{baseline[key]:.4g}" if key in baseline else "—"]
        for method in table:
            values = table[method].get(key)
            if not values:
                cells.append("—")
                continue
            mean, spread = summarize(values)
            figure = f"{mean:.4g} ± {spread:.2g}" if len(values) > 1 else f"{mean:.4g}"
            delta = f" ({mean - baseline[key]:+.3g})" if key in baseline and key not in REFERENCE_ONLY else ""
            cells.append(figure + delta)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    rows.append(
        "| train time (s, mean) | — | " + " | ".join(f"{statistics.mean(seconds[m]):.0f}" for m in table) + " |"
    )
    text = [
        f"# Study: {study['name']}",
        "",
        f"One SFT model (`{study['sft']}`), methods {', '.join(table)}, seeds {seeds}; every final model evaluated "
        f"with the same settings ({study['eval']['tasks']}). Mean ± standard deviation over seeds (when more than one), (delta to SFT).",
        "Budgets per method: "
        + "; ".join(
            f"{m}: {study['methods'][m].get('budget', study['methods'][m].get('overrides', {}))}" for m in table
        )
        + ".",
        "",
        *rows,
        "",
        "## Published effects",
        "",
        *effects(table, baseline),
        "",
        "A verdict counts the sign of each change, however small: read it with the figures (one seed and a few hundred "
        "prompts move accuracy by several points and length by a token or two).",
        "",
        "Curves and per-run tables: [comparison/report.md](comparison/report.md).",
    ]
    path = out / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="study YAML (methods, budgets, eval)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the study's seeds")
    parser.add_argument("--methods", nargs="+", help="subset of the study's methods")
    parser.add_argument("--output_dir", type=Path, help="override the study's output_dir")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained/evaluated side by side (CPU: 2 on 2 cores)")
    args = parser.parse_args(argv)

    if args.jobs < 1:
        raise SystemExit(f"[study] --jobs {args.jobs}: give 1 or more (2 on a 2-core CPU runs two runs side by side).")
    if not args.study.is_file():
        raise SystemExit(
            f"[study] no study file {args.study}; shipped ones: {sorted(p.name for p in DEFAULT_STUDY.parent.glob('*.yaml'))}."
        )
    study = yaml.safe_load(args.study.read_text())
    seeds = args.seeds or study["seeds"]
    methods = args.methods or list(study["methods"])
    unknown = [m for m in methods if m not in study["methods"]]
    if unknown:
        raise SystemExit(f"[study] unknown method(s) {unknown}; {args.study} defines {list(study['methods'])}.")
    if not (Path(study["sft"]) / "run_complete.json").is_file():
        raise SystemExit(
            f"[study] no finished SFT run at {study['sft']}: run the SFT recipe first (bash scripts/demo.sh)."
        )
    out = args.output_dir or Path(study["output_dir"])
    out.mkdir(parents=True, exist_ok=True)

    CHILD_ENV.clear()
    CHILD_ENV.update(os.environ)
    CHILD_ENV.setdefault("WANDB_RUN_GROUP", study["name"])
    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        # A tiny model gains little from a second thread; two runs side by side use the cores better.
        CHILD_ENV["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))

    def train_and_evaluate(method: str, seed: int) -> tuple[float, dict[str, float]]:
        run_dir = out / f"{method}-seed{seed}"
        seconds = train(study, method, seed, run_dir)
        return seconds, evaluate(study, str(run_dir), out / f"{method}-seed{seed}.eval.json", seed=seed)

    runs = [(method, seed) for method in methods for seed in seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each job is a subprocess; threads only wait
        # Longest first (the study lists them so), the short SFT evaluation last: the two lanes end together.
        jobs = [pool.submit(train_and_evaluate, method, seed) for method, seed in runs]
        baseline_job = pool.submit(evaluate, study, study["sft"], out / "sft.eval.json", seeds[0])
        baseline = baseline_job.result()
        results = [job.result() for job in jobs]
    table: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, list[float]] = {}
    for (method, _), (train_seconds, metrics) in zip(runs, results):
        seconds.setdefault(method, []).append(train_seconds)
        for key, value in metrics.items():
            table.setdefault(method, {}).setdefault(key, []).append(value)
    run_dirs = [Path(study["sft"])] + [out / f"{method}-seed{seed}" for method, seed in runs]
    (out / "results.json").write_text(
        json.dumps({"baseline": baseline, "methods": table, "seconds": seconds}, indent=2)
    )
    report = write_report(study, out, table, baseline, seconds, seeds)
    try:  # curves from the W&B runs the recipes logged
        compare_runs(load_local_runs(run_dirs), out / "comparison", baseline=None)
    except CompareError as err:
        log(f"curves not drawn: {err}")
    log(f"report: {report}")
    print(report.read_text())
    return report


if __name__ == "__main__":
    run_cli(main)
