"""The PPO-vs-DPO study: one SFT model, one preference set, one prompt set; DPO, PPO (and GRPO, rejection sampling)
trained with matched budgets over several seeds, every final model evaluated the same way, one report.

    python scripts/study_ppo_vs_dpo.py                                    # embedded default (CPU), 2 seeds
    python scripts/study_ppo_vs_dpo.py --seeds 0 --methods dpo ppo        # smaller
    python scripts/study_ppo_vs_dpo.py --study scripts/studies/llama31_8b.yaml   # real models on GPUs

Each run is a normal recipe launch (`accelerate launch recipes/<method>/train.py --config ...`) with the study's
overrides, W&B group `<study name>` and tags `study:<name>`, `method:<m>`, `seed:<s>`; each final model is then
evaluated by `python -m eval` with the same settings on the same items (GSM8K, MMLU, length, diversity, reward, KL to
the SFT policy): the subset is chosen by `eval.data_seed` (default 0), never by the training seed, which only seeds
the sampled responses. The SFT model is evaluated once, on those items, and reused. Each evaluation also writes its
per-item results (`<run>.eval.samples.jsonl`: item, correct or not, reward, length), so every difference to SFT is
paired item by item. Finished runs are reused, so an interrupted study resumes where it stopped.
Writes `<output_dir>/report.md` (mean and seed spread per method, deltas to SFT with 95% paired-bootstrap intervals,
which published effects it reproduces by that interval), `results.json`, and the curves via `scripts/compare_runs.py`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from eval.compare import (  # noqa: E402
    Difference,
    aligned,
    equivalence_verdict,
    mean_interval,
    paired_bootstrap,
    per_item_values,
    verdict,
)
from eval.runs import CompareError, compare_runs, load_local_runs  # noqa: E402
from recipes.common.errors import UserError, run_cli  # noqa: E402
from recipes.common.files import read_jsonl  # noqa: E402
from recipes.common.outputs import FINISHED_MARKER  # noqa: E402

DEFAULT_STUDY = REPO_ROOT / "scripts" / "studies" / "demo.yaml"
STUDY_KEYS = {"name", "output_dir", "sft", "seeds", "load_in_4bit", "common_overrides", "methods", "eval", "prepare",
              "ppo_vs_dpo", "overoptimization"}  # fmt: skip
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
BASELINE_SAMPLING_SEED = 0  # the SFT model is evaluated once; its sampled responses use this seed
MMLU_CHANCE = 0.25  # four choices
MMLU_MARGIN = 0.05  # "roughly unchanged": the whole interval of the change within ±0.05
PerItem = dict[str, dict[int, float]]  # metric key -> {item: value}, one evaluation's (eval.compare.per_item_values)


CHILD_ENV: dict[str, str] = {}  # what every training and evaluation subprocess sees (set in main)
EVAL_WORKERS: list[Executor] = []  # the evaluation worker processes (set in main); empty: one process per evaluation


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


def expand(value: Any, study_dir: Path) -> Any:
    """`{output_dir}` in a study value (a string, or inside lists and dicts) -> the study's output dir."""
    if isinstance(value, str):
        return value.replace("{output_dir}", str(study_dir))
    if isinstance(value, list):
        return [expand(v, study_dir) for v in value]
    if isinstance(value, dict):
        return {k: expand(v, study_dir) for k, v in value.items()}
    return value


def prepare(study: dict, study_dir: Path) -> None:
    """The study's `prepare:` steps, in order, before the methods that name them (`after_prepare: true`): data or
    models several methods share, such as one preference set and the reward model trained on it. A step is a
    `command` (argv list) or a `recipe` launch (`config` + `overrides`); it is skipped when its `done` file exists."""
    for name, step in study.get("prepare", {}).items():
        step = expand(step, study_dir)
        done = Path(step["done"])
        if done.is_file():
            log(f"prepare {name}: already done ({done.parent})")
            continue
        if "command" in step:
            cmd = [sys.executable if part == "python" else str(part) for part in step["command"]]
        else:
            cmd = ["accelerate", "launch", f"recipes/{step['recipe']}/train.py", "--config", step["config"]]
            for key, value in step.get("overrides", {}).items():
                cmd += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}", str(value)]
            cmd += ["--wandb_tags", f"study:{study['name']}"]
        log(f"prepare {name}: running -> {done.parent}")
        start = time.time()
        run(cmd, study_dir / "logs" / f"prepare-{name}.log")
        if not done.is_file():
            raise SystemExit(f"[study] prepare {name} finished without writing {done} (see its log)")
        log(f"prepare {name}: done in {time.time() - start:.0f}s")


