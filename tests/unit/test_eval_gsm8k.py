"""GSM8K: the grader on known strings, the train set graded against itself, prompts, data loading errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.data import EvalError
from eval.gsm8k import (
    build_prompts,
    chat_prompt,
    correctness_reward,
    extract_flexible,
    extract_strict,
    fewshot_prompt,
    grade,
    load_gsm8k,
    normalize_number,
    reference_answer,
    score,
)
from eval.testing import build_char_tokenizer
from recipes.common.files import JsonlError

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_GSM8K = REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("She pays 3 + 4 = 7 dollars.\n#### 7", "7", "7"),
        ("#### -12", "-12", "-12"),
        ("The total is $1,234.", None, "$1,234."),
        ("first #### 5 then 9", "5", "9"),  # strict takes the first "#### ", flexible the last number
        ("It is 42 ...", None, "42"),  # a run of dots carries no number and is skipped
        ("no numbers here", None, None),
        ("", None, None),
    ],
)
def test_extraction(text: str, strict: str | None, flexible: str | None) -> None:
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


@pytest.mark.parametrize(
    ("completion", "reference", "mode", "expected"),
    [
        ("#### 1,000", "Work...\n#### 1000", "strict", True),  # commas ignored
        ("The answer is $18.", "#### 18", "flexible", True),  # `$` and the trailing period ignored
        ("#### 18.00", "#### 18", "strict", True),  # numbers compare by value
        ("#### +5", "#### 5", "strict", True),  # a leading + is no different answer
        ("#### -5", "#### 5", "strict", False),  # but a sign is
        ("So the loss is -3.", "#### -3", "flexible", True),
        ("The answer is 18", "#### 18", "strict", False),  # strict needs "#### "
        ("The answer is 18", "#### 18", "flexible", True),
        ("#### 17", "#### 18", "strict", False),
        ("I don't know", "#### 18", "flexible", False),  # no answer at all
        ("#### 18", "18", "strict", True),  # a bare reference number works too
        ("#### 0.5", "#### .5", "strict", True),
    ],
)
def test_grade(completion: str, reference: str, mode: str, expected: bool) -> None:
    assert grade(completion, reference, mode) is expected


def test_grade_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="strict"):
        grade("#### 1", "#### 1", mode="lenient")


def test_normalize_and_reference() -> None:
    assert normalize_number("$1,000.00.") == "1000"
    assert normalize_number("-0") == "0"
    assert normalize_number("2.50") == "2.5"
    assert reference_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert reference_answer(" 72 ") == "72"


@pytest.mark.skipif(not SHARED_GSM8K.is_file(), reason="../shared/data/gsm8k/train.jsonl is not here")
def test_every_train_reference_grades_correct_against_itself() -> None:
    records = [json.loads(line) for line in SHARED_GSM8K.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(records) == 7473
    for record in records:
        assert grade(record["answer"], record["answer"], "strict"), record["answer"][-60:]
        assert grade(record["answer"], record["answer"], "flexible"), record["answer"][-60:]


def test_score_names_and_values() -> None:
    metrics = score(["#### 5", "it is 7", "nothing"], ["#### 5", "#### 7", "#### 3"])
    assert metrics == {
        "exact_match_strict": pytest.approx(1 / 3),
        "exact_match_flexible": pytest.approx(2 / 3),
        "accuracy": pytest.approx(2 / 3),
        "n": 3,
    }


def test_correctness_reward_for_grpo() -> None:
    completions = [[{"role": "assistant", "content": "so #### 4"}], "the answer is 5", "#### 6"]
    rewards = correctness_reward(["p"] * 3, completions, answer=["#### 4", "#### 4", "#### 6"])
    assert rewards == [1.0, 0.0, 1.0]


def test_fewshot_prompt_is_lm_eval_format() -> None:
    exemplars = [{"question": "1+1?", "answer": "1+1=2\n#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    prompt = fewshot_prompt("3+3?", exemplars, num_fewshot=2)
    assert (
        prompt == "Question: 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: 2+2?\nAnswer: #### 4\n\nQuestion: 3+3?\nAnswer:"
    )
    # The question itself is never its own exemplar.
    assert "Question: 1+1?\nAnswer: 1+1" not in fewshot_prompt(
        "1+1?", exemplars + [{"question": "x", "answer": "y"}], 2
    )


def test_chat_prompt_and_missing_template() -> None:
    tokenizer = build_char_tokenizer()
    assert chat_prompt(tokenizer, "3+3?") == "<|user|>\n3+3?</s>\n<|assistant|>\n"
    with pytest.raises(EvalError, match="no chat template"):
        chat_prompt(build_char_tokenizer(chat_template=False), "3+3?")
    with pytest.raises(EvalError, match="exemplars"):
        build_prompts([{"question": "q", "answer": "#### 1"}], tokenizer, exemplars=None, num_fewshot=5)


def test_load_gsm8k_layouts_and_errors(tmp_path: Path) -> None:
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    assert load_gsm8k(str(tmp_path), "test")[0]["question"] == "q"
    assert load_gsm8k(str(tmp_path / "test.jsonl"))[0]["answer"] == "#### 1"
    with pytest.raises(EvalError, match="no train.jsonl"):
        load_gsm8k(str(tmp_path), "train")
    with pytest.raises(EvalError, match="prepare_demo"):
        load_gsm8k("outputs/demo/data/nowhere")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(JsonlError, match=r"bad.jsonl:1.*'answer'"):  # recipes.common.files
        load_gsm8k(str(tmp_path / "bad.jsonl"))
