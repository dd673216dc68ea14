"""Work split across processes in chunks, each finished chunk appended to a per-rank part file, so a relaunch
redoes only what is unfinished."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState

from recipes.common.files import read_jsonl, write_jsonl_atomic


def _read_parts(parts: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    """Finished items of earlier (possibly killed) attempts: one JSON line per item; a torn last line is ignored."""
    done: dict[str, list[dict[str, Any]]] = {}
    for part in parts:
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue  # only ever the line a kill interrupted
            done[item["key"]] = item["records"]
    return done


def _repair(part: Path) -> None:
    """Drop a line torn by a kill, so that appending starts on a fresh line."""
    if part.is_file() and part.stat().st_size and not part.read_bytes().endswith(b"\n"):
        text = part.read_text(encoding="utf-8")
        part.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")


def _append(part: Path, key: str, records: list[dict[str, Any]]) -> None:
    with part.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"key": key, "records": records}, ensure_ascii=False) + "\n")


def run_sharded(
    items: Sequence[dict[str, Any]],
    key: Callable[[dict[str, Any]], str],
    work: Callable[[list[dict[str, Any]]], list[list[dict[str, Any]]]],
    out_path: Path,
    chunk_size: int,
    state: PartialState,
) -> list[dict[str, Any]]:
    """`work` on every item, split across processes (item i goes to rank i % world size) in chunks, returning the
    records of all items in item order from `out_path` (written by the main process once all ranks are done).

    `work(chunk)` returns one list of records per item. Each finished chunk is appended to this rank's part file,
    one line per item, so a relaunch redoes only unfinished chunks. Chunks are the same on a relaunch with the same
    number of processes, so a redone chunk (with its seed) gives what the uninterrupted run would have given.
    """
    if not out_path.is_file():
        parts = sorted(out_path.parent.glob(f"{out_path.stem}.part-*.jsonl"))
        done = _read_parts(parts)
        mine = [it for i, it in enumerate(items) if i % state.num_processes == state.process_index]
        part = out_path.with_name(f"{out_path.stem}.part-{state.process_index}.jsonl")
        _repair(part)
        for start in range(0, len(mine), chunk_size):
            chunk = mine[start : start + chunk_size]
            if all(key(it) in done for it in chunk):
                continue
            for item, records in zip(chunk, work(chunk), strict=True):
                if key(item) not in done:
                    _append(part, key(item), records)
        state.wait_for_everyone()
        if state.is_main_process:
            parts = sorted(out_path.parent.glob(f"{out_path.stem}.part-*.jsonl"))
            done = _read_parts(parts)
            missing = [key(it) for it in items if key(it) not in done]
            if missing:
                raise RuntimeError(f"{out_path}: {len(missing)} items have no records (first: {missing[0]}).")
            write_jsonl_atomic(out_path, [r for it in items for r in done[key(it)]])
            for part in parts:
                part.unlink()
        state.wait_for_everyone()
    return read_jsonl(out_path)
