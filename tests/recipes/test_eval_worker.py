"""The study's evaluation workers run `python -m eval` in a process that evaluates many models one after another
(`eval.__main__.main_logged`). Their results must be those of a fresh `python -m eval` process: nothing an earlier
evaluation leaves behind in the process (RNG state, loaded modules, caches) may change a later one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.__main__ import main_logged
from eval.testing import save_tiny_base_and_adapter

QUESTIONS = [
    {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
    {"question": "What is 10-4?", "answer": "10-4=6\n#### 6"},
    {"question": "What is 3*3?", "answer": "3*3=9\n#### 9"},
]
PROMPTS = [{"prompt": [{"role": "user", "content": f"Say something about {word}."}]} for word in ("cats", "rain")]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("worker")
    save_tiny_base_and_adapter(root, seed=3)
    (root / "math").mkdir()
    (root / "math" / "test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return {
        "base": root / "base",
        "adapter": root / "adapter",
        "math": root / "math",
        "prompts": root / "prompts.jsonl",
    }


def argv(models: dict[str, Path], model: str, output: Path, seed: int) -> list[str]:
    return [
        "--model", str(models[model]), "--load_in_4bit", "--tasks", "gsm8k,length,diversity",
        "--gsm8k", str(models["math"]), "--gsm8k_chat", "true", "--prompts", str(models["prompts"]),
        "--max_new_tokens", "8", "--samples_per_prompt", "3", "--seed", str(seed), "--no_progress",
        "--output", str(output), "--samples_output", str(output.with_suffix(".samples.jsonl")),
    ]  # fmt: skip


def test_worker_results_equal_a_fresh_process(models: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    fresh = tmp_path / "fresh.json"
    subprocess.run([sys.executable, "-m", "eval", *argv(models, "adapter", fresh, seed=1)], check=True, timeout=600)

    # In this process: first another model with another sampling seed, then the same evaluation as above.
    assert main_logged(argv(models, "base", tmp_path / "other.json", seed=7), str(tmp_path / "other.log")) == 0
    in_worker = tmp_path / "worker.json"
    assert main_logged(argv(models, "adapter", in_worker, seed=1), str(tmp_path / "worker.log")) == 0

    fresh_results, worker_results = (json.loads(p.read_text())["results"] for p in (fresh, in_worker))
    assert worker_results == fresh_results
    assert fresh.with_suffix(".samples.jsonl").read_text() == in_worker.with_suffix(".samples.jsonl").read_text()
    # Another evaluation gives other samples: the equality above is not between empty or constant files.
    other_samples = (tmp_path / "other.samples.jsonl").read_text()
    assert other_samples != in_worker.with_suffix(".samples.jsonl").read_text()


def test_worker_reports_a_user_error_as_exit_2(models: dict[str, Path], tmp_path: Path) -> None:
    log = tmp_path / "bad.log"
    bad = ["--model", str(tmp_path / "missing"), "--tasks", "gsm8k", "--gsm8k", str(models["math"])]
    assert main_logged(bad, str(log)) == 2
    assert "error:" in log.read_text()
