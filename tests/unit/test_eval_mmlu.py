"""MMLU: the CSV loader (the shared hendrycks files and a hand-made layout), the exact prompt text, scoring."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from eval.data import EvalError
from eval.mmlu import Question, build_prompt, letter_from_completion, load_mmlu, score

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_MMLU = REPO_ROOT.parent / "shared" / "data" / "mmlu"


@pytest.mark.skipif(not (SHARED_MMLU / "dev").is_dir(), reason="../shared/data/mmlu is not here")
def test_shared_mmlu_loads_with_exact_prompt() -> None:
    dev, questions, split = load_mmlu(str(SHARED_MMLU))
    assert split == "val"  # there is no test split in shared/, so the loader falls back to val
    assert len(dev) == 57 and all(len(rows) == 5 for rows in dev.values())
    assert sum(len(rows) for rows in questions.values()) == 1531
    question = questions["anatomy"][0]
    prompt = build_prompt(question, dev["anatomy"])
    assert prompt.startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "What is the embryological origin of the hyoid bone?\n"
        "A. The first pharyngeal arch\n"
        "B. The first and second pharyngeal arches\n"
        "C. The second pharyngeal arch\n"
        "D. The second and third pharyngeal arches\n"
        "Answer: D\n\n"
        "Which of these branches of the trigeminal nerve contain somatic motor processes?\n"
    )
    assert prompt.endswith(
        "Which of the following terms describes the body's ability to maintain its normal state?\n"
        "A. Anabolism\nB. Catabolism\nC. Tolerance\nD. Homeostasis\nAnswer:"
    )
    assert prompt.count("\nAnswer: ") == 5
    # Subjects with underscores read as words in the header.
    header = build_prompt(questions["high_school_biology"][0], dev["high_school_biology"]).split("\n")[0]
    assert header == "The following are multiple choice questions (with answers) about high school biology."


def _write(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)


def test_csv_layout_with_quoted_commas_and_newlines(tmp_path: Path) -> None:
    _write(tmp_path / "dev" / "toy_topic_dev.csv", [["Pick, please:\nwhich?", "1", "2", "3", "4", "B"]])
    _write(tmp_path / "test" / "toy_topic_test.csv", [["  What is 2+2?  ", "3", "4", "5", "6", "B"]])
    dev, questions, split = load_mmlu(str(tmp_path))
    assert split == "test"
    assert dev["toy_topic"][0].question == "Pick, please:\nwhich?"
    prompt = build_prompt(questions["toy_topic"][0], dev["toy_topic"])
    assert prompt == (
        "The following are multiple choice questions (with answers) about toy topic.\n\n"
        "Pick, please:\nwhich?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )


def test_directory_without_dev_files_fails(tmp_path: Path) -> None:
    _write(tmp_path / "test" / "toy_test.csv", [["q", "1", "2", "3", "4", "A"]])
    with pytest.raises(EvalError, match="no dev files"):
        load_mmlu(str(tmp_path))


def test_bad_rows_fail_with_location(tmp_path: Path) -> None:
    _write(tmp_path / "dev" / "toy_dev.csv", [["q", "1", "2", "3", "4", "A"]])
    _write(tmp_path / "test" / "toy_test.csv", [["q", "1", "2", "3", "4", "E"]])
    with pytest.raises(EvalError, match=r"toy_test.csv, row 1.*'E'"):
        load_mmlu(str(tmp_path))
    _write(tmp_path / "test" / "toy_test.csv", [["question", "A", "B", "C", "D"]])
    with pytest.raises(EvalError, match="expected 6 columns"):
        load_mmlu(str(tmp_path))


def test_missing_directory_names_the_fix() -> None:
    with pytest.raises(EvalError, match="prepare_demo"):
        load_mmlu("outputs/demo/data/no_mmlu_here")


def test_micro_and_macro_accuracy() -> None:
    questions = [Question("a", "q", ["1"] * 4, 0)] * 3 + [Question("b", "q", ["1"] * 4, 1)]
    metrics = score([0, 0, 1, 0], questions)  # subject a: 2/3, subject b: 0/1
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["accuracy_macro"] == pytest.approx((2 / 3 + 0) / 2)
    assert metrics["subjects"] == {"a": {"accuracy": pytest.approx(2 / 3), "n": 3}, "b": {"accuracy": 0.0, "n": 1}}


def test_letter_from_completion() -> None:
    assert letter_from_completion(" B. because") == 1
    assert letter_from_completion("The answer is (D)") == 3
    assert letter_from_completion("I am not sure") is None