def recipe_of(spec: dict) -> str:
    """The recipe a method runs: its config's folder (a method's name may differ: ppo_grader runs recipes/ppo)."""
    return Path(spec["config"]).parent.name


def launch_command(study: dict, method: str, seed: int, output_dir: Path) -> list[str]:
    """`accelerate launch recipes/<recipe>/train.py --config ...` with the study's overrides for one run."""
    spec = study["methods"][method]
    overrides = expand({**study.get("common_overrides", {}), **spec.get("overrides", {})}, output_dir.parent)
    overrides.update(
        model_name_or_path=study["sft"], output_dir=str(output_dir), seed=seed, run_name=f"{study['name']}-{method}-s{seed}",
        wandb_group=study["name"], parent_run=study["sft"],
    )  # fmt: skip
    cmd = ["accelerate", "launch", f"recipes/{recipe_of(spec)}/train.py", "--config", spec["config"]]
    for key, value in overrides.items():
        cmd += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}", str(value)]
    return cmd + ["--wandb_tags", f"study:{study['name']}"]


def command_arguments(command: list[str]) -> dict[str, str]:
    """`--key value...` pairs of a launch command (values of list options joined by spaces)."""
    arguments: dict[str, list[str]] = {}
    key = None
    for token in command:
        if token.startswith("--"):
            key = token[2:]
            arguments[key] = []
        elif key is not None:
            arguments[key].append(token)
    return {key: " ".join(values) for key, values in arguments.items()}


def check_same_command(command_file: Path, command: list[str], output_dir: Path) -> None:
    """A finished run is reused only when the study would launch it the same way: after a change to the study YAML
    (or the recipe config it names) the old run would silently stand for the new settings."""
    if not command_file.is_file():
        return  # trained before the study recorded its commands: nothing to compare
    recorded = json.loads(command_file.read_text())
    if recorded == command:
        return
    before, after = command_arguments(recorded), command_arguments(command)
    changed = [
        f"{key}: {before.get(key, '(unset)')} -> {after.get(key, '(unset)')}"
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ] or [f"{' '.join(recorded[:4])} -> {' '.join(command[:4])}"]
    raise UserError(
        f"{output_dir} was trained with other settings than the study now asks for ({'; '.join(changed)}). "
        f"Move or delete {output_dir} (and its {command_file.parent.name}/{output_dir.name}.* files) to retrain it, "
        "or give the study another --output_dir."
    )


def train_command_file(output_dir: Path) -> Path:
    """Where `train` records the launch command of a run (beside its log), for `check_same_command`."""
    return output_dir.parent / "logs" / f"{output_dir.name}.train_command.json"


def train(study: dict, method: str, seed: int, output_dir: Path) -> float:
    """Launch the method's recipe with the study's overrides; returns its wall seconds (as recorded, when reused).
    A finished run is reused as is: `main` has checked, before any work, that it was launched the same way."""
    seconds_file = output_dir.parent / "logs" / f"{output_dir.name}.train_seconds"
    command_file = train_command_file(output_dir)
    command = launch_command(study, method, seed, output_dir)
    if (output_dir / FINISHED_MARKER).is_file():
        log(f"{method} seed {seed}: already trained ({output_dir})")
        return float(seconds_file.read_text()) if seconds_file.is_file() else float("nan")
    log(f"{method} seed {seed}: training -> {output_dir}")
    start = time.time()
    command_file.parent.mkdir(parents=True, exist_ok=True)
    command_file.write_text(json.dumps(command) + "\n")
    run(command, output_dir.parent / "logs" / f"{output_dir.name}.train.log")
    seconds = time.time() - start
    seconds_file.write_text(f"{seconds:.1f}\n")
    return seconds


