"""AI feedback: order averaging, confidence -> Llama 2 ratings, the constitution, label tokens, resumable rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from eval.generation import loglikelihood
from eval.testing import build_char_tokenizer, build_tiny_model
from recipes.ai_feedback import feedback
from recipes.ai_feedback.feedback import AIFeedbackError
from recipes.reward.data import rating_to_margin

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONSTITUTION = REPO_ROOT / "recipes" / "ai_feedback" / "constitutions" / "default.yaml"
LABELS = [" A", " B"]
PROMPTS = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
GOOD = ["good answer", "a good one", "good", "very good"]
BAD = ["bad answer", "a bad one", "bad", "awful"]


def first_shown(text: str) -> str:
    return re.search(r"Response A: (.*?)\n\nResponse B:", text, re.S)[1]


def always_first(texts):
    """A judge that only ever looks at the position: the first label gets almost all the probability."""
    return [(-0.01, -4.6) for _ in texts]


def content_and_position(texts):
    """A judge with a real preference (responses saying "good") plus a strong bias towards the first position."""
    scores = []
    for text in texts:
        first_good = "good" in first_shown(text)
        scores.append((1.5 + (1.0 if first_good else 0.0), 0.0 + (0.0 if first_good else 1.0)))
    return scores


def test_order_averaging_cancels_a_judge_that_always_prefers_the_first_option() -> None:
    judged = feedback.judge_pairs(always_first, PROMPTS, GOOD, BAD, "Which is better?", LABELS)
    for verdict in judged:
        assert verdict["p_a_shown_first"] > 0.98 and verdict["p_a_shown_second"] < 0.02  # each order alone: biased
        assert verdict["p_a"] == pytest.approx(0.5, abs=1e-12)  # both orders averaged: no preference at all
    rows = [feedback.preference_row(str(i), p, a, b, v, (0.9, 0.75, 0.6), seed=0)
            for i, (p, a, b, v) in enumerate(zip(PROMPTS, GOOD, BAD, judged))]  # fmt: skip
    assert all(r["rating"] == "negligibly_better" and r["tie"] for r in rows)
    again = [feedback.preference_row(str(i), p, a, b, v, (0.9, 0.75, 0.6), seed=0)
             for i, (p, a, b, v) in enumerate(zip(PROMPTS, GOOD, BAD, judged))]  # fmt: skip
    assert [r["chosen_is_a"] for r in rows] == [r["chosen_is_a"] for r in again]  # the tie coin is fixed by key+seed


def test_order_averaging_keeps_a_content_preference_under_position_bias() -> None:
    # Shown first, the bad response wins on position alone (p_a_shown_second < 0.5 for a good a): only the average
    # over both orders recovers the judge's preference for the good response, whichever slot it is in.
    judged = feedback.judge_pairs(content_and_position, PROMPTS, GOOD, BAD, "Which is better?", LABELS)
    assert all(v["p_a_shown_second"] < 0.5 < v["p_a_shown_first"] for v in judged)  # one order alone: position wins
    assert all(v["p_a"] > 0.5 for v in judged)
    swapped = feedback.judge_pairs(content_and_position, PROMPTS, BAD, GOOD, "Which is better?", LABELS)
    assert all(v["p_a"] < 0.5 for v in swapped)
    for v, s in zip(judged, swapped):
        assert v["p_a"] == pytest.approx(1 - s["p_a"])


def test_real_tiny_model_judge_is_antisymmetric_and_reads_label_logprobs() -> None:
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, seed=0).eval()
    labels = ["A", "B"]  # the character tokenizer has one token per character
    ids = feedback.label_token_ids(tokenizer, labels, "tiny")
    judge_fn = feedback.causal_lm_judge(model, tokenizer, ids, chat=False, batch_size=4)
    texts = [feedback.judge_prompt(PROMPTS[0], "yes", "no", "Pick one.", labels)]
    expected = loglikelihood(model, tokenizer, [(texts[0], "A"), (texts[0], "B")], progress=False)
    assert judge_fn(texts)[0] == pytest.approx(tuple(expected), abs=1e-4)
    with torch.no_grad():
        ab = feedback.judge_pairs(judge_fn, PROMPTS, GOOD, BAD, "Pick one.", labels)
        ba = feedback.judge_pairs(judge_fn, PROMPTS, BAD, GOOD, "Pick one.", labels)
    for x, y in zip(ab, ba):
        assert x["p_a"] == pytest.approx(1 - y["p_a"], abs=1e-6)  # the order of the inputs does not matter
        assert x["p_a_shown_first"] == pytest.approx(1 - y["p_a_shown_second"], abs=1e-6)


@pytest.mark.parametrize(
    ("confidence", "rating", "small_margin"),
    [
        (1.0, "significantly_better", 1.0),
        (0.9, "significantly_better", 1.0),
        (0.89, "better", 2 / 3),
        (0.75, "better", 2 / 3),
        (0.7, "slightly_better", 1 / 3),
        (0.6, "slightly_better", 1 / 3),
        (0.59, "negligibly_better", 0.0),
        (0.5, "negligibly_better", 0.0),
    ],
)
def test_confidence_maps_to_llama2_ratings_and_margins(confidence: float, rating: str, small_margin: float) -> None:
    assert feedback.rating_from_confidence(confidence, (0.9, 0.75, 0.6)) == rating
    assert rating_to_margin(rating, "small") == pytest.approx(small_margin)


def test_preference_row_orders_by_the_judge_and_rates_its_confidence() -> None:
    row = feedback.preference_row("k", PROMPTS[0], "x", "y", {"p_a": 0.2, "p_a_shown_first": 0.3,
                                                               "p_a_shown_second": 0.1}, (0.9, 0.75, 0.6), 0)  # fmt: skip
    assert row["chosen"] == [{"role": "assistant", "content": "y"}] and row["rejected"][0]["content"] == "x"
    assert row["p_chosen"] == pytest.approx(0.8) and row["rating"] == "better" and not row["chosen_is_a"]


@pytest.mark.parametrize(
    "thresholds", [(0.9, 0.75), (0.6, 0.75, 0.9), (0.9, 0.9, 0.6), (1.2, 0.8, 0.6), (0.9, 0.7, 0.5)]
)
def test_bad_thresholds_are_refused(thresholds) -> None:
    with pytest.raises(AIFeedbackError, match="rating_thresholds"):
        feedback.check_thresholds(thresholds)


def test_default_constitution_loads() -> None:
    constitution = feedback.load_constitution(str(DEFAULT_CONSTITUTION), need_principles=True)
    assert len(constitution["principles"]) >= 2 and constitution["judge_instruction"]
    picks = {feedback.pick_principle(constitution["principles"], str(k), 0)["name"] for k in range(50)}
    assert len(picks) == len(constitution["principles"])  # drawn at random across prompts
    assert feedback.pick_principle(constitution["principles"], "7", 0) == feedback.pick_principle(
        constitution["principles"], "7", 0
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: empty\n", "has no principles"),
        ("principles: []\n", "has no principles"),
        ("principles:\n  - name: x\n    critique_request: c\n", "lacks a non-empty revision_request"),
        (
            "principles:\n  - {name: x, critique_request: c, revision_request: r}\n"
            "  - {name: x, critique_request: c, revision_request: r}\n",
            "two principles are named",
        ),  # fmt: skip
        ("- just a list\n", "must be a mapping"),
        ("principles: [\n", "not valid YAML"),
    ],
)
def test_bad_constitutions_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "constitution.yaml"
    path.write_text(text)
    with pytest.raises(AIFeedbackError, match=message):
        feedback.load_constitution(str(path), need_principles=True)


def test_judging_needs_no_principles(tmp_path: Path) -> None:
    path = tmp_path / "judge_only.yaml"
    path.write_text("judge_instruction: Pick the kinder reply.\n")
    assert feedback.load_constitution(str(path), need_principles=False)["judge_instruction"] == "Pick the kinder reply."


def test_labels_that_are_not_single_tokens_are_refused() -> None:
    tokenizer = build_char_tokenizer()
    assert len(feedback.label_token_ids(tokenizer, ["A", "B"], "tiny")) == 2
    with pytest.raises(AIFeedbackError, match="splits the label ' A' into 2 tokens"):
        feedback.label_token_ids(tokenizer, LABELS, "tiny")
    with pytest.raises(AIFeedbackError, match="two different"):
        feedback.label_token_ids(tokenizer, ["A", "A"], "tiny")


def test_cli_refuses_a_constitution_without_principles_before_loading_anything(tmp_path: Path, capsys) -> None:
    from recipes.ai_feedback.train import main
    from recipes.common.errors import run_cli

    path = tmp_path / "empty.yaml"
    path.write_text("principles: []\n")
    argv = ["--config", str(REPO_ROOT / "recipes/ai_feedback/config.yaml"), "--constitution_path", str(path),
            "--model_name_or_path", str(tmp_path / "no-such-model"), "--output_dir", str(tmp_path / "out"),
            "--report_to", "none", "--parent_run", ""]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    assert "has no principles" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_rows_file_survives_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    feedback.append_rows(path, [{"key": "a"}, {"key": "b"}])
    with path.open("a") as handle:
        handle.write('{"key": "c", "trunc')  # a kill in the middle of a write
    assert [r["key"] for r in feedback.read_done_rows(path)] == ["a", "b"]
    feedback.append_rows(path, [{"key": "c"}])
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "c"]
