"""PPO recipe parts on a tiny in-memory model: the prompt stream, the reward, the shared base's adapter switch."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorWithPadding

from eval.testing import build_char_tokenizer, build_tiny_model
from recipes.ppo.modeling import POLICY_ADAPTER, REFERENCE_ADAPTER, VALUE_ADAPTER, SharedBase
from recipes.ppo.rewards import PPOReward, PromptTable
from recipes.ppo.trainer import PromptBatches


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


def batches(dataset: Dataset, n: int, **kwargs) -> list[list[int]]:
    stream = PromptBatches(dataset, lambda rows: [row["i"] for row in rows], **kwargs)
    iterator = iter(stream)
    return [next(iterator) for _ in range(n)]


def test_prompt_batches_cover_each_epoch_once_and_reshuffle() -> None:
    dataset = Dataset.from_dict({"i": list(range(10))})
    first = batches(dataset, 10, local_batch_size=2, world_size=1, rank=0, seed=0)
    assert sorted(sum(first[:5], [])) == list(range(10))  # epoch 0: every prompt once
    assert sorted(sum(first[5:], [])) == list(range(10))  # epoch 1: again, in another order
    assert sum(first[:5], []) != sum(first[5:], [])
    assert first == batches(dataset, 10, local_batch_size=2, world_size=1, rank=0, seed=0)  # reproducible


def test_prompt_batches_start_anywhere_like_an_uninterrupted_run() -> None:
    dataset = Dataset.from_dict({"i": list(range(9))})  # 9 // 2 = 4 batches per epoch, one row left out
    full = batches(dataset, 11, local_batch_size=2, world_size=1, rank=0, seed=3)
    stream = PromptBatches(dataset, lambda rows: [row["i"] for row in rows], 2, 1, 0, 3)
    stream.start_batch = 6  # mid second epoch
    iterator = iter(stream)
    assert [next(iterator) for _ in range(5)] == full[6:]


def test_prompt_batches_split_global_batches_between_ranks() -> None:
    dataset = Dataset.from_dict({"i": list(range(16))})
    rank0 = batches(dataset, 4, local_batch_size=2, world_size=2, rank=0, seed=0)
    rank1 = batches(dataset, 4, local_batch_size=2, world_size=2, rank=1, seed=0)
    seen = sum(rank0, []) + sum(rank1, [])
    assert sorted(seen) == list(range(16))  # disjoint, and together one epoch


def test_prompt_batches_refuse_a_dataset_smaller_than_a_batch() -> None:
    with pytest.raises(ValueError, match="cannot fill one rollout batch"):
        PromptBatches(Dataset.from_dict({"i": [0, 1, 2]}), list, 2, 2, 0, 0)


def make_prompts(tokenizer) -> tuple[PromptTable, list[list[int]]]:
    table, ids = PromptTable(), []
    for question, answer in [("What is 2+3?", "2+3=5\n#### 5"), ("What is 10-4?", "#### 6")]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        table.add(prompt_ids, {"answer": answer, "task": "math"})
        ids.append(prompt_ids)
    return table, ids


def rollout(tokenizer, prompt_ids: list[list[int]], responses: list[str]):
    """Left-padded queries + right-padded responses with their masks, as the trainer hands them to the reward."""
    batch = DataCollatorWithPadding(tokenizer)([{"input_ids": ids} for ids in prompt_ids])
    response_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in responses]
    width = max(len(r) for r in response_ids)
    padded = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in response_ids])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in response_ids])
    return batch["input_ids"], batch["attention_mask"], padded, mask


def test_math_reward_grades_each_response_against_its_prompt(tokenizer) -> None:
    table, prompt_ids = make_prompts(tokenizer)
    reward = PPOReward("math", tokenizer, table)
    # EOS inside the prompt (end of the user turn) and at the end of a response must not confuse the lookup.
    scores = reward(*rollout(tokenizer, prompt_ids, ["2+3=5\n#### 5</s>", "10-4=7\n#### 7"]))
    assert scores.tolist() == [1.0, 0.0]


def test_reward_model_source_reads_the_rollout_and_whitens_the_whole_batch(tokenizer) -> None:
    from recipes.common.reward import CombinedRewardModel, RewardCombination

    table, prompt_ids = make_prompts(tokenizer)
    seen = []

    class LastTokenRM(torch.nn.Module):  # scores a sequence by its last attended token id
        base_model_prefix = "backbone"

        def backbone(self, input_ids, attention_mask, **kwargs):
            seen.append(input_ids)
            return type("Out", (), {"last_hidden_state": input_ids.float()[:, :, None]})

        def score(self, hidden):
            return hidden

    rm = CombinedRewardModel(LastTokenRM(), combination=RewardCombination(whitening="batch"))
    reward = PPOReward("reward_model", tokenizer, table, reward_model=rm, chunk_size=1)
    queries, query_mask, responses, mask = rollout(tokenizer, prompt_ids * 2, ["7", "89", "5", "6"])
    scores = reward(queries, query_mask, responses, mask)
    raw = torch.tensor([float(tokenizer.convert_tokens_to_ids(c)) for c in "7956"])
    # scored one row at a time (chunk_size 1), whitened over all four rows
    torch.testing.assert_close(scores, (raw - raw.mean()) / (raw.std() + 1e-6))
    torch.testing.assert_close(reward.last["helpfulness"], raw)
    assert len(seen) == 4 and torch.equal(seen[0], torch.cat([queries, responses], 1)[:1])


def test_unknown_prompt_is_an_error(tokenizer) -> None:
    table, _ = make_prompts(tokenizer)
    reward = PPOReward("math", tokenizer, table)
    with pytest.raises(KeyError, match="not in the PPO prompt table"):
        reward(*rollout(tokenizer, [tokenizer("not a prompt", add_special_tokens=False)["input_ids"]], ["5"]))


def test_shared_base_switches_adapters_and_keeps_what_trains(tokenizer) -> None:
    base = build_tiny_model(tokenizer)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    policy = get_peft_model(base, config)  # "default": the trained adapter
    for name in (REFERENCE_ADAPTER, VALUE_ADAPTER):
        policy.add_adapter(name, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    shared = SharedBase(policy)
    shared.set_trainable({POLICY_ADAPTER, VALUE_ADAPTER})
    policy.train()
    inputs = {"input_ids": torch.tensor([tokenizer("What is 2+3?")["input_ids"]])}
    trainable_before = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable_before and all(f".{POLICY_ADAPTER}." in n or f".{VALUE_ADAPTER}." in n for n in trainable_before)

    with torch.no_grad():
        with shared.use(REFERENCE_ADAPTER):
            reference_logits = policy(**inputs).logits
        with shared.use(None):
            base_logits = policy(**inputs).logits
        policy_logits = policy(**inputs).logits
        policy.set_adapter(REFERENCE_ADAPTER)
        expected_reference = policy(**inputs).logits
        policy.set_adapter(POLICY_ADAPTER)
        with policy.disable_adapter():
            expected_base = policy(**inputs).logits

    torch.testing.assert_close(reference_logits, expected_reference)
    torch.testing.assert_close(base_logits, expected_base)
    assert not torch.allclose(reference_logits, policy_logits)
    shared.set_trainable({POLICY_ADAPTER, VALUE_ADAPTER})  # peft's set_adapter above changed the flags
    for adapter in (REFERENCE_ADAPTER, VALUE_ADAPTER, None):
        with shared.use(adapter):
            pass
        assert policy.active_adapter == POLICY_ADAPTER
        assert {name for name, p in policy.named_parameters() if p.requires_grad} == trainable_before


def test_checkpoints_of_other_runs_are_refused_before_models_load(tmp_path) -> None:
    import json

    from recipes.common.config import ConfigError
    from recipes.ppo.config import BatchPlan
    from recipes.ppo.trainer import check_resumable

    plan = BatchPlan(local_batch_size=4, batch_size=8, local_mini_batch_size=4, updates=3)
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"max_steps": 3, "episode": 8, "train_batch_size": 8, "global_step": 1}))
    check_resumable(str(tmp_path), plan)  # the same run: fine
    state.write_text(json.dumps({"max_steps": 3, "episode": 8, "train_batch_size": 16, "global_step": 1}))
    with pytest.raises(ConfigError, match="3 PPO updates of 16 rollouts, this config gives 3 of 8"):
        check_resumable(str(tmp_path), plan)
    state.write_text(json.dumps({"max_steps": 3, "episode": 8, "global_step": 1}))  # TRL's PPOTrainer state
    with pytest.raises(ConfigError, match="not written by this PPO trainer"):
        check_resumable(str(tmp_path), plan)