def evaluate(study: dict, model_dir: str, output_file: Path, seed: int) -> tuple[dict[str, float], PerItem]:
    """The same standalone evaluation for every model (and the SFT baseline), on the items `eval.data_seed` picks;
    `seed` seeds the sampled responses only. Returns the metrics and the per-item results. An earlier result is
    reused only when it was made with the same settings and has its per-item file."""
    settings = study["eval"]
    samples_file = output_file.with_suffix(".samples.jsonl")
    if output_file.is_file() and (
        stale_settings(json.loads(output_file.read_text()), settings, seed) or not samples_file.is_file()
    ):
        log(f"{output_file} was made with other evaluation settings (or lacks its per-item results): evaluating again")
        output_file.unlink()
    if not output_file.is_file():
        cmd = [sys.executable, "-m", "eval", "--model", model_dir, "--tasks", settings["tasks"],
               "--data_seed", str(settings.get("data_seed", 0)), "--seed", str(seed), "--output", str(output_file),
               "--samples_output", str(samples_file), "--no_progress"]  # fmt: skip
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
        if EVAL_WORKERS:
            log_file = output_file.with_suffix(".log")
            code = EVAL_WORKERS[0].submit(evaluate_in_worker, cmd[3:], str(log_file)).result()
            if code != 0:
                tail = log_file.read_text().splitlines()[-40:]
                raise SystemExit(
                    f"[study] evaluation of {model_dir} failed; last lines of {log_file}:\n" + "\n".join(tail)
                )
        else:
            run(cmd, output_file.with_suffix(".log"))
    payload = json.loads(output_file.read_text())
    return flatten(payload), per_item_values(read_jsonl(samples_file))


def evaluate_in_worker(argv: list[str], log_file: str) -> int:
    """`python -m eval <argv>` in an evaluation worker: that process imports the libraries once for all its runs."""
    from eval.__main__ import main_logged  # in the worker only: the study process itself stays light

    return main_logged(argv, log_file)


def start_eval_worker(env: dict[str, str]) -> None:
    """A worker process's setup: the study's environment (threads, W&B mode) and working directory."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(REPO_ROOT)


def stale_settings(payload: dict[str, Any], settings: dict[str, Any], seed: int) -> bool:
    recorded = payload.get("config", {})
    wanted = {key: value for key, value in settings.items() if key not in ("reward_models", "batch_size")}
    wanted.update(seed=seed, data_seed=settings.get("data_seed", 0))
    return any(str(recorded.get(key)).lower() != str(value).lower() for key, value in wanted.items())


def flatten(payload: dict[str, Any]) -> dict[str, float]:
    from eval import flatten_metrics

    results = payload.get("results", payload)
    return flatten_metrics(results)


def summarize(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def training_signal(study: dict, method: str) -> str:
    """What a method learned from: the study's `signal:` for it, else read from its config and overrides."""
    spec = study["methods"][method]
    if spec.get("signal"):
        return str(spec["signal"])
    config_file = REPO_ROOT / spec["config"]
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    config = {**(config or {}), **study.get("common_overrides", {}), **spec.get("overrides", {})}
    study_dir = Path(study.get("output_dir", "."))
    config = expand(config, study_dir)
    reward_models = " + ".join(
        str(config[key]) for key in ("reward_model_path", "safety_reward_model_path") if config.get(key)
    )
    # A reward model the study trains itself (a `prepare:` step): name the pairs it learned from.
    for step in expand(study.get("prepare", {}), study_dir).values():
        overrides = step.get("overrides", {})
        if step.get("recipe") == "reward" and overrides.get("output_dir") == config.get("reward_model_path"):
            reward_models += f", trained on preference pairs {overrides.get('dataset_name')}"
    grader = "the GSM8K grader (verifiable-reward RL)"
    kind = recipe_of(spec)
    if kind == "dpo":
        return f"preference pairs {config.get('dataset_name')}"
    if kind == "ppo":
        return grader if config.get("reward_source", "math") == "math" else f"reward model {reward_models}"
    if kind == "grpo":
        functions = config.get("reward_functions", ["correctness", "format"])
        parts = [grader for name in functions if name in ("correctness", "format")][:1]
        parts += [f"reward model {reward_models}" if name == "rm" else name for name in functions
                  if name not in ("correctness", "format")]  # fmt: skip
        return " + ".join(parts)
    if kind == "rejection_sampling":
        return grader if config.get("scorer", "gsm8k") == "gsm8k" else f"reward model {reward_models}"
    return "unspecified (set `signal:` for this method in the study YAML)"


