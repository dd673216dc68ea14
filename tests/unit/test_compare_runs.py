"""scripts/compare_runs.py on offline W&B runs written here: two tiny runs with known metrics, table checked."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import wandb

from eval.runs import (
    CompareError,
    RunData,
    compare_runs,
    filter_runs,
    load_local_runs,
    load_online_runs,
    log_comparison_to_wandb,
    online_filters,
    paired,
    select_metrics,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "compare_runs.py"


def _log_run(wandb_dir: Path, name: str, rows: list[dict], summary: dict, **init) -> Path:
    run = wandb.init(project="compare-test", name=name, dir=str(wandb_dir), mode="offline", **init)
    for row in rows:
        run.log(row)
    run.summary.update(summary)
    run.finish()
    return Path(run.dir).parent


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`base` (SFT-like) and `tuned` (RL-like: also reward and KL); final values come from the summary."""
    wandb_dir = tmp_path_factory.mktemp("runs")
    base_rows = [{"train/global_step": s, "train/loss": 2.0 / s} for s in range(1, 5)]
    base_rows.append({"train/global_step": 4, "eval/gsm8k/accuracy": 0.25, "eval/length/mean_tokens": 40.0})
    base = _log_run(
        wandb_dir,
        "base",
        base_rows,
        {"eval/gsm8k/accuracy": 0.25, "eval/mmlu/accuracy": 0.5, "eval/length/mean_tokens": 40.0},
        group="study",
        tags=["method:sft"],
        config={"seed": 0, "stage": "sft"},
    )
    tuned_rows = [
        {"train/global_step": s, "train/loss": 1.0 / s, "train/objective/kl": 0.1 * s, "train/reward": 0.2 * s}
        for s in range(1, 5)
    ]
    tuned_rows += [
        {"train/global_step": 2, "eval/gsm8k/accuracy": 0.375, "eval/length/mean_tokens": 45.0},
        {"train/global_step": 4, "eval/gsm8k/accuracy": 0.5, "eval/length/mean_tokens": 50.0},
    ]
    tuned = _log_run(
        wandb_dir,
        "tuned",
        tuned_rows,
        {"eval/gsm8k/accuracy": 0.5, "eval/mmlu/accuracy": 0.5, "eval/length/mean_tokens": 50.0},
        group="study",
        tags=["method:ppo"],
        config={"seed": 0, "stage": "ppo", "provenance": {"git_commit": "0123456789abcdef", "git_dirty": True}},
    )
    return {"base": base, "tuned": tuned, "wandb_dir": wandb_dir / "wandb"}


@pytest.fixture(scope="module")
def loaded(two_runs) -> list[RunData]:
    runs = load_local_runs([two_runs["wandb_dir"]])  # a wandb/ folder is scanned
    assert sorted(r.name for r in runs) == ["base", "tuned"]
    return sorted(runs, key=lambda r: r.name)


