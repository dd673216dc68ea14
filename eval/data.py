"""Small helpers shared by the tasks: the user-facing error type, jsonl reading with field checks, seeded subsets."""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from recipes.common.errors import UserError

T = TypeVar("T")


class EvalError(UserError):
    """A problem the user must fix (bad task name, missing file, malformed record); the message says what,
    where and how to fix it."""


def demo_hint(path: str | os.PathLike) -> str:
    return " Build the demo first: `python scripts/prepare_demo.py`." if "outputs/demo" in str(path) else ""


def read_jsonl(path: str | os.PathLike, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Read a JSON Lines file, failing on the first line that is not a JSON object or lacks a required field."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"File not found: {str(path)!r}.{demo_hint(path)}")
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(
                    f"{path}:{line_no}: not valid JSON ({err.msg}); each line must be one JSON object."
                ) from err
            if not isinstance(record, dict):
                raise EvalError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}.")
            missing = [name for name in required if name not in record]
            if missing:
                raise EvalError(
                    f"{path}:{line_no}: record lacks field(s) {missing} (has {sorted(record)}); every line needs "
                    f"{list(required)}."
                )
            records.append(record)
    if not records:
        raise EvalError(f"{path} holds no records.")
    return records


def seeded_subset(items: Sequence[T], size: int | None, seed: int) -> list[T]:
    """A fixed random subset (original order kept), so that every evaluation during training sees the same items."""
    if size is None or size >= len(items):
        return list(items)
    picked = sorted(random.Random(seed).sample(range(len(items)), size))
    return [items[i] for i in picked]


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON so that a crash leaves either the old file or the complete new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, ensure_ascii=False, allow_nan=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl_atomic(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
