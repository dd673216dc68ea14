"""scripts/preference_pairs.py: the pairs it writes are what the reward and DPO recipes read, and an existing output
dir is reused only when it holds the same build (never overwritten)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import preference_pairs  # noqa: E402

from recipes.common.errors import UserError  # noqa: E402
from recipes.reward.data import prepare_pairs, rating_to_margin  # noqa: E402


def sample(prompt_id: int, sample_id: int, completion: str, reward: float) -> dict:
    return {"prompt_id": prompt_id, "round": 1, "sample_id": sample_id, "completion": completion, "reward": reward}


def test_pairs_are_right_vs_wrong_in_the_reward_recipes_format() -> None:
    prompts = {0: {"messages": [{"role": "user", "content": "What is 2 + 3?"}]}}
    pairs = [
        {"prompt_id": 0, "chosen": sample(0, 1, "2 + 3 = 5\n#### 5", 1.0), "rejected": sample(0, 0, "#### 6", 0.0)}
    ]
    rows = preference_pairs.conversational_pairs(pairs, prompts)
    assert rows == [
        {
            "prompt": [{"role": "user", "content": "What is 2 + 3?"}],
            "chosen": [{"role": "assistant", "content": "2 + 3 = 5\n#### 5"}],
            "rejected": [{"role": "assistant", "content": "#### 6"}],
            "rating": "significantly_better",
            "task": "math",
        }
    ]
    checked = prepare_pairs(Dataset.from_list(rows), "large", "rating", where="pairs")
    assert checked["margin"] == [rating_to_margin("significantly_better", "large")] == [3.0]


def test_an_existing_output_dir_is_reused_only_for_the_same_build(tmp_path: Path) -> None:
    args = preference_pairs.parse_args(["--output_dir", str(tmp_path / "pairs")])
    settings = preference_pairs.settings_of(args)
    out = Path(args.output_dir)
    assert not preference_pairs.existing_build(out, settings)  # nothing there yet
    out.mkdir()
    (out / "pairs.json").write_text(json.dumps({"settings": settings}))
    assert preference_pairs.existing_build(out, settings)
    with pytest.raises(UserError, match="not overwritten"):
        preference_pairs.existing_build(out, {**settings, "num_samples": 4})
    (out / "pairs.json").unlink()
    (out / "notes.txt").write_text("someone's file")
    with pytest.raises(UserError, match="not overwritten"):
        preference_pairs.existing_build(out, settings)
    assert (out / "notes.txt").read_text() == "someone's file"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_samples", "1"], "a pair needs 2 or more samples"),
        (["--num_prompts", "1"], "give 2 or more"),
        (["--test_fraction", "1"], "strictly between 0 and 1"),
    ],
)
def test_bad_settings_are_refused_before_any_model_loads(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        preference_pairs.parse_args(argv)
