"""The study's statistics and verdicts on constructed per-item results with known answers: the paired bootstrap
(`eval/compare.py`) and the report's effect lines (`scripts/study_ppo_vs_dpo.py`): a clear gain is reproduced, a
clear loss is not, noise is inconclusive, one seed says "n=1 seed", MMLU at chance is "not testable", and a
comparison of methods trained on different signals says so in its verdict."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from eval.compare import (
    aligned,
    equivalence_verdict,
    mean_interval,
    paired_bootstrap,
    per_item_values,
    verdict,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import study_ppo_vs_dpo as study  # noqa: E402

GSM = "eval/gsm8k/exact_match_flexible"
LENGTH = "eval/length/mean_tokens"
DIVERSITY = "eval/diversity/per_input_distinct_mean"
MMLU = "eval/mmlu/accuracy"
N = 200


def correct(fraction: float, shift: int = 0) -> dict[int, float]:
    """N items, the first `fraction` of them (rotated by `shift`) correct."""
    k = round(fraction * N)
    return {i: float((i + shift) % N < k) for i in range(N)}


def run(**metrics: dict[int, float]) -> dict[str, dict[int, float]]:
    return {{"gsm": GSM, "length": LENGTH, "diversity": DIVERSITY, "mmlu": MMLU}[k]: v for k, v in metrics.items()}


# --- the bootstrap and the rule ---------------------------------------------------------------------------------


def test_constant_difference_has_a_point_interval() -> None:
    difference = paired_bootstrap(np.ones((1, 50)), np.zeros((1, 50)))
    assert (difference.mean, difference.low, difference.high) == (1.0, 1.0, 1.0)
    assert difference.spread_a is None and difference.items == 50


def test_clear_gain_clear_loss_and_noise() -> None:
    gain = paired_bootstrap(
        np.array([list(correct(0.8, s).values()) for s in range(3)]), np.array([list(correct(0.2).values())])
    )
    assert gain.low > 0.5 and verdict(gain, +1) == "reproduced"
    assert verdict(gain, -1) == "not reproduced"  # a gain where a loss was published
    loss = paired_bootstrap(np.array([list(correct(0.2).values())]), np.array([list(correct(0.8).values())]))
    assert loss.high < -0.5 and verdict(loss, +1) == "not reproduced"
    # Noise: 20 items flip one way, 20 the other; the mean change is 0 and the interval holds it.
    base = np.array([[float(i % 2) for i in range(N)]])
    flipped = base.copy()
    flipped[0, :40] = 1 - flipped[0, :40]
    noise = paired_bootstrap(flipped, base)
    assert noise.mean == 0.0 and noise.low < 0 < noise.high and verdict(noise, +1) == "inconclusive"


def test_pairing_removes_item_difficulty() -> None:
    # Items of very different difficulty, the same small gain on each: paired, the gain is certain.
    hard_to_easy = np.linspace(0, 1, N)[None, :]
    difference = paired_bootstrap(hard_to_easy + 0.01, hard_to_easy)
    assert difference.low == pytest.approx(0.01) and difference.high == pytest.approx(0.01)
    assert verdict(difference, +1) == "reproduced"


def test_seeds_are_drawn_too() -> None:
    # Three training runs at 0.9, 0.1 and 0.5 on every item, against 0.2: item draws change nothing, seed draws
    # do. All three draws at 0.1 (probability 1/27 > 2.5%) give -0.1, all at 0.9 give +0.7.
    runs = np.array([[0.9] * N, [0.1] * N, [0.5] * N])
    difference = paired_bootstrap(runs, np.full((1, N), 0.2))
    assert difference.mean == pytest.approx(0.3)
    assert difference.low == pytest.approx(-0.1) and difference.high == pytest.approx(0.7)
    assert verdict(difference, +1) == "inconclusive"
    assert difference.spread_a == pytest.approx(0.4)


def test_equivalence_rule() -> None:
    same = paired_bootstrap(np.full((1, N), 0.6), np.full((1, N), 0.6))
    assert equivalence_verdict(same, 0.05) == "reproduced"
    moved = paired_bootstrap(np.full((1, N), 0.8), np.full((1, N), 0.6))
    assert equivalence_verdict(moved, 0.05) == "not reproduced"
    chance = mean_interval(np.array([list(correct(0.25).values())]))
    assert chance.low < 0.25 < chance.high


def test_aligned_refuses_different_items() -> None:
    a = [run(gsm={0: 1.0, 1: 0.0})]
    assert aligned(a, [run(gsm={1: 1.0, 0: 1.0})], GSM)[0].tolist() == [[1.0, 0.0]]
    with pytest.raises(ValueError, match="different items"):
        aligned(a, [run(gsm={0: 1.0, 2: 0.0})], GSM)
    assert aligned(a, [run(length={0: 3.0})], GSM) is None  # a metric one side lacks: no comparison


def test_per_item_values_from_eval_records() -> None:
    records = [
        {"task": "gsm8k", "item": 7, "correct_flexible": True, "correct_strict": False},
        {"task": "mmlu", "item": 3, "correct": False},
        {"task": "sampled", "item": 7, "sample": 0, "completion": "a b", "n_tokens": 4, "reward/helpful": 1.0},
        {"task": "sampled", "item": 7, "sample": 1, "completion": "a b", "n_tokens": 6, "reward/helpful": 0.0},
    ]
    values = per_item_values(records)
    assert values[GSM] == {7: 1.0} and values["eval/gsm8k/exact_match_strict"] == {7: 0.0}
    assert values[MMLU] == {3: 0.0} and values[LENGTH] == {7: 5.0} and values["eval/reward/mean"] == {7: 0.5}
    # Two identical samples: distinct-1 = 2/4, distinct-2 = 1/2, no 3-, 4-, 5-grams (0): mean 0.2.
    assert values[DIVERSITY] == {7: pytest.approx(0.2)}


# --- the report's lines ---------------------------------------------------------------------------------------------

SIGNALS_DIFFER = {"ppo": "the GSM8K grader", "dpo": "preference pairs chat.jsonl"}
SIGNALS_SAME = {"ppo": "UltraFeedback preferences", "dpo": "UltraFeedback preferences"}


def line(lines: list[str], start: str) -> str:
    (found,) = [text for text in lines if text.startswith(f"- {start}")]
    return found


def test_ppo_beats_dpo_with_one_seed() -> None:
    items = {"ppo": [run(gsm=correct(0.6))], "dpo": [run(gsm=correct(0.2))]}
    text = line(study.effects(items, run(gsm=correct(0.2)), SIGNALS_SAME), "PPO >= DPO")
    assert "**reproduced**" in text and "n=1 seed" in text
    assert "± 0.000" not in text and not re.search(r"±\s*0(\.0+)?\b", text)
    assert "gap +0.400" in text and "95% CI [+" in text


def test_different_training_signals_are_named_in_the_verdict() -> None:
    items = {"ppo": [run(gsm=correct(0.6))], "dpo": [run(gsm=correct(0.2))]}
    text = line(study.effects(items, run(gsm=correct(0.2)), SIGNALS_DIFFER), "PPO >= DPO")
    verdict_text = re.search(r"\*\*(.+?)\*\*", text).group(1)
    assert verdict_text == "reproduced, with different training signals"
    assert "the GSM8K grader" in text and "preference pairs chat.jsonl" in text and "same preference data" in text


def test_ppo_below_dpo_over_seeds_is_not_reproduced() -> None:
    items = {
        "ppo": [run(gsm=correct(0.2, s)) for s in range(3)],
        "dpo": [run(gsm=correct(0.7, s)) for s in range(3)],
    }
    text = line(study.effects(items, run(gsm=correct(0.2)), SIGNALS_SAME), "PPO >= DPO")
    assert "**not reproduced**" in text and "± = s.d. over 3 seeds" in text and "n=1 seed" not in text


def test_small_noisy_length_change_is_not_called_longer() -> None:
    rng = np.random.default_rng(0)
    sft = {i: float(v) for i, v in enumerate(rng.uniform(5, 30, N))}
    longer = {i: v + 10 for i, v in sft.items()}
    noisy = {i: v + 0.25 + float(rng.normal(0, 4)) for i, v in sft.items()}  # +0.25 tokens on average, noisy
    items = {"grpo": [run(length=longer)], "dpo": [run(length=noisy)]}
    text = line(study.effects(items, run(length=sft), SIGNALS_SAME), "Longer responses")
    assert "**reproduced by 1 of 2 methods; inconclusive: dpo**" in text
    assert re.search(r"grpo [\d.]+ \(\+10, 95% CI \[\+10, \+10\]: reproduced\)", text), text


def test_diversity_direction_is_lower() -> None:
    sft = {i: 0.7 for i in range(N)}
    items = {"ppo": [run(diversity={i: 0.5 for i in range(N)})], "dpo": [run(diversity={i: 0.9 for i in range(N)})]}
    text = line(study.effects(items, run(diversity=sft), SIGNALS_SAME), "Lower diversity")
    assert "**reproduced by 1 of 2 methods; not reproduced: dpo**" in text


def test_mmlu_at_chance_is_not_testable() -> None:
    items = {"ppo": [run(mmlu=correct(0.26))]}
    text = line(study.effects(items, run(mmlu=correct(0.25)), SIGNALS_SAME), "MMLU")
    assert "**not testable (SFT at chance: 0.250 vs 0.25)**" in text


def test_mmlu_below_chance_is_not_testable_either() -> None:
    # A model that always answers one letter, which no sampled item has as its answer, scores 0: "unchanged" would
    # say nothing about knowledge (SmolLM2-135M on 16 demo items, always "C").
    items = {"ppo": [run(mmlu=correct(0.0))]}
    text = line(study.effects(items, run(mmlu=correct(0.0)), SIGNALS_SAME), "MMLU")
    assert "**not testable (SFT below chance: 0.000 vs 0.25)**" in text and "unchanged (95% CI" not in text


def test_mmlu_above_chance_is_tested_for_no_change() -> None:
    items = {"ppo": [run(mmlu=correct(0.6))], "grpo": [run(mmlu=correct(0.3))]}
    text = line(study.effects(items, run(mmlu=correct(0.6)), SIGNALS_SAME), "MMLU")
    assert "**unchanged (95% CI within ±0.05) for 1 of 2 methods; not reproduced: grpo**" in text


def test_signals_are_read_from_the_configs() -> None:
    spec = {
        "name": "s",
        "common_overrides": {},
        "methods": {
            "ppo": {"config": "recipes/ppo/config.yaml"},
            "dpo": {"config": "recipes/dpo/config.yaml", "overrides": {"dataset_name": "pairs.jsonl"}},
            "grpo": {"config": "recipes/grpo/config.yaml", "signal": "declared"},
        },
    }
    assert study.training_signal(spec, "ppo") == "the GSM8K grader (verifiable-reward RL)"
    assert study.training_signal(spec, "dpo") == "preference pairs pairs.jsonl"
    assert study.training_signal(spec, "grpo") == "declared"


def test_ppo_on_a_reward_model_of_dpos_pairs_is_the_same_data() -> None:
    """Ivison et al.'s setup: DPO on pairs, PPO on a reward model the study trains on the same pairs (a `prepare:`
    step). The signals are read from the steps and configs, and the verdict says the data is the same."""
    spec = {
        "name": "s",
        "output_dir": "out/study",
        "prepare": {
            "pairs": {"command": ["python", "make_pairs.py"], "done": "{output_dir}/pairs/pairs.json"},
            "rm": {
                "recipe": "reward",
                "config": "recipes/reward/config.yaml",
                "overrides": {"dataset_name": "{output_dir}/pairs", "output_dir": "{output_dir}/rm"},
                "done": "{output_dir}/rm/run_complete.json",
            },
        },
        "methods": {
            "ppo": {
                "config": "recipes/ppo/config.yaml",
                "overrides": {"reward_source": "reward_model", "reward_model_path": "{output_dir}/rm"},
            },
            "ppo_grader": {"config": "recipes/ppo/config.yaml"},
            "dpo": {"config": "recipes/dpo/config.yaml", "overrides": {"dataset_name": "{output_dir}/pairs"}},
        },
    }
    signals = {method: study.training_signal(spec, method) for method in spec["methods"]}
    assert signals["dpo"] == "preference pairs out/study/pairs"
    assert signals["ppo"] == "reward model out/study/rm, trained on preference pairs out/study/pairs"
    assert signals["ppo_grader"] == "the GSM8K grader (verifiable-reward RL)"
    items = {m: [run(gsm=correct(acc))] for m, acc in (("ppo", 0.6), ("ppo_grader", 0.7), ("dpo", 0.2))}
    lines = study.effects(items, run(gsm=correct(0.2)), signals, [("ppo", "dpo"), ("ppo_grader", "dpo")])
    fair, other = [text for text in lines if text.startswith("- PPO >= DPO")]
    assert "ppo vs dpo (same preference data: preference pairs out/study/pairs): **reproduced**" in fair
    assert "ppo_grader vs dpo (different training signals): **reproduced, with different training signals**" in other


# --- the overoptimization picture -----------------------------------------------------------------------------------


def test_checkpoint_points_are_measured_by_the_rollouts_their_policy_generated() -> None:
    """Update N logs the KL and proxy of rollouts from checkpoint N-1's policy, so the evaluation at step N pairs with
    update N+1's; the last one (no next update) with its own, flagged. Before: each took its own update's (KL 0 at
    step 2 here, the first update's, when the policy had moved)."""
    history = [
        {"train/global_step": 0, "eval/gsm8k/accuracy": 0.1},  # the SFT policy: KL 0, no proxy yet
        {"train/global_step": 1, "train/objective/kl": 0.0, "train/reward/mean": 0.2},  # the reference's rollouts
        {"train/global_step": 2, "train/objective/kl": 0.25, "train/reward/mean": 0.5},
        {"train/global_step": 2, "eval/gsm8k/accuracy": 0.3},
        {"train/global_step": 3, "train/objective/kl": 1.0, "train/reward/mean": 0.9},  # checkpoint 2's rollouts
        {"train/global_step": 4, "train/objective/kl": -0.01, "train/reward/mean": 1.1},  # a noisy KL estimate
        {"train/global_step": 4, "eval/gsm8k/accuracy": 0.2},
    ]
    points = study.overoptimization_points(history, "eval/gsm8k/accuracy", "train/reward/mean")
    assert points == [
        {"step": 0, "sqrt_kl": 0.0, "gold": 0.1, "proxy": None},
        {"step": 2, "sqrt_kl": 1.0, "gold": 0.3, "proxy": 0.9},
        {"step": 4, "sqrt_kl": 0.0, "gold": 0.2, "proxy": 1.1, "lagged": True},
    ]


def test_overoptimization_section_reads_best_of_n_and_draws_the_figure(tmp_path: Path) -> None:
    best = tmp_path / "best_of_n" / "best_of_n.json"
    best.parent.mkdir()
    rows = [{"n": 1, "sqrt_kl": 0.0, "gold": 0.2, "proxy": 0.1}, {"n": 4, "sqrt_kl": 1.1, "gold": 0.5, "proxy": 1.3}]
    best.write_text(json.dumps({"results": rows}))
    spec = {"overoptimization": {"best_of_n": "{output_dir}/best_of_n/best_of_n.json", "runs": []}}
    lines = study.overoptimization(spec, tmp_path, seeds=[0])
    text = "\n".join(lines)
    assert "N=4: sqrt(KL) 1.10, gold 0.500, proxy 1.3" in text and "overoptimization.png" in text
    assert (tmp_path / "overoptimization.png").stat().st_size > 0
    assert study.overoptimization({}, tmp_path, seeds=[0]) == []  # no block, no section


def test_a_method_runs_its_configs_recipe_whatever_its_name(tmp_path: Path) -> None:
    spec = {
        "name": "s",
        "sft": "outputs/demo/sft",
        "common_overrides": {"eval_tasks": ["gsm8k"]},
        "methods": {"ppo_grader": {"config": "recipes/ppo/config.yaml", "overrides": {"pairs": "{output_dir}/p"}}},
    }
    cmd = study.launch_command(spec, "ppo_grader", 1, tmp_path / "ppo_grader-seed1")
    assert cmd[:5] == ["accelerate", "launch", "recipes/ppo/train.py", "--config", "recipes/ppo/config.yaml"]
    assert cmd[cmd.index("--pairs") + 1] == f"{tmp_path}/p" and cmd[cmd.index("--seed") + 1] == "1"
    assert cmd[cmd.index("--eval_tasks") + 1] == "gsm8k" and cmd[-2:] == ["--wandb_tags", "study:s"]


def test_finished_run_launched_with_other_settings_is_an_error_not_reused(tmp_path: Path) -> None:
    """After a change to the study YAML (here DPO's learning rate) the old run must not stand for the new settings."""
    from recipes.common.errors import UserError

    run_dir = tmp_path / "dpo-seed0"
    command_file = tmp_path / "logs" / "dpo-seed0.train_command.json"
    command_file.parent.mkdir()
    before = ["accelerate", "launch", "recipes/dpo/train.py", "--max_steps", "32", "--learning_rate", "5e-05"]
    command_file.write_text(json.dumps(before))
    study.check_same_command(command_file, before, run_dir)  # same launch: reused
    study.check_same_command(tmp_path / "logs" / "missing.json", before, run_dir)  # no record: reused
    after = before[:-1] + ["0.0002"]
    with pytest.raises(UserError, match=r"learning_rate: 5e-05 -> 0\.0002.*Move or delete"):
        study.check_same_command(command_file, after, run_dir)
