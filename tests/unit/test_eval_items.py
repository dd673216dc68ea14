"""Per-item results of `python -m eval` (like lm-eval's --log_samples): every record says which item it is, and the
subset of items (`--limit`) is chosen by `--data_seed` alone, so evaluations with different sampling seeds (`--seed`)
score the same items and can be compared item by item."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.__main__ import main
from eval.testing import save_tiny_model

QUESTIONS = [
    {"question": f"What is {a}+{b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"} for a in range(4) for b in (1, 2)
]
MMLU_ROWS = [f"q{i},1,2,3,4,{'ABCD'[i % 4]}" for i in range(10)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("items")
    (root / "math").mkdir()
    (root / "math" / "test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    for split, rows in (("dev", MMLU_ROWS[:5]), ("test", MMLU_ROWS)):
        (root / "mmlu" / split).mkdir(parents=True)
        (root / "mmlu" / split / f"toy_{split}.csv").write_text("\n".join(rows) + "\n")
    return {"root": root, "model": save_tiny_model(root / "model")}


def evaluate(setup: dict[str, Path], name: str, *extra: str) -> tuple[dict, list[dict]]:
    root = setup["root"]
    argv = [
        "--model", str(setup["model"]), "--tasks", "gsm8k,mmlu,length,diversity", "--gsm8k", str(root / "math"),
        "--gsm8k_chat", "true", "--mmlu", str(root / "mmlu"), "--limit", "4", "--max_new_tokens", "6",
        "--samples_per_prompt", "2", "--no_embeddings", "--no_progress",
        "--output", str(root / f"{name}.json"), "--samples_output", str(root / f"{name}.samples.jsonl"), *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    samples = [json.loads(line) for line in (root / f"{name}.samples.jsonl").read_text().splitlines()]
    return json.loads((root / f"{name}.json").read_text()), samples


def items(samples: list[dict], task: str) -> list[int]:
    return [s["item"] for s in samples if s["task"] == task]


def test_sampling_seed_does_not_change_the_items(setup: dict[str, Path]) -> None:
    first, first_samples = evaluate(setup, "seed1", "--seed", "1", "--data_seed", "7")
    second, second_samples = evaluate(setup, "seed2", "--seed", "2", "--data_seed", "7")
    for task in ("gsm8k", "mmlu", "sampled"):
        assert items(first_samples, task) == items(second_samples, task) and items(first_samples, task)
    assert first["config"]["data_seed"] == 7 and first["config"]["seed"] == 1
    # Another data seed picks another subset.
    _, other = evaluate(setup, "data3", "--seed", "1", "--data_seed", "3")
    assert set(items(other, "gsm8k")) != set(items(first_samples, "gsm8k"))


def test_item_ids_are_positions_in_the_source_data(setup: dict[str, Path]) -> None:
    _, samples = evaluate(setup, "ids", "--data_seed", "5")
    for record in (s for s in samples if s["task"] == "gsm8k"):
        assert QUESTIONS[record["item"]]["question"] == record["question"]
    for record in (s for s in samples if s["task"] == "mmlu"):
        assert MMLU_ROWS[record["item"]].split(",")[0] == record["question"]
    sampled = [s for s in samples if s["task"] == "sampled"]
    assert [s["sample"] for s in sampled] == [0, 1] * 4
    for record in sampled:  # the prompts are the GSM8K questions here
        assert QUESTIONS[record["item"]]["question"] == record["prompt"]


def test_per_item_figures_add_up_to_the_metrics(setup: dict[str, Path]) -> None:
    payload, samples = evaluate(setup, "sums", "--data_seed", "0")
    results = payload["results"]
    gsm = [s for s in samples if s["task"] == "gsm8k"]
    assert sum(s["correct_flexible"] for s in gsm) / len(gsm) == pytest.approx(results["gsm8k"]["exact_match_flexible"])
    mmlu = [s for s in samples if s["task"] == "mmlu"]
    assert sum(s["correct"] for s in mmlu) / len(mmlu) == pytest.approx(results["mmlu"]["accuracy"])
    sampled = [s for s in samples if s["task"] == "sampled"]
    assert sum(s["n_tokens"] for s in sampled) / len(sampled) == pytest.approx(results["length"]["mean_tokens"])


def test_training_seed_does_not_change_the_in_training_items(setup: dict[str, Path]) -> None:
    """The recipes' evaluation callback: runs with training seeds 1 and 2 evaluate the same items (`eval_data_seed`)."""
    from transformers import AutoTokenizer

    from eval.callback import build_eval_callback
    from recipes.common.config import RecipeArguments

    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    args = RecipeArguments(
        eval_tasks=["gsm8k", "mmlu"], eval_gsm8k_path=str(setup["root"] / "math"),
        eval_mmlu_dir=str(setup["root"] / "mmlu"), eval_num_samples=4,
    )  # fmt: skip
    items = []
    for seed in (1, 2):
        (callback,) = build_eval_callback(args, tokenizer, seed=seed)
        items.append((callback.data.gsm8k_items, callback.data.mmlu_items))
    assert items[0] == items[1] and len(items[0][0]) == 4
    # Another data seed picks other items (so the comparison above could fail).
    (other,) = build_eval_callback(RecipeArguments(**{**vars(args), "eval_data_seed": 5}), tokenizer, seed=1)
    assert other.data.gsm8k_items != items[0][0]
