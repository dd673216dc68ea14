"""End to end through `python -m eval`: a saved base + LoRA adapter loaded 4-bit (KL to the adapter-less base, W&B
offline), KL to the policy's starting point read from its run's lineage (loaded with the policy's dtype), and the
embedded demo's base model checked against the accuracy prepare_demo.py measured itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from eval.__main__ import build_parser, main, run
from eval.data import EvalError
from eval.testing import build_char_tokenizer, build_tiny_model, save_tiny_base_and_adapter

QUESTIONS = [
    {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
    {"question": "What is 10-4?", "answer": "10-4=6\n#### 6"},
    {"question": "What is 3*3?", "answer": "3*3=9\n#### 9"},
    {"question": "What is 8/2?", "answer": "8/2=4\n#### 4"},
]


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_tiny_base_and_adapter(tmp_path_factory.mktemp("lora"), seed=5)


def test_cli_adapter_in_4bit_with_kl_and_wandb(
    tmp_path: Path, wandb_dir: Path, base_and_adapter: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("bitsandbytes")
    base, adapter = base_and_adapter
    data = tmp_path / "math"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    output = tmp_path / "results.json"
    argv = [
        "--model", str(base), "--adapter", str(adapter), "--load_in_4bit",
        "--tasks", "gsm8k,length,reward", "--gsm8k", str(data), "--gsm8k_chat", "true",
        "--max_new_tokens", "8", "--samples_per_prompt", "2", "--no_progress", "--ref_model", "base",
        "--output", str(output), "--samples_output", str(tmp_path / "samples.jsonl"),
        "--wandb_project", "eval-test", "--wandb_run_name", "e2e",
    ]  # fmt: skip
    assert main(argv) == 0
    payload = json.loads(output.read_text())
    results = payload["results"]
    assert results["gsm8k"]["n"] == 4 and set(results["gsm8k"]) >= {"exact_match_strict", "exact_match_flexible"}
    assert results["length"]["n"] == 8
    assert results["reward"]["kl"] > 0.01  # adapter on vs off: the policy is not its base
    assert "adapter disabled" in results["reward"]["kl_reference"] == payload["config"]["kl_reference"]
    assert payload["config"]["gsm8k_chat"] is True and payload["config"]["load_in_4bit"] is True
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {s["task"] for s in samples} == {"gsm8k", "sampled"}
    assert all(s["prompt"].startswith("<|user|>\n") for s in samples if s["task"] == "gsm8k")
    logged = re.search(r"logged to W&B \((.+)\)", capsys.readouterr().out)
    assert logged, "no W&B run reported"
    run_dir = Path(logged.group(1)).parent  # the run's files/ directory sits next to its .wandb log
    assert run_dir.name.startswith("offline-run-") and list(run_dir.glob("run-*.wandb"))


def perturbed_adapter(start: Path, out: Path, seed: int, lineage: dict) -> Path:
    """A copy of the adapter at `start` with its LoRA weights moved: a policy trained on from it."""
    base = Path(json.loads((start / "adapter_config.json").read_text())["base_model_name_or_path"])
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), start, is_trainable=True)
    torch.manual_seed(seed)
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.data.add_(torch.randn_like(param) * 0.3)
    policy.save_pretrained(out)
    (out / "run_complete.json").write_text(json.dumps(lineage))
    return out


def kl_of(argv: list[str], output: Path) -> dict:
    assert main([*argv, "--output", str(output)]) == 0
    return json.loads(output.read_text())["results"]["reward"]


def test_kl_reference_is_the_policys_starting_point(tmp_path: Path, base_and_adapter: tuple[Path, Path]) -> None:
    """A policy adapter trained on from the SFT adapter: by default KL is measured to that SFT policy (its recorded
    start), not to the adapter's base; the same figure as naming it with --ref_model."""
    _, sft = base_and_adapter
    policy = perturbed_adapter(sft, tmp_path / "ppo", seed=3, lineage={"stage": "ppo", "start_model": str(sft)})
    (tmp_path / "math").mkdir()
    (tmp_path / "math" / "test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    argv = [
        "--model", str(policy), "--tasks", "reward", "--gsm8k", str(tmp_path / "math"), "--max_new_tokens", "8",
        "--samples_per_prompt", "2", "--no_progress",
    ]  # fmt: skip
    default = kl_of(argv, tmp_path / "default.json")
    named = kl_of([*argv, "--ref_model", str(sft)], tmp_path / "named.json")
    to_base = kl_of([*argv, "--ref_model", "base"], tmp_path / "base.json")
    assert default["kl"] == pytest.approx(named["kl"], abs=1e-6)
    assert str(sft) in default["kl_reference"] and "start_model" in default["kl_reference"]
    assert abs(default["kl"] - to_base["kl"]) > 0.05, (default, to_base)  # the base is another reference
    # Without the record, an adapter's reference must be named.
    (policy / "run_complete.json").unlink()
    with pytest.raises(EvalError, match="--ref_model"):
        run(build_parser().parse_args(argv))


