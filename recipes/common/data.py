"""Dataset loading from a hub name, a local jsonl/json/parquet/csv file or a directory, with format validation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets
from datasets import Dataset

from recipes.common.errors import UserError, demo_hint

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(UserError):
    """A data problem the user must fix; the message says what, where and how."""


def _looks_local(name: str) -> bool:
    # Hub ids are `name` or `org/name`; anything with a file suffix or deeper nesting is a path.
    return name.startswith((".", "/", "~")) or name.count("/") >= 2 or Path(name).suffix in LOCAL_SUFFIXES


def _split_file(directory: Path, split: str) -> Path | None:
    for suffix in LOCAL_SUFFIXES:
        candidate = directory / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load_split(name_or_path: str, split: str, config_name: str | None = None) -> Dataset:
    """Load one split.

    - a file (`.jsonl`, `.json`, `.parquet`, `.csv`): the whole file is the split;
    - a directory: `<split>.jsonl` (or .json/.parquet/.csv) inside it, or a `save_to_disk` dataset;
    - anything else: a hub dataset name, loaded with `datasets.load_dataset(name, config_name, split=split)`.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        builder = LOCAL_SUFFIXES.get(path.suffix)
        if builder is None:
            raise DataError(f"Dataset file {path} has an unsupported suffix; use one of {sorted(LOCAL_SUFFIXES)}.")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    if path.is_dir():
        split_file = _split_file(path, split)
        if split_file is not None:
            return load_split(str(split_file), split)
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        found = sorted(p.name for p in path.iterdir())[:10]
        raise DataError(
            f"No '{split}' split in directory {path}: expected {split}.jsonl, {split}.parquet, {split}.json or "
            f"{split}.csv (found {found}). Point the config at the file itself or rename it."
        )
    if _looks_local(name_or_path):
        raise DataError(f"Dataset path does not exist: {name_or_path!r}.{demo_hint(name_or_path)}")
    try:
        return datasets.load_dataset(name_or_path, config_name, split=split)
    except Exception as err:  # the hub raises many different types; the message below is what the user needs
        raise DataError(
            f"Could not load hub dataset {name_or_path!r} (config={config_name!r}, split={split!r}): {err}\n"
            "Check the name and split, your network and HF_TOKEN, or pass a local .jsonl/.parquet path."
        ) from err


def validate_columns(dataset: Dataset, accepted: Sequence[Sequence[str]], where: str, recipe: str) -> list[str]:
    """Check the dataset has one of the accepted column sets; returns the first matching set.

    `accepted` lists alternatives, e.g. `[["messages"], ["prompt", "completion"], ["text"]]`.
    """
    columns = set(dataset.column_names)
    for option in accepted:
        if set(option) <= columns:
            return list(option)
    expected = " | ".join("+".join(option) for option in accepted)
    raise DataError(
        f"{where} has columns {sorted(columns)}, but the {recipe} recipe needs one of: {expected}. "
        "Rename the columns (e.g. `dataset.rename_column(...)`) or pick a dataset in one of TRL's standard formats."
    )


def take(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded subset of at most `limit` rows (the whole dataset when `limit` is None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))


def load_train_eval(
    name_or_path: str | None,
    train_split: str,
    eval_split: str | None,
    config_name: str | None,
    accepted: Sequence[Sequence[str]],
    recipe: str,
    eval_name_or_path: str | None = None,
) -> tuple[Dataset, Dataset | None]:
    """Load and validate the train split and (optionally) the eval split."""
    if not name_or_path:
        raise DataError(f"No dataset given: set `dataset_name` in the {recipe} config (hub name or local path).")
    train = load_split(name_or_path, train_split, config_name)
    validate_columns(train, accepted, f"Dataset {name_or_path!r} (split {train_split!r})", recipe)
    if not eval_split:
        return train, None
    eval_source = eval_name_or_path or name_or_path
    evaluation = load_split(eval_source, eval_split, config_name)
    validate_columns(evaluation, accepted, f"Dataset {eval_source!r} (split {eval_split!r})", recipe)
    return train, evaluation
