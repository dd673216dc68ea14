"""scripts/study_ppo_vs_dpo.py with a tiny budget (1 seed, DPO and PPO for a few steps, two runs side by side):
every run trained by its real recipe and evaluated by `python -m eval` on the items the data seed picks (the same
for the SFT baseline, whatever the training seed), and a report whose figures and verdicts follow from the per-item
results (the verdict rules themselves: tests/unit/test_study_verdicts.py)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).parent))
import study_ppo_vs_dpo  # noqa: E402
from test_dpo import make_sft_adapter  # noqa: E402

from eval.compare import mean_interval, per_item_values  # noqa: E402
from eval.data import seeded_subset  # noqa: E402
from eval.runs import load_local_runs as read_runs  # noqa: E402
from recipes.common.errors import UserError  # noqa: E402
from recipes.common.files import read_jsonl  # noqa: E402

SEED = 1  # a training seed other than the data seed (0): it must not change which items are evaluated


# The tests' SFT stand-in (a random LoRA on the base) never solves a chat-formatted problem, so the pairs are sampled
# from the base itself with a chat template that renders the raw-text math format it was pretrained on.
QA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}Question: {{ message['content'] }}\nAnswer:"
    "{% endif %}{% endfor %}"
)


def qa_base(base_dir: Path, out_dir: Path) -> Path:
    from transformers import AutoTokenizer

    shutil.copytree(base_dir, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    tokenizer.chat_template = QA_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_study(demo_dir: Path, sft_dir: Path, out_dir: Path, pairs_policy: Path) -> dict:
    data = demo_dir / "data"
    eval_overrides = {
        "eval_tasks": ["gsm8k", "length"],
        "eval_gsm8k_path": str(data / "math" / "test.jsonl"),
        "eval_num_samples": 4,
        "eval_max_new_tokens": 16,
        "report_to": ["wandb"],
    }
    return {
        "name": "tiny-study",
        "output_dir": str(out_dir),
        "sft": str(sft_dir),
        "seeds": [SEED],
        "load_in_4bit": True,
        "common_overrides": eval_overrides,
        # Ivison et al.'s shared preference data, built by the study: the SFT policy's own samples, right vs wrong,
        # and a reward model on them (as scripts/studies/demo.yaml, smaller).
        "prepare": {
            "math_pairs": {
                "command": [
                    "python",
                    "scripts/preference_pairs.py",
                    "--policy",
                    str(pairs_policy),
                    "--prompts",
                    str(data / "prompts"),
                    "--num_prompts",
                    "48",
                    "--num_samples",
                    "4",
                    "--max_new_tokens",
                    "48",
                    "--temperature",
                    "1.5",
                    "--output_dir",
                    "{output_dir}/math_pairs",
                ],  # fmt: skip
                "done": "{output_dir}/math_pairs/pairs.json",
            },
            "math_reward": {
                "recipe": "reward",
                "config": "recipes/reward/config.yaml",
                "overrides": {
                    "model_name_or_path": str(demo_dir / "base"),
                    "dataset_name": "{output_dir}/math_pairs",
                    "output_dir": "{output_dir}/math_reward",
                    "max_steps": 2,
                    "eval_steps": 2,
                    "save_steps": 2,
                    "per_device_train_batch_size": 4,
                    "report_to": ["none"],
                },  # fmt: skip
                "done": "{output_dir}/math_reward/run_complete.json",
            },
        },
        "methods": {
            "dpo": {
                "config": "recipes/dpo/config.yaml",
                "budget": "16 pairs",
                "after_prepare": True,
                "overrides": {
                    "dataset_name": "{output_dir}/math_pairs",
                    "max_steps": 4,
                    "per_device_train_batch_size": 4,
                    "max_train_samples": 16,
                    "max_eval_samples": 8,
                    "eval_steps": 2,
                    "save_steps": 4,
                    "max_length": 128,
                },  # fmt: skip
            },
            "ppo": {
                "config": "recipes/ppo/config.yaml",
                "budget": "16 prompts",
                "overrides": {
                    "dataset_name": str(data / "prompts"),
                    "total_episodes": 16,
                    "per_device_train_batch_size": 4,
                    "gradient_accumulation_steps": 2,
                    "local_rollout_forward_batch_size": 8,
                    "response_length": 16,
                    "max_eval_samples": 4,
                    "save_steps": 2,
                    "eval_steps": 1,
                    "num_sample_generations": 0,
                },  # fmt: skip
            },
        },
        "eval": {
            "tasks": "gsm8k,mmlu,length,diversity",
            "data_seed": 0,
            "gsm8k": str(data / "math" / "test.jsonl"),
            "gsm8k_chat": True,
            "mmlu": str(data / "mmlu"),
            "prompts": str(data / "prompts" / "test.jsonl"),
            "limit": 8,
            "max_new_tokens": 24,
            "samples_per_prompt": 2,
            "batch_size": 8,
        },
    }


@pytest.fixture(scope="module")
def study_report(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("study")
    sft_dir = make_sft_adapter(demo_dir / "base", root / "sft")
    study_file = root / "study.yaml"
    pairs_policy = qa_base(demo_dir / "base", root / "qa-base")
    study_file.write_text(yaml.safe_dump(tiny_study(demo_dir, sft_dir, root / "study", pairs_policy)))
    report = study_ppo_vs_dpo.main(["--study", str(study_file), "--jobs", "2"])
    return report, root / "study"


def test_report_compares_methods_with_figures_from_the_runs(study_report: tuple[Path, Path]) -> None:
    report, out = study_report
    text = report.read_text()
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"dpo", "ppo"}
    for method in ("dpo", "ppo"):
        finished = json.loads((out / f"{method}-seed{SEED}" / "run_complete.json").read_text())
        assert finished["start_model"] == str(out.parent / "sft")  # the lineage python -m eval's KL reads
        evaluated = json.loads((out / f"{method}-seed{SEED}.eval.json").read_text())
        flat = study_ppo_vs_dpo.flatten(evaluated)
        # The report's figure is the evaluation's own number, not a default.
        accuracy = flat["eval/gsm8k/exact_match_flexible"]
        assert results["methods"][method]["eval/gsm8k/exact_match_flexible"] == [accuracy]
        assert 0.0 <= accuracy <= 1.0
        assert flat["eval/length/mean_tokens"] > 0
        assert evaluated["config"]["seed"] == SEED and evaluated["config"]["data_seed"] == 0
    assert "| GSM8K accuracy |" in text and "| MMLU accuracy |" in text
    # The prepared pairs: right vs wrong by the grader, what DPO trained on; the reward model trained on them.
    pairs = read_jsonl(out / "math_pairs" / "train.jsonl")
    assert pairs and all(p["rating"] == "significantly_better" for p in pairs)
    assert json.loads((out / "math_pairs" / "pairs.json").read_text())["counts"]["pairs"] >= 2
    assert (out / "math_reward" / "run_complete.json").is_file()
    dpo_log = (out / "logs" / f"dpo-seed{SEED}.train.log").read_text()
    assert str(out / "math_pairs") in text and "preference pairs" in text and dpo_log
    baseline = study_ppo_vs_dpo.flatten(json.loads((out / "sft.eval.json").read_text()))
    assert f"{baseline['eval/mmlu/accuracy']:.4g}" in text


def per_item(out: Path, name: str) -> dict:
    return per_item_values(read_jsonl(out / f"{name}.eval.samples.jsonl"))


def test_every_model_is_evaluated_on_the_data_seeds_items(demo_dir: Path, study_report: tuple[Path, Path]) -> None:
    _, out = study_report
    problems = read_jsonl(demo_dir / "data" / "math" / "test.jsonl")
    expected = seeded_subset(range(len(problems)), 8, 0)  # limit 8, data seed 0, not the training seed
    runs = {name: per_item(out, name) for name in ("sft", f"dpo-seed{SEED}", f"ppo-seed{SEED}")}
    for name, values in runs.items():
        assert sorted(values["eval/gsm8k/exact_match_flexible"]) == expected, name
        for key in ("eval/mmlu/accuracy", "eval/length/mean_tokens", "eval/diversity/per_input_distinct_mean"):
            assert sorted(values[key]) == sorted(runs["sft"][key]), (name, key)
    assert json.loads((out / "sft.eval.json").read_text())["config"]["seed"] == study_ppo_vs_dpo.BASELINE_SAMPLING_SEED
    # The per-item results add up to each evaluation's metrics, so the intervals describe the reported figures.
    for name, values in runs.items():
        flat = study_ppo_vs_dpo.flatten(json.loads((out / f"{name}.eval.json").read_text()))
        for key in ("eval/gsm8k/exact_match_flexible", "eval/mmlu/accuracy", "eval/length/mean_tokens"):
            assert sum(values[key].values()) / len(values[key]) == pytest.approx(flat[key]), (name, key)
        distinct = values["eval/diversity/per_input_distinct_mean"]
        assert sum(distinct.values()) / len(distinct) == pytest.approx(flat["eval/diversity/per_input_distinct_mean"])


def effect_line(text: str, start: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(f"- {start}")]
    return line


def test_verdicts_follow_from_the_per_item_results(study_report: tuple[Path, Path]) -> None:
    report, out = study_report
    text = report.read_text()
    results = json.loads((out / "results.json").read_text())
    differences = results["differences_to_sft"]
    # PPO (the GSM8K grader) vs DPO (preference pairs): one seed, different signals, both said in the line.
    ppo_vs_dpo = effect_line(text, "PPO >= DPO on math")
    verdict = re.search(r"\*\*(.+?)\*\*", ppo_vs_dpo).group(1)
    assert verdict in {
        f"{v}, with different training signals" for v in ("reproduced", "not reproduced", "inconclusive")
    }
    assert "n=1 seed" in ppo_vs_dpo and "±" not in ppo_vs_dpo
    assert "the GSM8K grader (verifiable-reward RL)" in ppo_vs_dpo and "preference pairs" in ppo_vs_dpo
    gsm = "eval/gsm8k/exact_match_flexible"
    gap = differences["ppo"][gsm]["mean"] - differences["dpo"][gsm]["mean"]
    assert f"gap {gap:+.3f}" in ppo_vs_dpo
    low, high = (float(x) for x in re.search(r"95% CI \[([-+\d.e]+), ([-+\d.e]+)\]", ppo_vs_dpo).groups())
    expected = "reproduced" if low > 0 else "not reproduced" if high < 0 else "inconclusive"
    assert verdict.startswith(expected) and not (expected == "reproduced" and verdict.startswith("not"))
    # Length and diversity: each method's verdict is its interval's, and the headline counts them.
    for start, key, sign in (
        ("Longer responses", "eval/length/mean_tokens", 1),
        ("Lower diversity", "eval/diversity/per_input_distinct_mean", -1),
    ):
        line = effect_line(text, start)
        reproduced = 0
        for method in ("dpo", "ppo"):
            change = differences[method][key]
            if change["low"] > 0 or change["high"] < 0:
                outcome = "reproduced" if (change["low"] > 0) == (sign > 0) else "not reproduced"
            else:
                outcome = "inconclusive"
            reproduced += outcome == "reproduced"
            assert f"{change['mean']:+.3g}, 95% CI [{change['low']:+.3g}, {change['high']:+.3g}]: {outcome})" in line
        assert f"**reproduced by {reproduced} of 2 methods" in line and "n=1 seed" in line
    # MMLU: "not testable" exactly when the SFT model's interval is not above chance.
    sft_mmlu = per_item(out, "sft")["eval/mmlu/accuracy"]
    sft = mean_interval([[sft_mmlu[i] for i in sorted(sft_mmlu)]])
    mmlu_line = effect_line(text, "MMLU roughly unchanged")
    not_above_chance = sft.low <= 0.25
    assert ("**not testable (SFT" in mmlu_line and f"{sft.mean:.3f} vs 0.25)**" in mmlu_line) == not_above_chance
    assert ("**unchanged (95% CI within ±0.05)" in mmlu_line) == (not not_above_chance)
    # The table shows the same change and interval as the verdicts.
    ppo_gsm = differences["ppo"][gsm]
    assert f"({ppo_gsm['mean']:+.3g} [{ppo_gsm['low']:+.3g}, {ppo_gsm['high']:+.3g}])" in text


def test_runs_are_tagged_and_grouped_for_wandb(study_report: tuple[Path, Path]) -> None:
    _, out = study_report
    for method in ("dpo", "ppo"):
        (run,) = read_runs([out / f"{method}-seed{SEED}"])
        assert run.group == "tiny-study"
        assert {"study:tiny-study", f"stage:{method}", f"seed:{SEED}"} <= set(run.tags), run.tags
    assert (out / "comparison" / "report.md").is_file()  # the curves, drawn from those W&B runs


def test_finished_runs_are_reused(study_report: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    report, out = study_report
    study_ppo_vs_dpo.main(["--study", str(out.parent / "study.yaml"), "--jobs", "2"])
    printed = capsys.readouterr().out
    assert f"dpo seed {SEED}: already trained" in printed and f"ppo seed {SEED}: already trained" in printed
    assert "prepare math_pairs: already done" in printed and "prepare math_reward: already done" in printed
    assert "evaluating" not in printed  # the evaluations (and the SFT baseline) are reused too


def test_unknown_method_is_refused(study_report: tuple[Path, Path]) -> None:
    _, out = study_report
    with pytest.raises(UserError, match="unknown method"):
        study_ppo_vs_dpo.main(["--study", str(out.parent / "study.yaml"), "--methods", "kto"])


def test_bad_arguments_are_refused_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--jobs 0"):
        study_ppo_vs_dpo.main(["--jobs", "0"])
    with pytest.raises(UserError, match="no study file"):
        study_ppo_vs_dpo.main(["--study", str(tmp_path / "missing.yaml")])
    assert not list(tmp_path.iterdir())  # nothing written