def test_kl_reference_is_loaded_with_the_policys_dtype(tmp_path: Path, base_and_adapter: tuple[Path, Path]) -> None:
    """The policy against itself in bfloat16: exactly 0 only when the reference is loaded in bfloat16 too (a float32
    reference would differ by bf16 rounding)."""
    _, adapter = base_and_adapter
    (tmp_path / "math").mkdir()
    (tmp_path / "math" / "test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    argv = [
        "--model", str(adapter), "--ref_model", str(adapter), "--dtype", "bfloat16", "--tasks", "reward",
        "--gsm8k", str(tmp_path / "math"), "--max_new_tokens", "8", "--samples_per_prompt", "2", "--no_progress",
    ]  # fmt: skip
    reward = kl_of(argv, tmp_path / "self.json")
    assert reward["kl"] == 0.0 and reward["logprob_policy"] == reward["logprob_ref"]


def test_demo_base_model_matches_prepare_demo_accuracy(demo_dir: Path, tmp_path: Path) -> None:
    """prepare_demo.py measured the base model's greedy 0-shot accuracy on the first 50 level-1 test problems with
    its own code; `python -m eval` on the same problems must find the same figure (a known answer)."""
    prepared = json.loads((demo_dir / "prepared.json").read_text())
    expected = prepared["base_gsm_accuracy"]["level_1"]
    problems = [json.loads(line) for line in (demo_dir / "data" / "math" / "test.jsonl").read_text().splitlines()]
    level_1 = [p for p in problems if p.get("level") == 1][:50]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in level_1))
    output = tmp_path / "results.json"
    argv = [
        "--model", str(demo_dir / "base"), "--tasks", "gsm8k,mmlu", "--gsm8k", str(tmp_path),
        "--num_fewshot", "0", "--max_new_tokens", "64", "--mmlu", str(demo_dir / "data" / "mmlu"), "--limit", "50",
        "--no_progress", "--output", str(output),
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(output.read_text())["results"]
    assert results["gsm8k"]["n"] == 50
    # Their grader reads the number after "####" in the text before the first blank line: our strict match.
    assert results["gsm8k"]["exact_match_strict"] == pytest.approx(expected, abs=0.041)  # 2 of 50 may flip
    assert results["mmlu"]["n"] == 50 and 0.0 <= results["mmlu"]["accuracy"] <= 1.0


def test_evaluate_model_with_the_recipes_arguments(tmp_path: Path) -> None:
    """The call eval.callback.final_evaluation makes at the end of training, and the names it gets back."""
    from eval import evaluate_model

    (tmp_path / "math.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    for split, rows in (("dev", ["q0,1,2,3,4,A"] * 5), ("test", ["q1,1,2,3,4,B", "q2,1,2,3,4,C", "q3,5,6,7,8,D"])):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        (tmp_path / "mmlu" / split / f"toy_{split}.csv").write_text("\n".join(rows) + "\n")
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer).train()
    output: dict = {}
    metrics = evaluate_model(
        model,
        tokenizer,
        tasks=["gsm8k", "mmlu", "length", "diversity"],
        gsm8k_path=str(tmp_path / "math.jsonl"),
        mmlu_dir=str(tmp_path / "mmlu"),
        num_samples=2,
        max_new_tokens=4,
        seed=0,
        embedder=None,
        output=output,
    )
    assert model.training  # handed back as it came
    for name in (
        "eval/gsm8k/accuracy", "eval/gsm8k/exact_match_strict", "eval/mmlu/accuracy", "eval/mmlu/accuracy_macro",
        "eval/length/mean_tokens", "eval/length/frac_hit_limit", "eval/diversity/distinct_mean",
        "eval/diversity/per_input_distinct_mean",
    ):  # fmt: skip
        assert name in metrics, name
    assert metrics["eval/gsm8k/n"] == 2 and metrics["eval/mmlu/n"] == 2 and metrics["eval/length/n"] == 2 * 4
    assert not any(isinstance(v, (dict, str)) for v in metrics.values())
    # The chat template was used (the tokenizer has one) and the full results came back through `output`.
    assert output["samples"]["gsm8k"][0]["prompt"].startswith("<|user|>\n")
    assert output["results"]["mmlu"]["subjects"]["toy"]["n"] == 2
