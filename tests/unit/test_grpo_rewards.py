"""GRPO reward functions: the GSM8K grader is the evaluation suite's own, rewards line up with completions, and a
misbehaving reward function is caught with its name."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import eval.gsm8k
from recipes.grpo import rewards
from recipes.grpo.rewards import RewardFunctionError, build_reward_functions, checked, preflight

SOLUTION = "Tom has 3 + 4 = 7 apples.\n#### 7"


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[UNK]")


def test_grader_is_the_eval_suites_own() -> None:
    assert rewards.grade is eval.gsm8k.grade
    assert rewards.completion_text is eval.gsm8k.completion_text


def test_correctness_grades_each_completion_against_its_own_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def spy(completion: str, reference: str, mode: str = "flexible") -> bool:
        calls.append((completion, reference, mode))
        return eval.gsm8k.grade(completion, reference, mode)

    monkeypatch.setattr(rewards, "grade", spy)
    completions = [chat("3 + 4 = 7\n#### 7"), chat("#### 8"), chat("I think 12"), chat("anything")]
    answers = [SOLUTION, SOLUTION, "5 + 7 = 12\n#### 12", ""]  # the last row has no reference (a chat prompt)
    (function,) = build_reward_functions(["correctness"], correctness_mode="strict")
    values = function(prompts=[[{}]] * 4, completions=completions, completion_ids=[[1]] * 4, answer=answers)
    assert values == [1.0, 0.0, 0.0, None]  # "I think 12" has the right number but no "#### " (strict mode)
    assert calls == [
        ("3 + 4 = 7\n#### 7", SOLUTION, "strict"),
        ("#### 8", SOLUTION, "strict"),
        ("I think 12", "5 + 7 = 12\n#### 12", "strict"),
    ]
    (flexible,) = build_reward_functions(["correctness"])
    assert flexible(prompts=[""], completions=["I think 12"], answer=["#### 12"]) == [1.0]


def test_format_reward() -> None:
    texts = ["3 + 4 = 7\n#### 7", "#### 1,000", "#### 7\nmore text", "7", "#### 7\n#### 8", "  #### -3  "]
    assert rewards.format_reward(prompts=[""] * 6, completions=[chat(t) for t in texts]) == [1, 1, 0, 0, 0, 1]
    assert rewards.format_reward(prompts=[""], completions=["#### 7"]) == [1.0]  # plain-text completions too


def test_length_penalty_is_zero_up_to_the_target_then_linear() -> None:
    function = rewards.length_penalty(target_tokens=10, max_tokens=30)
    ids = [[0] * n for n in (5, 10, 20, 30, 40)]
    assert function(prompts=[""] * 5, completions=[""] * 5, completion_ids=ids) == [-0.0, -0.0, -0.5, -1.0, -1.0]


def test_wrong_number_of_rewards_names_the_function() -> None:
    def two_short(prompts, completions, **kwargs):
        return [1.0] * (len(completions) - 2)

    function = checked(two_short, "two_short")
    assert function.__name__ == "two_short"  # TRL logs rewards/<__name__>/mean
    with pytest.raises(RewardFunctionError, match=r"'two_short' returned 2 values for 4 completions"):
        function(prompts=[""] * 4, completions=[""] * 4, completion_ids=[[]] * 4)


@pytest.mark.parametrize("bad", [float("nan"), "1.0", math.inf])
def test_non_numeric_or_non_finite_rewards_are_errors(bad) -> None:
    function = checked(lambda prompts, completions, **kw: [0.0, bad], "bad")
    with pytest.raises(RewardFunctionError, match="'bad' returned"):
        function(prompts=["", ""], completions=["", ""], completion_ids=[[], []])


def test_unknown_or_missing_functions_are_config_errors() -> None:
    with pytest.raises(RewardFunctionError, match=r"Unknown reward function\(s\) \['accuracy'\]"):
        build_reward_functions(["correctness", "accuracy"])
    with pytest.raises(RewardFunctionError, match="no reward model is configured"):
        build_reward_functions(["rm"])
    with pytest.raises(RewardFunctionError, match="Cannot import reward function 'nowhere.mod:fn'"):
        build_reward_functions(["nowhere.mod:fn"])
    with pytest.raises(RewardFunctionError, match="twice"):
        build_reward_functions(["format", "format"])


def test_user_reward_function_by_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer) -> None:
    (tmp_path / "my_rewards.py").write_text(
        "def short(prompts, completions, completion_ids, **kwargs):\n"
        "    return [1.0 if len(ids) < 3 else 0.0 for ids in completion_ids]\n"
        "def broken(prompts, completions, completion_ids, **kwargs):\n"
        "    return [1.0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "q"}], "answer": SOLUTION}] * 3)
    functions = build_reward_functions(["correctness", "my_rewards:short"])
    assert [f.__name__ for f in functions] == ["correctness", "short"]
    preflight(functions, dataset, tokenizer)
    broken = build_reward_functions(["my_rewards:broken"])
    with pytest.raises(RewardFunctionError, match="'broken' returned 1 values for 4 completions"):
        preflight(broken, dataset, tokenizer)
    sys.modules.pop("my_rewards", None)


def test_preflight_calls_with_trl_arguments(tokenizer) -> None:
    seen = {}

    def record(prompts, completions, completion_ids, answer, level, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer)
        return [0.0] * len(completions)

    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "answer": f"#### {i}", "level": i} for i in range(3)]
    preflight([checked(record, "record")], Dataset.from_list(rows), tokenizer)
    assert seen["answer"] == ["#### 0", "#### 0", "#### 1", "#### 1"]  # columns repeated per completion, like TRL
    assert seen["prompts"][0] == rows[0]["prompt"] and seen["prompts"][2] == rows[1]["prompt"]
    assert seen["completions"][0] == chat("#### 0")
    assert len(seen["completion_ids"]) == 4 and all(isinstance(i, list) for i in seen["completion_ids"])
