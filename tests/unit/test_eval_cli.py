"""The command line: predictions scoring with known answers, bad input failing clearly with nothing written, and the
local `evaluate` modules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.__main__ import main
from eval.testing import save_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


GSM8K_PREDICTIONS = [
    {"question": "2+3?", "answer": "2+3=5\n#### 5", "completion": "2+3=5\n#### 5"},  # strict and flexible
    {"question": "10-4?", "answer": "#### 6", "completion": "It is 6."},  # flexible only
    {"question": "1,000+1?", "answer": "#### 1,001", "completion": "#### $1001"},  # both, after normalising
    {"question": "3*3?", "answer": "#### 9", "completion": "#### 8"},  # wrong
]


def test_predictions_are_scored_with_stable_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    predictions = _write_jsonl(tmp_path / "preds.jsonl", GSM8K_PREDICTIONS)
    output = tmp_path / "out" / "results.json"
    code = main(
        [
            "--predictions",
            str(predictions),
            "--tasks",
            "gsm8k,length,diversity",
            "--no_embeddings",
            "--output",
            str(output),
        ]
    )
    assert code == 0
    results = json.loads(output.read_text())["results"]
    assert results["gsm8k"] == {"exact_match_strict": 0.5, "exact_match_flexible": 0.75, "accuracy": 0.75, "n": 4}
    assert results["length"]["mean_chars"] == pytest.approx(sum(len(r["completion"]) for r in GSM8K_PREDICTIONS) / 4)
    assert results["diversity"]["embedding_model"] == "absent"
    table = capsys.readouterr().out
    assert "exact_match_flexible" in table and "0.7500" in table


def test_mmlu_predictions(tmp_path: Path) -> None:
    records = [
        {"subject": "s1", "question": "q", "answer": "B", "completion": " B"},
        {"subject": "s1", "question": "q", "answer": 2, "completion": "The answer is C."},
        {"subject": "s2", "question": "q", "answer": "A", "completion": "D"},
    ]
    output = tmp_path / "r.json"
    assert (
        main(
            [
                "--predictions",
                str(_write_jsonl(tmp_path / "p.jsonl", records)),
                "--tasks",
                "mmlu",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    mmlu = json.loads(output.read_text())["results"]["mmlu"]
    assert mmlu["accuracy"] == pytest.approx(2 / 3) and mmlu["accuracy_macro"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _bad_input_cases(tmp_path: Path, tiny_model_dir: Path) -> dict[str, tuple[list[str], str]]:
    missing_field = _write_jsonl(
        tmp_path / "missing.jsonl",
        [GSM8K_PREDICTIONS[0], {"question": "q", "completion": "#### 1"}],  # line 2 has no answer
    )
    no_dev = tmp_path / "mmlu_no_dev"
    (no_dev / "test").mkdir(parents=True)
    (no_dev / "test" / "toy_test.csv").write_text("q,1,2,3,4,A\n")
    return {
        "unknown task": (
            ["--model", str(tiny_model_dir), "--tasks", "gsm8k,truthfulness"],
            "Unknown task(s) ['truthfulness']",
        ),
        "missing model": (["--model", str(tmp_path / "no_such_model"), "--tasks", "gsm8k"], "does not exist"),
        "mmlu without dev": (
            ["--model", str(tiny_model_dir), "--tasks", "mmlu", "--mmlu", str(no_dev)],
            "no dev files",
        ),
        "predictions missing a field": (
            ["--predictions", str(missing_field), "--tasks", "gsm8k"],
            "missing.jsonl:2: record lacks field(s) ['answer']",
        ),
        "demo data not built": (
            ["--model", str(tiny_model_dir), "--tasks", "gsm8k", "--gsm8k", "outputs/demo/data/absent"],
            "prepare_demo.py",
        ),
    }


@pytest.mark.parametrize(
    "case", ["unknown task", "missing model", "mmlu without dev", "predictions missing a field", "demo data not built"]
)
def test_bad_input_fails_clearly_and_writes_nothing(
    case: str, tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    argv, message = _bad_input_cases(tmp_path, tiny_model_dir)[case]
    output = tmp_path / "results.json"
    assert main([*argv, "--output", str(output), "--no_progress"]) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".results.json")]  # no temporary left over


@pytest.mark.parametrize("name", ["gsm8k_exact_match", "distinct_n", "self_bleu"])
def test_local_evaluate_modules_load_offline(name: str) -> None:
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(str(REPO_ROOT / "eval" / "metrics" / name))
    if name == "gsm8k_exact_match":
        result = metric.compute(
            predictions=[r["completion"] for r in GSM8K_PREDICTIONS],
            references=[r["answer"] for r in GSM8K_PREDICTIONS],
        )
        assert result == {"exact_match_strict": 0.5, "exact_match_flexible": 0.75, "n": 4}
    elif name == "distinct_n":
        result = metric.compute(predictions=["a b c d e f"] * 2)
        assert result["distinct_1"] == 0.5 and result["distinct_mean"] == 0.5
    else:
        assert metric.compute(predictions=["the cat sat on the mat"] * 2) == {"self_bleu": pytest.approx(1.0)}
