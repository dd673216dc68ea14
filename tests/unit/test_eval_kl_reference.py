"""Which reference `python -m eval --tasks reward` measures KL against: the policy's starting point from its run's
lineage (run_complete.json), `--ref_model PATH`, or `--ref_model base` (adapter disabled); never silently the base
model of an adapter that was trained from an SFT adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.data import EvalError
from eval.reward_kl import resolve_kl_reference


def adapter_dir(path: Path, base: Path, lineage: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    if lineage is not None:
        (path / "run_complete.json").write_text(json.dumps(lineage))
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    return tmp_path / "base"


def test_the_start_model_recorded_by_the_recipe(tmp_path: Path, base: Path) -> None:
    sft = adapter_dir(tmp_path / "sft", base, {"stage": "sft"})
    ppo = adapter_dir(tmp_path / "ppo", base, {"stage": "ppo", "start_model": str(sft), "parent_run": None})
    reference = resolve_kl_reference(str(ppo), None, None)
    assert reference.path == str(sft) and not reference.adapter_disabled
    assert str(sft) in reference.description and "run_complete.json" in reference.description


def test_parent_run_when_no_start_model_is_recorded(tmp_path: Path, base: Path) -> None:
    sft = adapter_dir(tmp_path / "sft", base, {"stage": "sft"})
    dpo = adapter_dir(tmp_path / "dpo", base, {"stage": "dpo", "parent_run": str(sft)})
    assert resolve_kl_reference(str(dpo), None, None).path == str(sft)


def test_an_sft_adapter_starts_from_its_base(tmp_path: Path, base: Path) -> None:
    sft = adapter_dir(tmp_path / "sft", base, {"stage": "sft"})
    reference = resolve_kl_reference(str(sft), None, None)
    assert reference.adapter_disabled and reference.path is None
    # Likewise an adapter whose recorded start is its own base: no second copy, the adapter is switched off.
    grpo = adapter_dir(tmp_path / "grpo", base, {"stage": "grpo", "start_model": str(base)})
    assert resolve_kl_reference(str(base), str(grpo), None).adapter_disabled


def test_an_adapter_without_lineage_needs_ref_model(tmp_path: Path, base: Path) -> None:
    policy = adapter_dir(tmp_path / "policy", base)
    with pytest.raises(EvalError) as err:
        resolve_kl_reference(str(policy), None, None)
    message = str(err.value)
    assert "--ref_model" in message and "--ref_model base" in message and str(policy) in message


def test_explicit_references(tmp_path: Path, base: Path) -> None:
    sft = adapter_dir(tmp_path / "sft", base, {"stage": "sft"})
    policy = adapter_dir(tmp_path / "policy", base, {"stage": "ppo", "start_model": str(sft)})
    assert resolve_kl_reference(str(policy), None, str(base)).path == str(base)  # --ref_model wins over lineage
    off = resolve_kl_reference(str(policy), None, "base")
    assert off.adapter_disabled and "adapter disabled" in off.description


def test_ref_model_base_needs_an_adapter(base: Path) -> None:
    with pytest.raises(EvalError, match="adapter"):
        resolve_kl_reference(str(base), None, "base")


def test_a_full_model_without_lineage_has_no_reference(base: Path) -> None:
    assert resolve_kl_reference(str(base), None, None) is None  # reward models alone can still be scored
