"""Rejection-sampling bookkeeping without a model: resumable sharded work, the run-dir fingerprint, prompt and config
checks, and the GSM8K scorer being the evaluation suite's grader."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate import PartialState

import eval.gsm8k
from recipes.common.config import ConfigError
from recipes.common.data import DataError
from recipes.rejection_sampling import rundir, shards
from recipes.rejection_sampling.prompts import build_scorer, load_prompts
from recipes.rejection_sampling.train import main

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = REPO_ROOT / "recipes" / "rejection_sampling" / "config.yaml"


class Interrupted(Exception):
    pass


def test_sharded_work_resumes_with_only_unfinished_chunks(tmp_path: Path) -> None:
    items = [{"id": i} for i in range(10)]
    calls: list[list[int]] = []

    def work(chunk, fail_on=None):
        calls.append([it["id"] for it in chunk])
        if fail_on is not None and fail_on in calls[-1]:
            raise Interrupted
        return [[{"id": it["id"], "j": j} for j in range(2)] for it in chunk]

    out = tmp_path / "generations.jsonl"
    state = PartialState()
    with pytest.raises(Interrupted):
        shards.run_sharded(items, lambda it: str(it["id"]), lambda c: work(c, fail_on=7), out, 3, state)
    assert not out.exists() and calls == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    part = tmp_path / "generations.part-0.jsonl"
    with part.open("a") as handle:
        handle.write('{"key": "6", "recor')  # a line torn by the kill
    calls.clear()
    records = shards.run_sharded(items, lambda it: str(it["id"]), work, out, 3, state)
    assert calls == [[6, 7, 8], [9]]  # finished chunks are not redone
    assert [(r["id"], r["j"]) for r in records] == [(i, j) for i in range(10) for j in range(2)]
    assert not part.exists()
    calls.clear()
    assert shards.run_sharded(items, lambda it: str(it["id"]), work, out, 3, state) == records and calls == []


def config(**changes) -> dict:
    base = {
        "RecipeArguments": {"dataset_name": "prompts", "wandb_project": "p"},
        "RejectionSamplingArguments": {"num_samples": 4, "num_rounds": 2, "selection": "best_of_round"},
        "SFTConfig": {"learning_rate": 1e-4, "output_dir": "x", "logging_steps": 5},
    }
    for key, value in changes.items():
        section, name = key.split("__")
        base[section][name] = value
    return base


def test_run_dir_fingerprint_allows_more_rounds_but_not_another_config(tmp_path: Path) -> None:
    state = PartialState()
    out = tmp_path / "run"
    record = rundir.open_run_dir(str(out), config(), False, state)
    (out / "round_1").mkdir()
    rundir.start_round(out / "round_1", 1, record, {}, state)
    (out / "round_1" / "samples.jsonl").write_text("{}\n")
    # Bookkeeping settings (rounds, logging, output dir, W&B) may change on a relaunch.
    same = config(
        RejectionSamplingArguments__num_rounds=5, SFTConfig__logging_steps=1, RecipeArguments__wandb_project="q"
    )
    assert rundir.open_run_dir(str(out), same, False, state)["fingerprint"] == record["fingerprint"]
    changed = config(RejectionSamplingArguments__num_samples=8)
    with pytest.raises(rundir.RoundStateError, match=r"num_samples: 4 -> 8"):
        rundir.open_run_dir(str(out), changed, False, state)
    assert (out / "round_1" / "samples.jsonl").read_text() == "{}\n"
    # With overwrite the old rounds move aside, nothing is deleted.
    rundir.open_run_dir(str(out), changed, True, state)
    [backup] = list(out.glob("previous-*"))
    assert (backup / "round_1" / "samples.jsonl").read_text() == "{}\n" and not (out / "round_1").exists()


def test_round_dir_from_another_run_is_refused(tmp_path: Path) -> None:
    state = PartialState()
    first, second = tmp_path / "a", tmp_path / "b"
    record = rundir.open_run_dir(str(first), config(), False, state)
    rundir.open_run_dir(str(second), config(RejectionSamplingArguments__selection="best_of_all_rounds"), False, state)
    (first / "round_1").mkdir()
    rundir.start_round(first / "round_1", 1, record, {}, state)
    (first / "round_1").rename(second / "round_1")
    with pytest.raises(rundir.RoundStateError, match="different config"):
        rundir.open_run_dir(
            str(second), config(RejectionSamplingArguments__selection="best_of_all_rounds"), False, state
        )


def test_a_directory_that_is_not_a_run_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").write_text("weights")
    with pytest.raises(rundir.RoundStateError, match="not a rejection-sampling run dir"):
        rundir.open_run_dir(str(tmp_path), config(), False, PartialState())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors"]


class StubTokenizer:
    bos_token = "<s>"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "<s>" + "".join(m["content"] for m in messages) + "\nA:"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(range(len(text.split())))}


def write_prompts(directory: Path, rows: list[dict]) -> str:
    directory.mkdir()
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(directory)


def prompt_settings(**changes):
    settings = {"prompt_tasks": [], "scorer": "gsm8k"}
    settings.update(changes)
    return SimpleNamespace(**settings)


def test_prompts_are_filtered_and_checked(tmp_path: Path) -> None:
    rows = [
        {"prompt": [{"role": "user", "content": "1+1?"}], "answer": "#### 2", "task": "math"},
        {"prompt": [{"role": "user", "content": "Hi"}], "answer": "", "task": "chat"},
    ]
    data = SimpleNamespace(dataset_name=write_prompts(tmp_path / "p", rows), dataset_config=None)
    prompts = load_prompts(data, prompt_settings(prompt_tasks=["math"]), "train", None, StubTokenizer(), 0)
    assert [(p["prompt_id"], p["user"], p["answer"], p["text"]) for p in prompts] == [
        (0, "1+1?", "#### 2", "<s>1+1?\nA:")
    ]
    with pytest.raises(DataError, match=r"1 of 2 prompts have no reference `answer`.*prompt_tasks"):
        load_prompts(data, prompt_settings(), "train", None, StubTokenizer(), 0)
    assert len(load_prompts(data, prompt_settings(scorer="reward_model"), "train", None, StubTokenizer(), 0)) == 2
    with pytest.raises(DataError, match=r"holds no prompts of tasks \['unsafe'\]"):
        load_prompts(data, prompt_settings(prompt_tasks=["unsafe"]), "train", None, StubTokenizer(), 0)


def test_gsm8k_scorer_is_the_evaluation_suites_grader(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_grade = eval.gsm8k.grade

    def spy(completion: str, reference: str, mode: str = "flexible") -> bool:
        calls.append((completion, reference, mode))
        return real_grade(completion, reference, mode)

    monkeypatch.setattr(eval.gsm8k, "grade", spy)
    scorer = build_scorer(SimpleNamespace(scorer="gsm8k", grader_mode="strict"))
    rows = [{"answer": "3+4=7\n#### 7"}, {"answer": "#### 1,000"}]
    assert scorer(rows, ["so #### 7", "#### 999"]) == [1.0, 0.0]
    assert calls == [("so #### 7", "3+4=7\n#### 7", "strict"), ("#### 999", "#### 1,000", "strict")]


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--num_samples", "0"], "num_samples must be >= 1"),
        (["--selection", "best_ever"], "selection: 'best_ever' is not one of"),
        (["--method", "iterative_dpo", "--num_samples", "1"], "num_samples must be >= 2"),
        (["--temperatures", "1.0", "0"], "temperatures must be positive"),
        (["--scorer", "combined", "--reward_model_path", "rm"], "safety_reward_model_path"),
        (["--eval_strategy", "steps"], "eval_strategy: no"),
        (["--generation_backend", "vllm"], "vllm"),
    ],
)
def test_bad_settings_fail_before_anything_loads(tmp_path: Path, flags: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        main(["--config", str(CONFIG), "--output_dir", str(tmp_path / "run"), *flags])
    assert not (tmp_path / "run").exists()
