"""Output-dir safety: a finished run is never overwritten silently, an interrupted one resumes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers.trainer_utils import get_last_checkpoint

from recipes.common.errors import UserError

FINISHED_MARKER = "run_complete.json"


class OutputDirError(UserError):
    """The output dir holds something we must not overwrite; the message says how to proceed."""


def prepare_output_dir(output_dir: str, overwrite: bool, resume_from_checkpoint: str | bool | None) -> str | None:
    """Decide how to use `output_dir` before any work starts; returns the checkpoint to resume from, if any.

    - holds a finished run (`run_complete.json`): error, unless `overwrite_output_dir` (files are then replaced as
      the new run writes them; nothing is deleted up front);
    - holds `checkpoint-*` dirs from an interrupted run: resume from the last one;
    - otherwise: start fresh.
    """
    path = Path(output_dir)
    marker = path / FINISHED_MARKER
    if marker.is_file() and not overwrite:
        finished_at = json.loads(marker.read_text()).get("finished_at", "an earlier run")
        raise OutputDirError(
            f"output_dir {output_dir!r} holds a finished run (finished {finished_at}). Choose another "
            "`--output_dir`, or pass `--overwrite_output_dir true` to train into it again (its files are replaced "
            "as the new run writes them)."
        )
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint:
        if not Path(resume_from_checkpoint).is_dir():
            raise OutputDirError(f"resume_from_checkpoint {resume_from_checkpoint!r} is not a directory.")
        return resume_from_checkpoint
    if path.is_dir() and not (marker.is_file() and overwrite):
        last = get_last_checkpoint(str(path))
        if last is not None:
            print(f"[recipes] Resuming the interrupted run in {output_dir} from {last}", flush=True)
            return last
    return None


def mark_finished(output_dir: str, summary: dict[str, Any]) -> Path:
    """Write the marker that says this output dir holds a complete run (and what it produced)."""
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / FINISHED_MARKER
    payload = {"finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), **summary}
    marker.write_text(json.dumps(payload, indent=2, default=str))
    return marker
