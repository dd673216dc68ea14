"""scripts/study_ppo_vs_dpo.py with a tiny budget (1 seed, DPO and PPO for a few steps, two runs side by side):
every run trained by its real recipe and evaluated by `python -m eval`, and a report built from those results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).parent))
import study_ppo_vs_dpo  # noqa: E402
from test_dpo import make_sft_adapter  # noqa: E402

from recipes.common.runs import load_local_runs as read_runs  # noqa: E402


def tiny_study(demo_dir: Path, sft_dir: Path, out_dir: Path) -> dict:
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
        "seeds": [0],
        "load_in_4bit": True,
        "common_overrides": eval_overrides,
        "methods": {
            "dpo": {
                "config": "recipes/dpo/config.yaml",
                "budget": "16 pairs",
                "overrides": {
                    "dataset_name": str(data / "preferences"),
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
    study_file.write_text(yaml.safe_dump(tiny_study(demo_dir, sft_dir, root / "study")))
    report = study_ppo_vs_dpo.main(["--study", str(study_file), "--jobs", "2"])
    return report, root / "study"


def test_report_compares_methods_with_figures_from_the_runs(study_report: tuple[Path, Path]) -> None:
    report, out = study_report
    text = report.read_text()
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"dpo", "ppo"}
    for method in ("dpo", "ppo"):
        assert (out / f"{method}-seed0" / "run_complete.json").is_file()
        evaluated = json.loads((out / f"{method}-seed0.eval.json").read_text())
        flat = study_ppo_vs_dpo.flatten(evaluated)
        # The report's figure is the evaluation's own number, not a default.
        accuracy = flat["eval/gsm8k/exact_match_flexible"]
        assert results["methods"][method]["eval/gsm8k/exact_match_flexible"] == [accuracy]
        assert 0.0 <= accuracy <= 1.0
        assert flat["eval/length/mean_tokens"] > 0
    assert "| GSM8K accuracy |" in text and "| MMLU accuracy |" in text
    assert "PPO >= DPO on math" in text  # the verdict line, with the figures
    assert "Lower diversity after RLHF" in text
    baseline = study_ppo_vs_dpo.flatten(json.loads((out / "sft.eval.json").read_text()))
    assert f"{baseline['eval/mmlu/accuracy']:.4g}" in text


def test_runs_are_tagged_and_grouped_for_wandb(study_report: tuple[Path, Path]) -> None:
    _, out = study_report
    for method in ("dpo", "ppo"):
        (run,) = read_runs([out / f"{method}-seed0"])
        assert run.group == "tiny-study"
        assert {"study:tiny-study", f"stage:{method}", "seed:0"} <= set(run.tags), run.tags
    assert (out / "comparison" / "report.md").is_file()  # the curves, drawn from those W&B runs


def test_finished_runs_are_reused(study_report: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    report, out = study_report
    study_ppo_vs_dpo.main(["--study", str(out.parent / "study.yaml"), "--jobs", "2"])
    printed = capsys.readouterr().out
    assert "dpo seed 0: already trained" in printed and "ppo seed 0: already trained" in printed


def test_unknown_method_is_refused(study_report: tuple[Path, Path]) -> None:
    _, out = study_report
    with pytest.raises(SystemExit, match="unknown method"):
        study_ppo_vs_dpo.main(["--study", str(out.parent / "study.yaml"), "--methods", "kto"])


def test_bad_arguments_are_refused_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--jobs 0"):
        study_ppo_vs_dpo.main(["--jobs", "0"])
    with pytest.raises(SystemExit, match="no study file"):
        study_ppo_vs_dpo.main(["--study", str(tmp_path / "missing.yaml")])
    assert not list(tmp_path.iterdir())  # nothing written