def differences_to_baseline(
    items: dict[str, list[PerItem]], baseline_items: PerItem
) -> dict[str, dict[str, Difference]]:
    """method -> metric -> method minus SFT, paired over items (and drawn over the method's seeds)."""
    result: dict[str, dict[str, Difference]] = {}
    for method, runs in items.items():
        for key in baseline_items:
            pair = aligned(runs, [baseline_items], key)
            if pair is not None:
                result.setdefault(method, {})[key] = paired_bootstrap(*pair)
    return result


def figure(mean: float, spread: float | None) -> str:
    return f"{mean:.3g}" if spread is None else f"{mean:.3g} ± {spread:.2g}"


def seeds_note(difference: Difference) -> str:
    """ "n=1 seed" (never a spread of 0.000 from a single run), else how many seeds the ± is over."""
    seeds = max(difference.seeds_a, difference.seeds_b)
    if seeds == 1:
        return "n=1 seed"
    return f"± = s.d. over {difference.seeds_a} seeds" if difference.seeds_b == 1 else f"± = s.d. over {seeds} seeds"


def interval(difference: Difference) -> str:
    return f"95% CI [{difference.low:+.3g}, {difference.high:+.3g}]"


def effects(
    items: dict[str, list[PerItem]],
    baseline_items: PerItem,
    signals: dict[str, str],
    comparisons: Sequence[tuple[str, str]] = (("ppo", "dpo"),),
) -> list[str]:
    """Which published effects the per-item results reproduce: "reproduced" only when the 95% interval of the
    difference excludes 0 in the published direction, "not reproduced" when it excludes 0 the other way,
    "inconclusive" otherwise."""
    lines = []
    gsm = "eval/gsm8k/exact_match_flexible"
    for ppo, dpo in comparisons:
        pair = aligned(items[ppo], items[dpo], gsm) if ppo in items and dpo in items else None
        if pair is None:
            continue
        gap = paired_bootstrap(*pair)
        outcome = verdict(gap, +1)
        if signals.get(ppo) == signals.get(dpo) or signals.get(ppo, "").endswith(f"on {signals.get(dpo)}"):
            setting = f"same preference data: {signals.get(dpo)}"
            caveat = ""
        else:
            outcome += ", with different training signals"
            setting = "different training signals"
            caveat = (
                f" {ppo} learned from {signals.get(ppo)}, {dpo} from {signals.get(dpo)}; Ivison et al. 2024 trained "
                "both on the same preference data, so this gap compares training signals as much as algorithms."
            )
        lines.append(
            f"- PPO >= DPO on math (Ivison et al. 2024: PPO 58.0 vs DPO 50.5 GSM8K, Tulu 2.5 13B), {ppo} vs {dpo} "
            f"({setting}): **{outcome}** — {ppo} {figure(gap.mean_a, gap.spread_a)} vs {dpo} "
            f"{figure(gap.mean_b, gap.spread_b)} ({seeds_note(gap)}), gap {gap.mean:+.3f}, {interval(gap)} (paired "
            f"bootstrap over {gap.items} problems{' and seeds' if max(gap.seeds_a, gap.seeds_b) > 1 else ''}).{caveat}"
        )
    for key, name, paper, sign in (
        ("eval/length/mean_tokens", "Longer responses after RLHF", "Singhal et al. 2023: ~100 -> 230 tokens", 1),
        ("eval/diversity/per_input_distinct_mean", "Lower diversity after RLHF", "Kirk et al. 2024", -1),
    ):
        if key not in baseline_items:
            lines.append(f"- {name} ({paper}): not measured (no per-item `{key}`).")
            continue
        parts, outcomes, notes = [], [], set()
        for method, runs in items.items():
            pair = aligned(runs, [baseline_items], key)
            if pair is None:
                continue
            change = paired_bootstrap(*pair)
            outcomes.append((method, verdict(change, sign)))
            notes.add(seeds_note(change))
            parts.append(
                f"{method} {figure(change.mean_a, change.spread_a)} ({change.mean:+.3g}, {interval(change)}: "
                f"{outcomes[-1][1]})"
            )
        summary = f"reproduced by {sum(o == 'reproduced' for _, o in outcomes)} of {len(outcomes)} methods"
        for other in ("not reproduced", "inconclusive"):
            named = [m for m, o in outcomes if o == other]
            if named:
                summary += f"; {other}: {', '.join(named)}"
        sft_mean = float(np.mean(list(baseline_items[key].values())))
        lines.append(
            f"- {name} ({paper}): **{summary}** — SFT {sft_mean:.3g}; "
            + ", ".join(parts)
            + f" ({'; '.join(sorted(notes))})."
        )
    mmlu = "eval/mmlu/accuracy"
    if mmlu in baseline_items:
        sft = mean_interval(np.array([[baseline_items[mmlu][i] for i in sorted(baseline_items[mmlu])]]))
        changes = {
            m: paired_bootstrap(*pair) for m, runs in items.items() if (pair := aligned(runs, [baseline_items], mmlu))
        }
        parts = ", ".join(
            f"{m} {figure(c.mean_a, c.spread_a)} ({c.mean:+.3f}, {interval(c)})" for m, c in changes.items()
        )
        paper = "MMLU roughly unchanged by RLHF (GPT-4 report, Llama 2)"
        if sft.low <= MMLU_CHANCE:  # at or below chance (e.g. a model that always answers one letter)
            where = "at chance" if sft.high >= MMLU_CHANCE else "below chance"
            lines.append(
                f"- {paper}: **not testable (SFT {where}: {sft.mean:.3f} vs {MMLU_CHANCE})** — the SFT model's 95% "
                f"interval [{sft.low:.3f}, {sft.high:.3f}] over {sft.items} questions is not above chance, so an "
                f"unchanged score says nothing about retained knowledge; " + parts + "."
            )
        else:
            outcomes = {m: equivalence_verdict(c, MMLU_MARGIN) for m, c in changes.items()}
            summary = f"unchanged (95% CI within ±{MMLU_MARGIN}) for {sum(o == 'reproduced' for o in outcomes.values())} of {len(outcomes)} methods"
            for other in ("not reproduced", "inconclusive"):
                named = [m for m, o in outcomes.items() if o == other]
                if named:
                    summary += f"; {other}: {', '.join(named)}"
            lines.append(f"- {paper}: **{summary}** — SFT {sft.mean:.3f} ({interval(sft).replace('+', '')}); {parts}.")
    return lines


