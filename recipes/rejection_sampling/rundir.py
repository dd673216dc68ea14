"""The run directory: its layout, the config fingerprint that guards it, and the record of each round.

The rounds of rejection sampling as files on disk, so that a killed run continues where it stopped:

    <output_dir>/run_config.json          config fingerprint (a relaunch with another config is an error), W&B run id
    <output_dir>/round_0/eval.json        the starting (SFT) policy, evaluated like every round
    <output_dir>/round_<k>/round.json     the round's fingerprint, temperature and policies
                          generations.jsonl   N samples per prompt from policy k-1 (per-rank `.part-*` files while
                                              under way: finished prompts are kept, an interrupted one is redone)
                          samples.jsonl       the same samples with their scores
                          selected.jsonl      what is kept (SFT rows, or chosen/rejected pairs for iterative DPO)
                          selection.json      reward, acceptance, best-of-N, length and diversity statistics
                          adapter/            the round's policy (checkpoints while training; run_complete.json when
                                              done)
                          eval.json           the evaluation suite and the held-out reward of the round's policy

A stage runs only when its file is missing; every file is written atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from accelerate import PartialState

from recipes.common.errors import UserError
from recipes.common.files import write_json_atomic

RUN_CONFIG = "run_config.json"
ROUND_RECORD = "round.json"
# Settings that change how a run is logged or how fast it goes, never what a round produces.
NOT_FINGERPRINTED = {
    "output_dir", "run_name", "report_to", "overwrite_output_dir", "num_rounds", "generation_batch_size",
    "wandb_project", "wandb_entity", "wandb_group", "wandb_tags", "parent_run", "disable_tqdm", "log_table_prompts",
    "resume_from_checkpoint", "logging_dir", "push_to_hub", "per_device_eval_batch_size", "dataloader_num_workers",
}  # fmt: skip
NOT_FINGERPRINTED_PREFIXES = ("logging_", "save_", "hub_", "eval_steps", "ddp_")


class RoundStateError(UserError):
    """The output dir holds rounds this config did not produce; the message says what differs and how to proceed."""


def fingerprinted(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The settings that decide what the rounds produce, flattened to `section.key`."""
    flat = {}
    for section, values in config.items():
        for key, value in values.items():
            if key in NOT_FINGERPRINTED or key.startswith(NOT_FINGERPRINTED_PREFIXES):
                continue
            flat[f"{section}.{key}"] = value
    return flat


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys[:8]]
    return "; ".join(shown) + (f"; and {len(keys) - 8} more" if len(keys) > 8 else "")


def round_dir(output_dir: str | Path, k: int) -> Path:
    return Path(output_dir) / f"round_{k}"


def open_run_dir(output_dir: str, config: dict[str, dict[str, Any]], overwrite: bool, state: PartialState) -> dict:
    """Create or reopen the run directory; returns its record ({"fingerprint", "settings", "wandb_id", ...}).

    A run dir written with other settings is an error naming the differences, unless `overwrite` (then the old
    contents move to `previous-<time>/` inside it: nothing is deleted). Checked on every rank, written by the main.
    """
    path = Path(output_dir)
    record_file = path / RUN_CONFIG
    settings = fingerprinted(config)
    current = fingerprint(settings)
    if state.is_main_process:
        if record_file.is_file():
            record = json.loads(record_file.read_text())
            if record["fingerprint"] != current:
                if not overwrite:
                    raise RoundStateError(
                        f"{output_dir} holds rounds made with another config ({_differences(record['settings'], settings)}). "
                        "Relaunch with the same settings to continue it, choose another `--output_dir`, or pass "
                        "`--overwrite_output_dir true` (the old rounds are moved to previous-<time>/ inside it)."
                    )
                _set_aside(path)
        elif path.is_dir() and any(p.name != "wandb" for p in path.iterdir()):
            raise RoundStateError(
                f"{output_dir} is not empty and holds no {RUN_CONFIG}: it is not a rejection-sampling run dir. "
                "Choose another `--output_dir` (nothing in this one was touched)."
            )
        if not record_file.is_file():
            import uuid

            record = {"fingerprint": current, "settings": settings, "wandb_id": uuid.uuid4().hex[:8]}
            record["created_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            write_json_atomic(record_file, record)
    state.wait_for_everyone()
    record = json.loads(record_file.read_text())
    for existing in sorted(path.glob("round_*/" + ROUND_RECORD)):
        if json.loads(existing.read_text()).get("fingerprint") != record["fingerprint"]:
            raise RoundStateError(
                f"{existing.parent} was made by a different config than {record_file} (fingerprints differ): it was "
                "copied or mixed in from another run. Move it out of this run dir, or use another `--output_dir`."
            )
    return record


def _set_aside(path: Path) -> None:
    backup = path / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    backup.mkdir()
    for item in path.iterdir():
        if item.name.startswith(("round_", RUN_CONFIG, "run_complete")):
            shutil.move(str(item), backup / item.name)
    print(f"[rejection_sampling] overwrite_output_dir: earlier rounds moved to {backup}", flush=True)


def start_round(path: Path, k: int, record: dict, details: dict[str, Any], state: PartialState) -> None:
    if state.is_main_process and not (path / ROUND_RECORD).is_file():
        write_json_atomic(path / ROUND_RECORD, {"round": k, "fingerprint": record["fingerprint"], **details})
    state.wait_for_everyone()


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
