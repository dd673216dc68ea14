"""AI-feedback recipe end to end on the tiny demo model: both modes, the data they write passes the SFT and reward
recipes' own validation and trains them, a killed run resumes, bad input stops before any generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes.ai_feedback.feedback import AIFeedbackError
from recipes.ai_feedback.train import ROWS_FILE, main
from recipes.common.data import DataError, load_train_eval
from recipes.common.outputs import FINISHED_MARKER
from recipes.reward.data import PAIR_FORMATS, prepare_pairs
from recipes.sft.train import SFT_FORMATS

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(REPO_ROOT / "recipes" / "ai_feedback" / "config.yaml")


def af_args(demo_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    # The demo base model is the policy here (it has the demo's chat template): no SFT run needed for the plumbing.
    return [
        "--config", CONFIG, "--model_name_or_path", str(demo_dir / "base"), "--parent_run", "",
        "--dataset_name", str(demo_dir / "data" / "prompts"), "--output_dir", str(output_dir),
        "--max_train_samples", "8", "--generation_batch_size", "4", "--max_new_tokens", "12", "--report_to", "none",
        *extra,
    ]  # fmt: skip


def judge_pairs_args(demo_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return af_args(
        demo_dir, output_dir, "--mode", "judge", "--responses", "dataset",
        "--dataset_name", str(demo_dir / "data" / "preferences"), "--max_train_samples", "16", *extra,
    )  # fmt: skip


def test_critique_revise_writes_sft_data_that_the_sft_recipe_trains_on(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "revisions"
    result = main(af_args(demo_dir, out, "--report_to", "wandb"))
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert result["summary"]["rows"] == len(rows) > 0 and (out / FINISHED_MARKER).is_file()
    for row in rows:
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["content"]
        assert row["messages"][0]["role"] == "user" and row["critique"] is not None and row["principle"]
    train, _ = load_train_eval(str(out), "train", None, None, SFT_FORMATS, recipe="SFT")  # the SFT recipe's check
    assert len(train) == len(rows)

    from recipes.sft.train import main as sft_main

    trainer = sft_main([
        "--config", str(REPO_ROOT / "recipes" / "sft" / "config.yaml"), "--model_name_or_path", str(demo_dir / "base"),
        "--dataset_name", str(out), "--output_dir", str(tmp_path / "sft"), "--max_steps", "2", "--logging_steps", "1",
        "--per_device_train_batch_size", "4", "--eval_strategy", "no", "--eval_tasks", "", "--save_strategy", "no",
        "--report_to", "none",
    ])  # fmt: skip
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(loss == loss and loss < 100 for loss in losses)
    assert (tmp_path / "sft" / FINISHED_MARKER).is_file()


def test_judge_on_sampled_pairs_writes_preference_rows(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "judged"
    summary = main(af_args(demo_dir, out, "--mode", "judge"))["summary"]
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert summary["rows"] == len(rows) and summary["rows"] + summary["skipped"] == 8
    for row in rows:
        assert row["chosen"][0]["role"] == "assistant" and row["chosen"] != row["rejected"]
        assert row["rating"] in summary["ratings"] and 0.5 <= row["p_chosen"] <= 1
        p_a = (row["p_a_shown_first"] + row["p_a_shown_second"]) / 2
        assert row["p_chosen"] == pytest.approx(p_a if row["chosen_is_a"] else 1 - p_a)


def test_judge_relabels_human_pairs_for_the_reward_recipe_and_resumes(demo_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "labels"
    summary = main(judge_pairs_args(demo_dir, out))["summary"]
    assert summary["rows"] == 16 and 0 <= summary["agreement"] <= 1
    first = (out / "train.jsonl").read_text()
    rows = [json.loads(line) for line in first.splitlines()]
    assert all(r["agrees_with_reference"] == r["chosen_is_a"] for r in rows)

    # The reward recipe's own checks, with Llama 2's margins from the AI ratings.
    train, evaluation = load_train_eval(
        str(out), "train", "test", None, PAIR_FORMATS, recipe="reward",
        eval_name_or_path=str(demo_dir / "data" / "preferences"),
    )  # fmt: skip
    assert len(prepare_pairs(train, "small", "rating", where="ai labels")["margin"]) == 16

    # A crash after the first batch: the run is not finished, and the last row was torn mid-write.
    lines = (out / ROWS_FILE).read_text().splitlines()
    (out / ROWS_FILE).write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    for name in (FINISHED_MARKER, "train.jsonl"):
        (out / name).unlink()
    capsys.readouterr()
    main(judge_pairs_args(demo_dir, out))
    assert "resuming: 5 rows already" in capsys.readouterr().out
    # The judge is deterministic: the same rows as uninterrupted (up to float noise of other batch paddings).
    resumed = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [(r["key"], r["chosen"], r["rating"]) for r in resumed] == [
        (r["key"], r["chosen"], r["rating"]) for r in rows
    ]
    assert [r["p_chosen"] for r in resumed] == pytest.approx([r["p_chosen"] for r in rows], abs=1e-4)

    from recipes.reward.train import main as reward_main

    trainer = reward_main([
        "--config", str(REPO_ROOT / "recipes" / "reward" / "config.yaml"), "--model_name_or_path",
        str(demo_dir / "base"), "--dataset_name", str(out), "--eval_dataset_name", str(demo_dir / "data" / "preferences"),
        "--max_eval_samples", "16", "--output_dir", str(tmp_path / "rm"), "--max_steps", "2", "--logging_steps", "1",
        "--per_device_train_batch_size", "8", "--warmup_steps", "0", "--eval_strategy", "no", "--save_strategy", "no",
        "--report_to", "none",
    ])  # fmt: skip
    assert all(log["loss"] == log["loss"] for log in trainer.state.log_history if "loss" in log)
    final = json.loads((tmp_path / "rm" / "rm_eval.json").read_text())["final"]
    assert final["n"] == 16 and set(final["buckets"]) <= {"significantly_better", "better", "slightly_better",
                                                           "negligibly_better"}  # fmt: skip


def test_reward_model_as_judge_stand_in(demo_dir: Path, tmp_path: Path) -> None:
    from recipes.reward.train import main as reward_main

    reward_main([
        "--config", str(REPO_ROOT / "recipes" / "reward" / "config.yaml"), "--model_name_or_path",
        str(demo_dir / "base"), "--dataset_name", str(demo_dir / "data" / "preferences"), "--max_train_samples", "32",
        "--max_eval_samples", "8", "--output_dir", str(tmp_path / "rm"), "--max_steps", "1", "--eval_strategy", "no",
        "--save_strategy", "no", "--report_to", "none",
    ])  # fmt: skip
    out = tmp_path / "labels"
    summary = main(judge_pairs_args(demo_dir, out, "--judge_type", "reward_model", "--judge_model_path",
                                    str(tmp_path / "rm")))["summary"]  # fmt: skip
    assert summary["rows"] == 16 and summary["order_consistent"] == 1.0  # an RM sees each response alone


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (["--judge_labels", " Alpha", " Beta"], AIFeedbackError, "splits the label ' Alpha'"),
        (["--dataset_name", "PROMPTS"], DataError, "needs one of: prompt\\+chosen\\+rejected"),
        (["--dataset_name", "SFT"], DataError, "needs one of: prompt"),
    ],
)
def test_bad_input_stops_before_generation(demo_dir: Path, tmp_path: Path, extra, error, message) -> None:
    data = {"PROMPTS": demo_dir / "data" / "prompts", "SFT": demo_dir / "data" / "sft"}
    extra = [str(data.get(value, value)) for value in extra]
    args = judge_pairs_args(demo_dir, tmp_path / "out", *extra)
    if "SFT" in data and str(data["SFT"]) in extra:
        args = af_args(demo_dir, tmp_path / "out", *extra)  # critique_revise needs a `prompt` column
    with pytest.raises(error, match=message):
        main(args)
    assert not (tmp_path / "out" / ROWS_FILE).exists()