def overoptimization_points(history: list[dict[str, float]], gold: str, proxy: str) -> list[dict[str, float]]:
    """An RL run's (sqrt KL, gold, proxy) at each in-training evaluation, from its logged history. Update N logs the
    KL (`train/objective/kl`, per sequence, in nats, as best-of-N's) and the proxy (the reward model) of its rollouts,
    which the policy of checkpoint N-1 generated; so checkpoint N is measured by update N+1's rollouts. Step 0 is the
    reference itself (KL 0); the last checkpoint, which no rollout follows, takes its own update's rollouts (one
    update behind, flagged `lagged`)."""
    rows = sorted((r for r in history if "train/global_step" in r), key=lambda r: r["train/global_step"])
    rollouts = {r["train/global_step"]: r for r in rows if "train/objective/kl" in r}
    points = []
    for row in rows:
        if gold not in row:
            continue
        step = row["train/global_step"]
        if step == 0:
            points.append({"step": 0, "sqrt_kl": 0.0, "gold": row[gold], "proxy": None})
            continue
        measured_by = step + 1 if step + 1 in rollouts else max((s for s in rollouts if s <= step), default=None)
        if measured_by is None:
            continue
        kl = max(rollouts[measured_by]["train/objective/kl"], 0.0)  # a sampled KL estimate can dip below 0
        point = {"step": step, "sqrt_kl": kl**0.5, "gold": row[gold], "proxy": rollouts[measured_by].get(proxy)}
        if measured_by <= step:
            point["lagged"] = True
        points.append(point)
    return points


