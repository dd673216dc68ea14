"""Reward and KL: a callable reward, saved reward models (full and LoRA), KL of a LoRA policy to its base."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForSequenceClassification

from eval.data import EvalError
from eval.generation import generate
from eval.reward_kl import kl_to_reference, load_reward_model, reward_metrics
from eval.suite import EvalData, Prompt, run_tasks
from eval.testing import build_char_tokenizer, build_tiny_model, save_tiny_reward_model

PROMPTS = ["Question: 2+3?\nAnswer:", "Say hi", "Question: 10-4?\nAnswer:"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _lora(model, seed: int = 0, perturb: bool = True):
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    if perturb:  # LoRA starts as the identity (B = 0); move B so the policy differs from its base
        torch.manual_seed(seed)
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.5)
    return policy.eval()


def test_reward_metrics_from_callables() -> None:
    def length_reward(prompts: list[str], completions: list[str]) -> list[float]:
        return [float(len(c)) for c in completions]

    def constant(prompts: list[str], completions: list[str]) -> list[float]:
        return [1.0] * len(completions)

    metrics, per_sample = reward_metrics({"len": length_reward, "one": constant}, ["p", "q"], ["ab", "abcd"])
    assert metrics["mean"] == 3.0 and metrics["std"] == 1.0  # the first reward is the primary one
    assert metrics["len/mean"] == 3.0 and metrics["one/mean"] == 1.0 and metrics["one/std"] == 0.0
    assert per_sample["len"] == [2.0, 4.0]


def test_kl_is_zero_for_untrained_lora_and_matches_an_explicit_reference(tokenizer) -> None:
    base = build_tiny_model(tokenizer, seed=3)
    reference = copy.deepcopy(base)
    outputs = generate(
        base, tokenizer, PROMPTS, max_new_tokens=10, do_sample=True, num_return_sequences=2, seed=0, progress=False
    )
    prompt_ids = [c.prompt_ids for group in outputs for c in group]
    completion_ids = [c.token_ids for group in outputs for c in group]

    identity = _lora(copy.deepcopy(base), perturb=False)
    metrics, _ = kl_to_reference(identity, prompt_ids, completion_ids, pad_id=tokenizer.pad_token_id, progress=False)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-5)

    policy = _lora(copy.deepcopy(base))
    with_adapter_off, per_sample = kl_to_reference(
        policy, prompt_ids, completion_ids, pad_id=tokenizer.pad_token_id, progress=False
    )
    with_copy, _ = kl_to_reference(
        policy, prompt_ids, completion_ids, ref_model=reference, pad_id=tokenizer.pad_token_id, progress=False
    )
    assert with_adapter_off["kl"] == pytest.approx(with_copy["kl"], abs=1e-4)
    assert with_adapter_off["kl"] != pytest.approx(0.0, abs=1e-3)
    assert len(per_sample) == len(completion_ids)
    # The adapter is active again afterwards.
    assert kl_to_reference(policy, prompt_ids, completion_ids, ref_model=reference, progress=False)[0]["kl"] == (
        pytest.approx(with_copy["kl"], abs=1e-4)
    )


def test_kl_without_any_reference_fails_clearly(tokenizer) -> None:
    model = build_tiny_model(tokenizer)
    with pytest.raises(EvalError, match="reference"):
        kl_to_reference(model, [[1, 2]], [[3]], progress=False)


def test_saved_reward_models_full_and_lora(tmp_path: Path, tokenizer) -> None:
    save_tiny_reward_model(tmp_path / "rm", tokenizer)
    reward = load_reward_model(str(tmp_path / "rm"), batch_size=2)
    prompts, completions = ["2+3?", "hello", "10-4?"], ["5", "hi there, friend", "6"]
    batched = reward(prompts, completions)
    one_by_one = [reward([p], [c])[0] for p, c in zip(prompts, completions)]
    assert batched == pytest.approx(one_by_one, abs=1e-5)  # padding does not move the score

    base = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm")
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["score"]))
    with torch.no_grad():
        adapter.base_model.model.score.modules_to_save["default"].weight.fill_(0.01)
    adapter.save_pretrained(tmp_path / "rm_lora")
    lora_reward = load_reward_model(str(tmp_path / "rm_lora"))
    assert isinstance(lora_reward.model, PeftModel)
    assert lora_reward(prompts, completions) != pytest.approx(batched, abs=1e-6)  # its own score head


def test_reward_task_in_the_suite(tokenizer) -> None:
    policy = _lora(build_tiny_model(tokenizer, seed=4))
    data = EvalData(prompts=[Prompt("2+3?"), Prompt("hello")])
    seen: list[str] = []

    def reward_fn(prompts: list[str], completions: list[str]) -> list[float]:
        seen.extend(prompts)
        return [-float(len(c)) for c in completions]

    out = run_tasks(
        policy,
        tokenizer,
        ["reward", "length"],
        data,
        chat=True,
        max_new_tokens=6,
        samples_per_prompt=2,
        reward_fns={"short": reward_fn},
        progress=False,
    )
    reward = out["results"]["reward"]
    assert reward["n"] == 4 and {"mean", "short/mean", "kl", "kl_std"} <= set(reward)
    assert reward["mean"] == pytest.approx(-out["results"]["length"]["mean_chars"])
    assert sorted(set(seen)) == ["2+3?", "hello"]  # reward functions see the user's text, not the template
    with pytest.raises(EvalError, match="nothing to measure"):
        run_tasks(build_tiny_model(tokenizer), tokenizer, ["reward"], data, chat=True, progress=False)
