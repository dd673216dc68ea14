"""Lineage recorded as W&B artifacts: an offline parent run and a child run that starts from it, read back from the
child's `.wandb` record log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import wandb

from eval.runs import load_local_runs, runs_table
from recipes.common.outputs import mark_finished
from recipes.common.tracking import check_parent_runs, log_lineage, run_location


def _fake_output_dir(path: Path, payload: bytes) -> Path:
    """What a recipe saves at the top of its output dir (adapter + tokenizer), plus a checkpoint to leave out."""
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(payload)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (path / "tokenizer.json").write_text("{}")
    (path / "checkpoint-2").mkdir()
    (path / "checkpoint-2" / "optimizer.pt").write_bytes(b"x")
    return path


@pytest.fixture(scope="module")
def lineage_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lineage")
    data = root / "data" / "sft"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"messages": []}\n')

    parent_dir = _fake_output_dir(root / "sft", b"parent weights")
    run = wandb.init(project="lineage-test", name="sft", dir=str(root), mode="offline")
    parent_lineage = log_lineage(run, parent_dir, datasets=[str(data), "org/hub-dataset"])
    mark_finished(str(parent_dir), {"stage": "sft", "metrics": {}, "wandb": run_location(run)})
    parent_id = run.id
    run.finish()

    child_dir = _fake_output_dir(root / "dpo", b"child weights")
    run = wandb.init(project="lineage-test", name="dpo", dir=str(root), mode="offline")
    child_lineage = log_lineage(
        run, child_dir, parent_dirs=str(parent_dir), datasets=[str(data)], eval_results={"eval/gsm8k/accuracy": 0.5}
    )
    run.finish()
    runs = {r.name: r for r in load_local_runs([root / "wandb"])}
    return {
        "parent": runs["sft"],
        "child": runs["dpo"],
        "parent_id": parent_id,
        "parent_dir": parent_dir,
        "parent_lineage": parent_lineage,
        "child_lineage": child_lineage,
    }


def _artifacts(run, role: str) -> dict[str, dict]:
    return {a["name"]: a for a in run.artifacts if a["role"] == role}


def test_child_records_used_and_logged_artifacts(lineage_runs):
    child, parent = lineage_runs["child"], lineage_runs["parent"]
    assert child.name == "dpo" and parent.name == "sft"
    used, logged = _artifacts(child, "used"), _artifacts(child, "logged")
    assert set(used) == {"sft-model", "data-sft-dataset"}
    assert set(logged) == {"dpo-model", "dpo-eval-results"}
    assert used["sft-model"]["type"] == "model" and used["data-sft-dataset"]["type"] == "dataset"
    assert logged["dpo-eval-results"]["type"] == "eval-results"
    # The child's input is the very version the parent logged (same content digest), so W&B links the two runs.
    assert used["sft-model"]["digest"] == _artifacts(parent, "logged")["sft-model"]["digest"]
    # Model files are referenced (not copied), checkpoints left out.
    assert sorted(logged["dpo-model"]["files"]) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
    ]
    assert all(ref.startswith("file://") for ref in logged["dpo-model"]["refs"])


def test_lineage_in_config_and_comparison(lineage_runs):
    child = lineage_runs["child"]
    (parent_info,) = child.config["lineage"]["parents"]
    assert parent_info["run_id"] == lineage_runs["parent_id"]
    assert parent_info["stage"] == "sft"
    assert parent_info["output_dir"] == str(lineage_runs["parent_dir"].resolve())
    assert child.config["lineage"] == json.loads(json.dumps(lineage_runs["child_lineage"]))
    # Hub datasets have nothing local to reference: recorded by name.
    assert {"name": "org/hub-dataset"} in lineage_runs["parent_lineage"]["datasets"]
    assert f"| {lineage_runs['parent_id']} |" in runs_table([child])  # the comparison shows the parent


def test_no_wandb_and_bad_parent(tmp_path):
    assert log_lineage(None, tmp_path, parent_dirs=str(tmp_path)) == {}
    check_parent_runs(None)
    with pytest.raises(ValueError, match="not a finished recipe output dir"):
        check_parent_runs([str(tmp_path)])