def overoptimization(study: dict, out: Path, seeds: list[int]) -> list[str]:
    """Gao et al. 2022's picture: the gold reward (the GSM8K grader) against sqrt(KL to the SFT policy) as a proxy
    reward (a learned reward model) is optimized, for best-of-N (scripts/best_of_n.py, a `prepare:` step) and for the
    RL runs' checkpoints (their in-training evaluations), with the proxy beside it. Draws overoptimization.png and
    returns the report's lines (none when the study has no `overoptimization:` block)."""
    spec = expand(study.get("overoptimization"), out)
    if not spec:
        return []
    lines = ["## Overoptimization (Gao et al. 2022)", ""]
    series: list[tuple[str, list[dict[str, float]]]] = []
    best_of_n_file = Path(spec["best_of_n"])
    if best_of_n_file.is_file():
        rows = json.loads(best_of_n_file.read_text())["results"]
        series.append(("best-of-N (SFT samples, T=1; gold of the proxy's pick)", rows))
        lines.append(
            "Best-of-N from the SFT policy (proxy picks, gold grades): "
            + ", ".join(
                f"N={r['n']}: sqrt(KL) {r['sqrt_kl']:.2f}, gold {r['gold']:.3f}, proxy {r['proxy']:.3g}" for r in rows
            )  # fmt: skip
            + "."
        )
    else:
        lines.append(f"Best-of-N: not drawn ({best_of_n_file} missing).")
    for method in spec.get("runs", []):
        for seed in seeds:
            try:
                (run,) = load_local_runs([out / f"{method}-seed{seed}"])
            except (CompareError, ValueError) as err:
                lines.append(f"{method} seed {seed}: no logged run ({err}).")
                continue
            # The proxy on its own scale: the reward model's score before PPO's batch whitening, when logged.
            proxy = "train/reward/rm_score_mean"
            proxy = proxy if any(proxy in row for row in run.history) else "train/reward/mean"
            points = overoptimization_points(run.history, spec.get("gold", "eval/gsm8k/accuracy"), proxy)
            if points:
                series.append((f"{method} seed {seed} (greedy GSM8K accuracy, in-training evaluation)", points))
                lines.append(
                    f"{method} seed {seed} checkpoints: "
                    + ", ".join(
                        f"step {p['step']:.0f}: sqrt(KL) {p['sqrt_kl']:.2f}, gold {p['gold']:.3f}"
                        + (f", proxy {p['proxy']:.3g}" if p["proxy"] is not None else "")
                        + (" (KL and proxy one update behind)" if p.get("lagged") else "")
                        for p in points
                    )  # fmt: skip
                    + "."
                )
    if series:
        from eval.runs import new_figure

        fig = new_figure(2, 1, (5.5, 4))
        gold_ax, proxy_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for i, (label, points) in enumerate(series):
            xs = [p["sqrt_kl"] for p in points]
            gold_ax.plot(xs, [p["gold"] for p in points], marker="o", markersize=3, color=f"C{i}", label=label)
            with_proxy = [(p["sqrt_kl"], p["proxy"]) for p in points if p["proxy"] is not None]
            if with_proxy:
                proxy_ax.plot(*zip(*with_proxy), marker="o", markersize=3, color=f"C{i}", label=label)
        gold_ax.set_title("gold reward: the GSM8K grader", fontsize=10)
        proxy_ax.set_title(f"proxy reward: {spec.get('proxy_name', 'the reward model')}", fontsize=10)
        for ax in (gold_ax, proxy_ax):
            ax.set_xlabel("sqrt(KL to the SFT policy)  [sqrt(nats)]")
            ax.grid(alpha=0.3)
        gold_ax.legend(fontsize=7)
        fig.savefig(out / "overoptimization.png", dpi=110)
        lines += ["", "![gold and proxy reward against sqrt(KL)](overoptimization.png)"]
    lines += [
        "",
        "Read it as Gao et al. do: as the policy moves away from SFT (sqrt(KL) grows), the proxy keeps rising; the gold "
        "reward rises, then flattens or falls when the proxy is being exploited. Best-of-N's KL is the analytic "
        "log N - (N-1)/N; an RL checkpoint's is the summed per-token KL of the rollouts its policy generated (the next "
        "update's; the last checkpoint, which no update follows, takes its own update's, one update behind). The two gold measures differ (best-of-N grades the proxy's pick among samples at T=1; the "
        "checkpoints are graded greedily on the in-training evaluation problems), so compare shapes, not levels.",
        "",
    ]
    return lines


