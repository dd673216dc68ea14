"""Output-dir safety: finished runs are protected, interrupted runs resume, nothing is deleted."""

from __future__ import annotations

from pathlib import Path

import pytest

from recipes.common.outputs import OutputDirError, mark_finished, prepare_output_dir


def test_fresh_dir_starts_fresh(tmp_path: Path) -> None:
    assert prepare_output_dir(str(tmp_path / "new"), overwrite=False, resume_from_checkpoint=None) is None


def test_finished_run_is_protected(tmp_path: Path) -> None:
    mark_finished(str(tmp_path), {"stage": "sft"})
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    with pytest.raises(OutputDirError, match="overwrite_output_dir"):
        prepare_output_dir(str(tmp_path), overwrite=False, resume_from_checkpoint=None)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == b"weights"  # nothing deleted
    assert prepare_output_dir(str(tmp_path), overwrite=True, resume_from_checkpoint=None) is None
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_interrupted_run_resumes_from_last_checkpoint(tmp_path: Path) -> None:
    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert prepare_output_dir(str(tmp_path), overwrite=False, resume_from_checkpoint=None).endswith("checkpoint-10")


def test_explicit_checkpoint_must_exist(tmp_path: Path) -> None:
    with pytest.raises(OutputDirError, match="not a directory"):
        prepare_output_dir(str(tmp_path), overwrite=False, resume_from_checkpoint=str(tmp_path / "nope"))