def _row(table: str, metric: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| `{metric}` |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_cli_table_report_and_plots(two_runs, tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, str(SCRIPT), str(two_runs["base"]), str(two_runs["tuned"]), "--output_dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr

    # Baseline (default: the first run) first, deltas to it, preferred order: GSM8K, MMLU, length, ..., train/.
    assert _row(result.stdout, "eval/gsm8k/accuracy") == ["`eval/gsm8k/accuracy`", "0.25", "0.5 (+0.25)"]
    assert _row(result.stdout, "eval/mmlu/accuracy") == ["`eval/mmlu/accuracy`", "0.5", "0.5 (+0)"]
    assert _row(result.stdout, "eval/length/mean_tokens") == ["`eval/length/mean_tokens`", "40", "50 (+10)"]
    assert _row(result.stdout, "train/loss") == ["`train/loss`", "0.5", "0.25 (-0.25)"]
    metric_rows = [line.split("`")[1] for line in result.stdout.splitlines() if line.startswith("| `")]
    assert metric_rows == [
        "eval/gsm8k/accuracy",
        "eval/mmlu/accuracy",
        "eval/length/mean_tokens",
        "train/loss",
    ], "train/reward and train/objective/kl are logged by one run only: not compared"
    assert "| metric | base (baseline) | tuned |" in result.stdout
    assert f"Report: {out / 'report.md'}" in result.stdout

    report = (out / "report.md").read_text()
    assert "| metric | base (baseline) | tuned |" in report
    assert "01234567 (dirty)" in report  # provenance shown per run
    for png in ("curves.png", "reward_vs_kl.png", "length_vs_reward.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report
    # What is missing is said, not silently dropped: base has no reward/KL curve.
    missing = report.split("## Missing")[1]
    assert "reward vs KL: base not drawn" in missing
    assert "`train/reward`: only logged by tuned, not compared" in missing


def test_baseline_choice_and_metric_patterns(loaded, tmp_path):
    comparison = compare_runs(loaded, tmp_path, baseline="tuned", metrics=["eval/gsm8k/*"])
    assert comparison.baseline == "tuned"
    assert comparison.metrics == ["eval/gsm8k/accuracy"]
    assert _row(comparison.table, "eval/gsm8k/accuracy") == ["`eval/gsm8k/accuracy`", "0.5", "0.25 (-0.25)"]


def test_wandb_panel_offline(loaded, tmp_path, wandb_dir):
    comparison = compare_runs(loaded, tmp_path, metrics=["eval/*"])
    location = log_comparison_to_wandb(comparison, loaded, project="compare-test")
    (panel,) = load_local_runs([location])
    assert panel.job_type == "comparison"
    assert panel.config["baseline"] == "base"
    logged = {a["type"] for a in panel.artifacts}
    assert "run_table" in logged  # the final-metrics wandb.Table
    assert panel.config["missing"] == comparison.missing
    assert not [k for row in panel.history for k in row if k.startswith("comparison/")], "media are not metrics"


def test_history_and_pairing(loaded):
    tuned = loaded[1]
    assert tuned.state == "finished" and tuned.group == "study" and tuned.tags == ["method:ppo"]
    assert [row["train/loss"] for row in tuned.history if "train/loss" in row] == [1.0, 0.5, 1 / 3, 0.25]
    # length is logged at steps 2 and 4 only: one point there, with the reward logged at that step
    assert paired(tuned, "train/reward", "eval/length/mean_tokens") == ([0.4, 0.8], [45.0, 50.0])


def test_filters_local_and_online_shape(loaded):
    runs = loaded
    assert [r.name for r in filter_runs(runs, tags=["method:ppo"])] == ["tuned"]
    assert [r.name for r in filter_runs(runs, filters={"provenance.git_dirty": True})] == ["tuned"]
    assert filter_runs(runs, group="other") == []
    assert online_filters("g", ["a"], {"seed": 0}) == {
        "$and": [{"group": "g"}, {"tags": {"$in": ["a"]}}, {"config.seed": 0}]
    }


def test_recipe_output_dirs(two_runs, tmp_path):
    with_wandb = tmp_path / "sft"
    with_wandb.mkdir()
    (with_wandb / "run_complete.json").write_text(json.dumps({"stage": "sft", "wandb": str(two_runs["base"])}))
    without = tmp_path / "no_wandb"
    without.mkdir()
    metrics = {"eval/gsm8k/accuracy": 0.125}
    (without / "run_complete.json").write_text(json.dumps({"stage": "dpo", "wandb": None, "metrics": metrics}))
    runs = load_local_runs([with_wandb, without])
    assert [r.name for r in runs] == ["base", "no_wandb"]
    comparison = compare_runs(runs, tmp_path / "out")
    assert _row(comparison.table, "eval/gsm8k/accuracy")[2] == "0.125 (-0.125)"
    assert any("no_wandb: trained without W&B" in m for m in comparison.missing)
    assert "`eval/mmlu/accuracy`: only logged by base, not compared" in comparison.missing


def test_bad_inputs_have_clear_messages(two_runs, tmp_path):
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("hello")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(not_a_run), "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 2
    assert "is not a W&B run" in result.stderr and "run-*.wandb" in result.stderr
    assert not (tmp_path / "out").exists()

    with pytest.raises(CompareError, match="does not exist"):
        load_local_runs([tmp_path / "missing"])
    runs = load_local_runs([two_runs["base"]])
    with pytest.raises(CompareError, match="matches no run; the runs are: base"):
        compare_runs(runs, tmp_path / "out", baseline="nope")
    disjoint = [RunData("a", "1", "x", summary={"eval/a/x": 1.0}), RunData("b", "2", "y", summary={"eval/b/y": 2.0})]
    with pytest.raises(CompareError, match="no common metric.*a: eval/a/x; b: eval/b/y"):
        select_metrics(disjoint)


def test_online_errors_are_clear_and_quick(monkeypatch):
    with pytest.raises(CompareError, match="WANDB_MODE=offline: not reading the online project"):
        load_online_runs("team/project")
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(CompareError, match="must be ENTITY/PROJECT"):
        load_online_runs("project-without-entity")
    # No network here: an unreachable server answers with a message, within the timeout, not a hang.
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    start = time.monotonic()
    with pytest.raises(CompareError, match="cannot read 'team/project' from http://127.0.0.1:9"):
        load_online_runs("team/project", base_url="http://127.0.0.1:9", timeout=3)
    assert time.monotonic() - start < 60


class _FakeRun:
    def __init__(self, name: str, accuracy: float):
        self.name, self.id, self.url = name, f"id-{name}", f"https://wandb.example/team/project/runs/id-{name}"
        self.config, self.group, self.tags, self.job_type, self.state = {"seed": 0}, "g", ["t"], "dpo", "finished"
        self.summary_metrics = {"eval/gsm8k/accuracy": accuracy, "_step": 3, "eval/samples": {"_type": "table-file"}}

    def history(self, samples: int, pandas: bool) -> list[dict]:
        return [{"_step": 1, "train/global_step": 1, "eval/gsm8k/accuracy": 0.0}]


def test_online_reading_with_a_stand_in_api(monkeypatch, tmp_path):
    """The wandb.Api() mapping, with a stand-in for the server (none is reachable here)."""
    calls = {}

    class FakeApi:
        def __init__(self, timeout: int, overrides: dict):
            calls["timeout"] = timeout

        def runs(self, path: str, filters: dict, per_page: int):
            calls["filters"] = filters
            if path == "team/missing":
                raise ValueError("Could not find project missing")
            return [_FakeRun("a", 0.25), _FakeRun("b", 0.5)]

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "Api", FakeApi)
    runs = load_online_runs("team/project", group="g", filters={"seed": 0}, timeout=5)
    assert calls == {"timeout": 5, "filters": {"$and": [{"group": "g"}, {"config.seed": 0}]}}
    assert [(r.name, r.summary) for r in runs] == [
        ("a", {"eval/gsm8k/accuracy": 0.25}),
        ("b", {"eval/gsm8k/accuracy": 0.5}),
    ]
    assert runs[0].source.endswith("/runs/id-a") and runs[0].history[0]["eval/gsm8k/accuracy"] == 0.0
    assert _row(compare_runs(runs, tmp_path).table, "eval/gsm8k/accuracy")[2] == "0.5 (+0.25)"
    with pytest.raises(CompareError, match="project 'team/missing' does not exist"):
        load_online_runs("team/missing")
