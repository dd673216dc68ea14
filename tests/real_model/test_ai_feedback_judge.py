"""RLAIF's judge mode with a real instruct model as the judge: SmolLM2-135M-Instruct (the `smollm2_dir` stand-in) reads
the judge prompt in its ChatML template and labels a few human-labelled pairs; the rows pass the reward recipe's own
checks (columns, ratings -> Llama 2 margins). About 13 s on 2 shared CPU cores (4-bit judge, 4 pairs x 2 orders)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from recipes.ai_feedback.feedback import AIFeedbackError, label_token_ids
from recipes.ai_feedback.train import main
from recipes.common.data import load_train_eval
from recipes.reward.data import PAIR_FORMATS, prepare_pairs

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.real_model

# (prompt, human-chosen, human-rejected, human rating), in the demo's preference format
PAIRS = [
    ("What is 6 plus 6?", "6 + 6 = 12.", "+ . = .", "significantly_better"),
    ("What is the capital of France?", "The capital of France is Paris.", "I don't know.", "better"),
    ("Tell me the opposite of 'hot'.", "The opposite of 'hot' is 'cold'.", "The opposite of 'hot' is 'car'.", "better"),
    ("Name a fruit.", "An apple.", "Apple.", "negligibly_better"),
]


def test_smollm2_judges_pairs_into_reward_data(smollm2_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "pairs"
    data.mkdir()
    rows = [
        {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}], "rating": rating, "task": "chat"}
        for p, c, r, rating in PAIRS
    ]  # fmt: skip
    (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    # Its labels: "A"/"B" (the start of the assistant's reply) are one token each; a two-token label is refused.
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(set(label_token_ids(tokenizer, ["A", "B"], "SmolLM2"))) == 2
    with pytest.raises(AIFeedbackError, match="splits the label"):
        label_token_ids(tokenizer, ["Option A", "Option B"], "SmolLM2")

    out = tmp_path / "labels"
    result = main([
        "--config", str(REPO_ROOT / "recipes" / "ai_feedback" / "config.yaml"), "--mode", "judge",
        "--responses", "dataset", "--dataset_name", str(data), "--model_name_or_path", str(smollm2_dir),
        "--parent_run", "", "--judge_model_path", str(smollm2_dir), "--judge_chat_template", "true",
        "--judge_labels", "A", "B", "--output_dir", str(out), "--report_to", "none",
    ])  # fmt: skip
    summary = result["summary"]
    assert summary["rows"] == len(PAIRS) and summary["skipped"] == 0 and 0 <= summary["agreement"] <= 1
    judged = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    for row in judged:
        # a real judge's label probabilities, not a degenerate 0.5: each order alone has a preference
        assert row["p_a_shown_first"] != pytest.approx(0.5, abs=1e-3)
        p_a = (row["p_a_shown_first"] + row["p_a_shown_second"]) / 2
        assert 0.5 <= row["p_chosen"] <= 1 and row["p_chosen"] == pytest.approx(max(p_a, 1 - p_a))
        assert row["agrees_with_reference"] == row["chosen_is_a"]

    # The reward recipe's own checks: its pair formats, the AI ratings mapped to Llama 2's margins.
    train, _ = load_train_eval(str(out), "train", None, None, PAIR_FORMATS, recipe="reward")
    assert len(prepare_pairs(train, "small", "rating", where="SmolLM2 labels")["margin"]) == len(PAIRS)
