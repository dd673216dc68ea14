"""JSON Lines reading with field checks, and JSON / JSON Lines writes that a crash cannot leave half-written: what the
recipes, the evaluation suite and the scripts all read and write their records with."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipes.common.errors import UserError, demo_hint


class JsonlError(UserError):
    """A missing or malformed JSON Lines file; the message names the file, the line and what it needs."""


def read_jsonl(path: str | os.PathLike, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Read a JSON Lines file, failing on the first line that is not a JSON object or lacks a required field."""
    path = Path(path)
    if not path.is_file():
        raise JsonlError(f"File not found: {str(path)!r}.{demo_hint(path)}")
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise JsonlError(
                    f"{path}:{line_no}: not valid JSON ({err.msg}); each line must be one JSON object."
                ) from err
            if not isinstance(record, dict):
                raise JsonlError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}.")
            missing = [name for name in required if name not in record]
            if missing:
                raise JsonlError(
                    f"{path}:{line_no}: record lacks field(s) {missing} (has {sorted(record)}); every line needs "
                    f"{list(required)}."
                )
            records.append(record)
    if not records:
        raise JsonlError(f"{path} holds no records.")
    return records


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