def write_report(
    study: dict,
    out: Path,
    table: dict,
    baseline: dict,
    seconds: dict,
    seeds: list[int],
    differences: dict[str, dict[str, Difference]],
    effect_lines: list[str],
    overoptimization_lines: Sequence[str] = (),
) -> Path:
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
            figure_text = f"{mean:.4g} ± {spread:.2g}" if len(values) > 1 else f"{mean:.4g}"
            change = differences.get(method, {}).get(key)
            if change is not None:
                figure_text += f" ({change.mean:+.3g} [{change.low:+.3g}, {change.high:+.3g}])"
            elif key in baseline and key not in REFERENCE_ONLY:
                figure_text += f" ({mean - baseline[key]:+.3g})"
            cells.append(figure_text)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    rows.append(
        "| train time (s, mean) | — | " + " | ".join(f"{statistics.mean(seconds[m]):.0f}" for m in table) + " |"
    )
    settings = study["eval"]
    text = [
        f"# Study: {study['name']}",
        "",
        f"One SFT model (`{study['sft']}`), methods {', '.join(table)}, seeds {seeds}; every final model and the SFT "
        f"model evaluated with the same settings ({settings['tasks']}) on the same items (data seed "
        f"{settings.get('data_seed', 0)}, {settings.get('limit') or 'all'} per task; the SFT model once, sampling "
        f"seed {BASELINE_SAMPLING_SEED}). Mean ± standard deviation over seeds (when more than one), (change to SFT "
        "[95% interval: paired bootstrap over items and seeds]).",
        "Budgets per method: "
        + "; ".join(
            f"{m}: {study['methods'][m].get('budget', study['methods'][m].get('overrides', {}))}" for m in table
        )
        + ".",
        "Training signals: " + "; ".join(f"{m}: {training_signal(study, m)}" for m in table) + ".",
        "",
        *rows,
        "",
        "## Published effects",
        "",
        *effect_lines,
        "",
        "Verdicts: **reproduced** when the 95% interval of the difference excludes 0 in the published direction, **not "
        'reproduced** when it excludes 0 the other way, **inconclusive** otherwise (for MMLU, "unchanged" needs the '
        f"whole interval within ±{MMLU_MARGIN}). The interval is a paired bootstrap: items drawn with replacement (the "
        "same items for both sides) and seeds drawn with replacement, so it holds question sampling and run-to-run "
        'variation; with one seed it holds question sampling only ("n=1 seed").',
        "",
        *overoptimization_lines,
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
        raise UserError(f"--jobs {args.jobs}: give 1 or more (2 on a 2-core CPU runs two runs side by side).")
    if not args.study.is_file():
        raise UserError(
            f"no study file {args.study}; shipped ones: {sorted(p.name for p in DEFAULT_STUDY.parent.glob('*.yaml'))}."
        )
    study = yaml.safe_load(args.study.read_text())
    unknown_keys = sorted(set(study) - STUDY_KEYS)
    if unknown_keys:
        raise UserError(f"{args.study}: unknown key(s) {unknown_keys}; a study has {sorted(STUDY_KEYS)}.")
    seeds = args.seeds or study["seeds"]
    methods = args.methods or list(study["methods"])
    unknown = [m for m in methods if m not in study["methods"]]
    if unknown:
        raise UserError(f"unknown method(s) {unknown}; {args.study} defines {list(study['methods'])}.")
    if not (Path(study["sft"]) / FINISHED_MARKER).is_file():
        raise UserError(f"no finished SFT run at {study['sft']}: run the SFT recipe first (bash scripts/demo.sh).")
    out = args.output_dir or Path(study["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    study["output_dir"] = str(out)  # what `{output_dir}` in the study's values stands for
    comparisons = [tuple(pair) for pair in study.get("ppo_vs_dpo", [["ppo", "dpo"]])]

    CHILD_ENV.clear()
    CHILD_ENV.update(os.environ)
    CHILD_ENV.setdefault("WANDB_RUN_GROUP", study["name"])
    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        # A tiny model gains little from a second thread; two runs side by side use the cores better.
        CHILD_ENV["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))

    def train_and_evaluate(method: str, seed: int) -> tuple[float, dict[str, float], PerItem]:
        if prepared is not None and study["methods"][method].get("after_prepare"):
            prepared.result()  # the shared data / reward model it trains on
        run_dir = out / f"{method}-seed{seed}"
        seconds = train(study, method, seed, run_dir)
        return seconds, *evaluate(study, str(run_dir), out / f"{method}-seed{seed}.eval.json", seed=seed)

    runs = [(method, seed) for method in methods for seed in seeds]
    for method, seed in runs:  # before any work: a finished run launched with other settings is an error, not reused
        run_dir = out / f"{method}-seed{seed}"
        if (run_dir / FINISHED_MARKER).is_file():
            check_same_command(train_command_file(run_dir), launch_command(study, method, seed, run_dir), run_dir)
    # Evaluations run in `--jobs` long-lived worker processes; trainings are recipe launches, as a user runs them.
    eval_workers = ProcessPoolExecutor(
        max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=start_eval_worker,
        initargs=(dict(CHILD_ENV),),
    )  # fmt: skip
    EVAL_WORKERS[:] = [eval_workers]
    with eval_workers, ThreadPoolExecutor(max_workers=args.jobs) as pool:  # lanes: threads that wait on processes
        # First in the queue, so a method waiting on it never holds a lane before it runs.
        needs_prepare = any(study["methods"][m].get("after_prepare") for m in methods)
        prepared = pool.submit(prepare, study, out) if needs_prepare else None
        # Longest first (the study lists them so), the short SFT evaluation last: the two lanes end together.
        jobs = [pool.submit(train_and_evaluate, method, seed) for method, seed in runs]
        # The SFT baseline: once, on the same items as every run (the data seed), whatever the training seeds.
        baseline_job = pool.submit(evaluate, study, study["sft"], out / "sft.eval.json", BASELINE_SAMPLING_SEED)
        baseline, baseline_items = baseline_job.result()
        results = [job.result() for job in jobs]
    EVAL_WORKERS.clear()
    table: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, list[float]] = {}
    items: dict[str, list[PerItem]] = {}
    for (method, _), (train_seconds, metrics, per_item) in zip(runs, results):
        seconds.setdefault(method, []).append(train_seconds)
        items.setdefault(method, []).append(per_item)
        for key, value in metrics.items():
            table.setdefault(method, {}).setdefault(key, []).append(value)
    differences = differences_to_baseline(items, baseline_items)
    signals = {method: training_signal(study, method) for method in methods}
    effect_lines = effects(items, baseline_items, signals, comparisons)
    run_dirs = [Path(study["sft"])] + [out / f"{method}-seed{seed}" for method, seed in runs]
    summary = {
        "baseline": baseline,
        "methods": table,
        "seconds": seconds,
        "differences_to_sft": {m: {k: d.to_dict() for k, d in by_key.items()} for m, by_key in differences.items()},
        "signals": signals,
        "effects": effect_lines,
        "eval_data_seed": study["eval"].get("data_seed", 0),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    overoptimization_lines = overoptimization(study, out, seeds)
    report = write_report(
        study, out, table, baseline, seconds, seeds, differences, effect_lines, overoptimization_lines
    )
    try:  # curves from the W&B runs the recipes logged
        compare_runs(load_local_runs(run_dirs), out / "comparison", baseline=None)
    except CompareError as err:
        log(f"curves not drawn: {err}")
    log(f"report: {report}")
    print(report.read_text())
    return report


if __name__ == "__main__":
    run_cli(main)
