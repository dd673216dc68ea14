"""Rejection sampling end to end on the tiny demo model with real 4-bit QLoRA: one full round, interrupted between
scoring and SFT and resumed without redoing anything; a relaunch with another config and a NaN scorer fail with
earlier rounds untouched; one iterative-DPO round."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval.gsm8k import grade
from recipes.common.outputs import mark_finished
from recipes.rejection_sampling import loop, rundir
from recipes.rejection_sampling import train as rs_train
from recipes.rejection_sampling.selection import ScorerError
from recipes.rejection_sampling.train import main

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_SAMPLES = 4


class SimulatedKill(Exception):
    pass


def rs_args(demo_dir: Path, policy: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO_ROOT / "recipes" / "rejection_sampling" / "config.yaml"),
        "--model_name_or_path", str(policy), "--parent_run", str(policy),
        "--dataset_name", str(demo_dir / "data" / "prompts"),
        "--eval_gsm8k_path", str(demo_dir / "data" / "math" / "test.jsonl"),
        "--output_dir", str(output_dir), "--num_rounds", "1",
        "--max_train_samples", "16", "--max_eval_samples", "4", "--num_samples", str(NUM_SAMPLES),
        "--max_new_tokens", "32", "--generation_batch_size", "8", "--eval_reward_samples", "2",
        "--reward_threshold", "0", "--keep_truncated", "true", "--keep_per_prompt", "1",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--learning_rate", "2e-3",
        "--logging_steps", "1", "--save_steps", "1",
        "--eval_tasks", "gsm8k", "--eval_num_samples", "8", "--eval_max_new_tokens", "32",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def start_policy(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the demo base standing in for the SFT run (LoRA B = 0: the base model's behaviour)."""
    path = tmp_path_factory.mktemp("policy") / "sft"
    base = AutoModelForCausalLM.from_pretrained(demo_dir / "base", dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(demo_dir / "base").save_pretrained(path)
    mark_finished(str(path), {"stage": "sft", "metrics": {}})
    return path


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in directory.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def resumed_run(demo_dir: Path, start_policy: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    output_dir = tmp_path_factory.mktemp("rs") / "run"
    args = rs_args(demo_dir, start_policy, output_dir)
    sampled: list[int] = []
    real_sampler = loop.hf_sampler

    def counting_sampler(*a, **k):
        sample = real_sampler(*a, **k)

        def counted(prompts, n, temperature, seed):
            sampled.append(n)
            return sample(prompts, n, temperature, seed)

        return counted

    def killed(*a, **k):
        raise SimulatedKill("killed between scoring and SFT")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_DIR", str(tmp_path_factory.mktemp("rs-wandb")))
        patch.setattr(loop, "hf_sampler", counting_sampler)
        patch.setattr(loop, "train_round", killed)
        with pytest.raises(SimulatedKill):
            main(args)
        first_attempt = {"files": snapshot(output_dir), "sampled": list(sampled)}
        patch.undo()
        patch.setenv("WANDB_DIR", str(tmp_path_factory.mktemp("rs-wandb")))
        patch.setattr(loop, "hf_sampler", counting_sampler)
        sampled.clear()
        result = main(args)
    return {"result": result, "output_dir": output_dir, "first": first_attempt, "resumed_sampling": list(sampled)}


def test_interrupted_round_resumes_without_redoing_work(resumed_run: dict) -> None:
    first, output_dir = resumed_run["first"], resumed_run["output_dir"]
    round1 = ["round_1/generations.jsonl", "round_1/samples.jsonl", "round_1/selected.jsonl", "round_1/selection.json"]
    assert set(round1) | {"round_0/eval.json", "run_config.json"} <= set(first["files"])
    assert not any(name.startswith("round_1/adapter") for name in first["files"])
    assert NUM_SAMPLES in first["sampled"]  # round 1 was sampled in the first attempt ...
    assert NUM_SAMPLES not in resumed_run["resumed_sampling"]  # ... and not again after the relaunch
    after = snapshot(output_dir)
    for name in [*round1, "round_0/eval.json"]:
        assert after[name] == first["files"][name], f"{name} was rewritten"
    assert (output_dir / "round_1" / "adapter" / "run_complete.json").is_file()
    assert (output_dir / "round_1" / "eval.json").is_file() and (output_dir / "run_complete.json").is_file()


def test_round_trained_a_4bit_qlora_adapter(resumed_run: dict, start_policy: Path) -> None:
    adapter = resumed_run["output_dir"] / "round_1" / "adapter"
    before = load_file(start_policy / "adapter_model.safetensors")
    after = load_file(adapter / "adapter_model.safetensors")
    assert set(before) == set(after)
    lora_b = [name for name in after if "lora_B" in name]
    assert lora_b and all(after[name].abs().sum() > 0 and before[name].abs().sum() == 0 for name in lora_b)
    finished = json.loads((adapter / "run_complete.json").read_text())
    assert math.isfinite(finished["metrics"]["train/train_loss"])
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"].endswith("base")
    config = json.loads((resumed_run["output_dir"] / "run_config.json").read_text())["settings"]
    assert config["QLoRAModelConfig.load_in_4bit"] is True
    # The last round's policy is also the run's output, loadable from output_dir like every recipe's.
    final = load_file(resumed_run["output_dir"] / "adapter_model.safetensors")
    assert all(torch.equal(final[name], after[name]) for name in after)


def test_scores_are_the_evaluation_suites_grader(resumed_run: dict, demo_dir: Path) -> None:
    answers = {}
    for line in (demo_dir / "data" / "prompts" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        answers[row["prompt"][-1]["content"]] = row["answer"]
    samples = [json.loads(line) for line in (resumed_run["output_dir"] / "round_1" / "samples.jsonl").open()]
    assert len(samples) == 16 * NUM_SAMPLES
    for s in samples:
        assert s["reward"] == float(grade(s["completion"], answers[s["prompt"]]))
    selected = [json.loads(line) for line in (resumed_run["output_dir"] / "round_1" / "selected.jsonl").open()]
    best = {p: max(s["reward"] for s in samples if s["prompt_id"] == p) for p in {s["prompt_id"] for s in samples}}
    assert len(selected) == 16 and all(s["reward"] == best[s["prompt_id"]] for s in selected)


def test_metrics_per_round_are_finite_and_logged(resumed_run: dict) -> None:
    rounds = resumed_run["result"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    for name in ("eval/gsm8k/accuracy", "eval/policy_reward/mean"):
        assert all(math.isfinite(r["metrics"][name]) for r in rounds)
    for name in (
        "rs/samples/reward_mean",
        "rs/samples/prompt_max_mean",
        "rs/selected/acceptance_rate",
        "rs/best_of_n/n_4",
    ):
        assert math.isfinite(rounds[1]["metrics"][name])
    assert rounds[1]["metrics"]["rs/best_of_n/n_4"] >= rounds[1]["metrics"]["rs/best_of_n/n_1"]
    wandb_id = json.loads((resumed_run["output_dir"] / "run_config.json").read_text())["wandb_id"]
    finished = json.loads((resumed_run["output_dir"] / "run_complete.json").read_text())
    assert finished["wandb"] and wandb_id in finished["wandb"]  # the relaunch continued the same W&B run
    assert list(Path(finished["wandb"]).glob("run-*.wandb"))


def test_relaunch_with_another_config_is_refused(resumed_run: dict, demo_dir: Path, start_policy: Path) -> None:
    output_dir = resumed_run["output_dir"]
    before = snapshot(output_dir)
    with pytest.raises(rundir.RoundStateError, match=r"num_samples: 4 -> 3"):
        main(rs_args(demo_dir, start_policy, output_dir, "--num_samples", "3"))
    assert snapshot(output_dir) == before


def test_nan_scorer_stops_the_next_round_and_leaves_earlier_ones(
    resumed_run: dict, demo_dir: Path, start_policy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output_dir = resumed_run["output_dir"]
    before = {k: v for k, v in snapshot(output_dir).items() if k.startswith(("round_0", "round_1"))}
    monkeypatch.setattr(
        rs_train, "build_scorer", lambda rs: lambda rows, completions: [float("nan")] * len(completions)
    )
    with pytest.raises(ScorerError, match="returned nan for sample 0"):
        main(rs_args(demo_dir, start_policy, output_dir, "--num_rounds", "2", "--report_to", "none"))
    after = snapshot(output_dir)
    assert {k: v for k, v in after.items() if k.startswith(("round_0", "round_1"))} == before
    assert "round_2/generations.jsonl" in after and "round_2/samples.jsonl" not in after


def test_iterative_dpo_round(
    demo_dir: Path, start_policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A scorer that prefers shorter answers always separates best from worst, so every prompt yields a pair.
    monkeypatch.setattr(
        rs_train, "build_scorer", lambda rs: lambda rows, completions: [100.0 - len(c) for c in completions]
    )
    output_dir = tmp_path / "dpo"
    extra = ["--method", "iterative_dpo", "--eval_tasks", "", "--eval_reward_samples", "0", "--report_to", "none"]
    result = main(rs_args(demo_dir, start_policy, output_dir, "--max_train_samples", "8", *extra))
    pairs = [json.loads(line) for line in (output_dir / "round_1" / "selected.jsonl").open()]
    assert pairs and all(p["chosen"]["reward"] > p["rejected"]["reward"] for p in pairs)
    finished = json.loads((output_dir / "round_1" / "adapter" / "run_complete.json").read_text())
    assert finished["stage"] == "iterative_dpo" and math.isfinite(finished["metrics"]["train/train_loss"])
    after = load_file(output_dir / "round_1" / "adapter" / "adapter_model.safetensors")
    assert any(after[name].abs().sum() > 0 for name in after if "lora_B" in name)
    assert result["rounds"][1]["metrics"]["rs/selected/pair_margin_mean"] > 0
