"""Dataset loading from files and directories, and column validation with messages that say how to fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes.common.data import DataError, load_split, load_train_eval, take, validate_columns

SFT_FORMATS = [["messages"], ["prompt", "completion"], ["text"]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_file_and_directory(tmp_path: Path) -> None:
    rows = [{"text": f"row {i}"} for i in range(5)]
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    write_jsonl(tmp_path / "d" / "test.jsonl", rows[:2])
    assert len(load_split(str(tmp_path / "d" / "train.jsonl"), "train")) == 5
    assert len(load_split(str(tmp_path / "d"), "test")) == 2


def test_missing_split_in_directory_lists_what_is_there(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d" / "train.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match=r"No 'validation' split.*train.jsonl"):
        load_split(str(tmp_path / "d"), "validation")


def test_nonexistent_local_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_split(str(tmp_path / "nope.jsonl"), "train")


def test_demo_path_hint() -> None:
    with pytest.raises(DataError, match="prepare_demo.py"):
        load_split("outputs/demo/data/does-not-exist", "train")


def test_missing_column_names_expected_formats(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}])
    dataset = load_split(str(tmp_path / "train.jsonl"), "train")
    with pytest.raises(DataError) as err:
        validate_columns(dataset, SFT_FORMATS, "Dataset 'x'", "SFT")
    message = str(err.value)
    assert "['answer', 'question']" in message and "prompt+completion" in message and "SFT" in message


def test_validate_returns_matching_format(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "completion": "c", "extra": 1}])
    dataset = load_split(str(tmp_path / "train.jsonl"), "train")
    assert validate_columns(dataset, SFT_FORMATS, "x", "SFT") == ["prompt", "completion"]


def test_load_train_eval_and_take(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": str(i)} for i in range(10)])
    write_jsonl(tmp_path / "test.jsonl", [{"text": str(i)} for i in range(3)])
    train, evaluation = load_train_eval(str(tmp_path), "train", "test", None, SFT_FORMATS, "SFT")
    assert len(train) == 10 and len(evaluation) == 3
    assert take(train, 4, seed=0)["text"] == take(train, 4, seed=0)["text"]  # seeded
    assert len(take(train, None, seed=0)) == 10


def test_no_dataset_given() -> None:
    with pytest.raises(DataError, match="dataset_name"):
        load_train_eval(None, "train", None, None, SFT_FORMATS, "SFT")
