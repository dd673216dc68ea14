"""Llama 2's combined reward: the gate, whitening, the GRPO callable and the PPO module on rollout token ids."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from recipes.common.reward import (
    CombinedReward,
    CombinedRewardModel,
    PromptSafetyTags,
    RewardCombination,
    RewardModelError,
    check_same_tokenizer,
    combine_rewards,
    last_token_scores,
    load_combined_reward_model,
    load_reward_model,
    reward_tokenize,
    safety_gate,
    safety_tags,
    score,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_gate_follows_the_rule_exactly() -> None:
    # Safety probabilities around the 0.15 threshold, prompts tagged or not.
    safety = torch.tensor([logit(0.10), logit(0.149), logit(0.151), logit(0.9), logit(0.9), logit(0.05)])
    helpful = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    tagged = [False, False, False, False, True, True]
    gate = safety_gate(safety, tagged, 0.15)
    assert gate.tolist() == [True, True, False, False, True, True]
    combined = combine_rewards(helpful, safety, tagged, RewardCombination(whitening="none"))
    expected = [safety[0], safety[1], 3.0, 4.0, safety[4], safety[5]]  # logit(R_c): the chosen raw score
    assert combined.tolist() == pytest.approx([float(x) for x in expected])
    # Without tags, only the threshold decides; without a safety RM, the helpfulness score is used as is.
    assert safety_gate(safety, None, 0.15).tolist() == [True, True, False, False, False, True]
    assert combine_rewards(helpful, combination=RewardCombination(whitening="none")).tolist() == helpful.tolist()


def test_threshold_is_configurable() -> None:
    safety = torch.tensor([logit(0.3), logit(0.6)])
    assert safety_gate(safety, None, 0.5).tolist() == [True, False]
    with pytest.raises(RewardModelError, match="probability"):
        RewardCombination(safety_threshold=1.5)
    with pytest.raises(RewardModelError, match="whitening"):
        RewardCombination(whitening="sometimes")


def test_whitening_batch_and_fixed() -> None:
    helpful = torch.tensor([1.0, 2.0, 3.0, 6.0])
    safety = torch.tensor([5.0, 5.0, 5.0, 5.0])  # sigmoid(5) > 0.15: never gated
    batch = combine_rewards(helpful, safety, None, RewardCombination(whitening="batch"))
    expected = (helpful - helpful.mean()) / helpful.std()
    assert batch.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert float(batch.mean()) == pytest.approx(0.0, abs=1e-6)
    fixed = combine_rewards(
        helpful, safety, None, RewardCombination(whitening="fixed", whiten_mean=2.0, whiten_std=4.0)
    )
    assert fixed.tolist() == pytest.approx([-0.25, 0.0, 0.25, 1.0])
    with pytest.raises(RewardModelError, match="at least 2"):
        combine_rewards(torch.tensor([1.0]), combination=RewardCombination(whitening="batch"))


def test_safety_tags_from_dataset_columns() -> None:
    assert safety_tags(2, {"is_unsafe_prompt": [True, False], "task": ["chat", "unsafe"]}) == [True, False]
    assert safety_tags(3, {"task": ["unsafe", "math", "chat"]}) == [True, False, False]
    assert safety_tags(2, {"answer": ["1", "2"]}) == [False, False]
    assert safety_tags(2, {"flag": [1, 0]}, column="flag") == [True, False]
    with pytest.raises(RewardModelError, match="not among the dataset columns"):
        safety_tags(2, {"task": ["a", "b"]}, column="is_unsafe_prompt")


# ---- real (tiny, random) reward models -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from demo.tokenizer import build_tokenizer

    texts = ["How do I bake bread?", "Mix flour and water, then bake it.", "I can't help with that."] * 20
    return build_tokenizer(texts, vocab_size=300)


def tiny_rm(tokenizer, seed: int) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForSequenceClassification(config).eval()
    torch.nn.init.normal_(model.score.weight, std=0.3)  # scores of order 1
    return model


@pytest.fixture(scope="module")
def rm_dirs(tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    dirs = []
    for name, seed in (("helpful", 0), ("safety", 1)):
        path = tmp_path_factory.mktemp(name)
        tiny_rm(tokenizer, seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return dirs[0], dirs[1]


PROMPTS = [
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "user", "content": "I can't bake."}],
    [{"role": "user", "content": "Bread?"}],
]
COMPLETIONS = [
    [{"role": "assistant", "content": "Mix flour and water, then bake it."}],
    [{"role": "assistant", "content": "I can't help with that."}],
    [{"role": "assistant", "content": "Bake bread with flour."}],
    [{"role": "assistant", "content": "Water."}],
]


def test_reward_tokenize_ends_at_eos(tokenizer) -> None:
    ids = reward_tokenize(tokenizer, PROMPTS[0], COMPLETIONS[0])
    assert ids[-1] == tokenizer.eos_token_id  # the template's trailing "\n" is not scored
    query = tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids[: len(query["input_ids"])] == query["input_ids"]
    text_ids = reward_tokenize(tokenizer, "Q: bread? A:", " Bake it.")
    assert text_ids[-1] == tokenizer.eos_token_id and text_ids[0] == tokenizer.bos_token_id


def test_score_is_batch_independent(tokenizer) -> None:
    model = tiny_rm(tokenizer, 0)
    together = score(model, tokenizer, PROMPTS, COMPLETIONS, batch_size=4)
    alone = torch.cat([score(model, tokenizer, [p], [c]) for p, c in zip(PROMPTS, COMPLETIONS)])
    assert together.shape == (4,) and together.dtype == torch.float32
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    # A completion given as a string means the assistant message.
    texts = [c[0]["content"] for c in COMPLETIONS]
    torch.testing.assert_close(score(model, tokenizer, PROMPTS, texts), together)
    # The user's text as a string prompt, rendered with the chat template on request (as the eval suite passes it).
    user_texts = [p[0]["content"] for p in PROMPTS]
    torch.testing.assert_close(score(model, tokenizer, user_texts, texts, text_as_chat=True), together)
    assert not torch.allclose(score(model, tokenizer, user_texts, texts), together)  # plain text: another input


def split_threshold(rm_dir: Path) -> float:
    """A threshold with safety probabilities on both sides of it, so the gate's threshold rule is exercised."""
    probabilities = torch.sigmoid(score(*load_reward_model(str(rm_dir)), PROMPTS, COMPLETIONS)).sort().values
    return float(probabilities[1:3].mean())


def test_grpo_callable(rm_dirs, tokenizer) -> None:
    threshold = split_threshold(rm_dirs[1])
    combination = RewardCombination(safety_threshold=threshold, whitening="none")
    reward = CombinedReward(str(rm_dirs[0]), str(rm_dirs[1]), combination)
    assert reward.__name__ == "combined_reward"
    tags = [False, True, False, False]
    values = reward(PROMPTS, COMPLETIONS, completion_ids=[[1]] * 4, is_unsafe_prompt=tags, answer=[""] * 4)
    assert isinstance(values, list) and len(values) == 4 and all(isinstance(v, float) for v in values)
    helpful = score(*load_reward_model(str(rm_dirs[0])), PROMPTS, COMPLETIONS)
    safe = score(*load_reward_model(str(rm_dirs[1])), PROMPTS, COMPLETIONS)
    gate = (torch.sigmoid(safe) < threshold) | torch.tensor(tags)
    assert (torch.sigmoid(safe) < threshold).sum() == 2
    assert values == pytest.approx(torch.where(gate, safe, helpful).tolist(), abs=1e-5)
    assert reward.last["safety_gate"].tolist() == gate.tolist()


def ppo_batch(tokenizer) -> tuple[torch.Tensor, int, list[list[int]]]:
    """Left-padded queries + right-padded responses, as the PPO trainer builds its rollouts."""
    pad = tokenizer.pad_token_id
    queries, responses = [], []
    for prompt, completion in zip(PROMPTS, COMPLETIONS):
        full = reward_tokenize(tokenizer, prompt, completion)
        query = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        queries.append(list(query["input_ids"]))
        responses.append(full[len(queries[-1]) :])
    context = max(map(len, queries))
    width = max(map(len, responses))
    rows = [[pad] * (context - len(q)) + q + r + [pad] * (width - len(r)) for q, r in zip(queries, responses)]
    return torch.tensor(rows), context, queries


def test_ppo_module_on_rollout_ids(rm_dirs, tokenizer) -> None:
    threshold = split_threshold(rm_dirs[1])
    combination = RewardCombination(safety_threshold=threshold, whitening="batch")
    _, _, queries = ppo_batch(tokenizer)
    tagger = PromptSafetyTags([queries[1]])  # tags the rows whose prompt is the second prompt (rows 0 and 1)
    module = load_combined_reward_model(str(rm_dirs[0]), str(rm_dirs[1]), tokenizer, combination, tagger)
    query_responses, _, _ = ppo_batch(tokenizer)
    mask = (query_responses != tokenizer.pad_token_id).long()
    logits = module(input_ids=query_responses, attention_mask=mask).logits
    assert logits.shape == (len(PROMPTS), 1)
    rewards = logits[:, 0]
    # The same numbers as scoring the text and combining: the module reads each RM at the response's last token.
    helpful = score(*load_reward_model(str(rm_dirs[0])), PROMPTS, COMPLETIONS)
    safe = score(*load_reward_model(str(rm_dirs[1])), PROMPTS, COMPLETIONS)
    tags = [True, True, False, False]
    torch.testing.assert_close(module.last["helpfulness"], helpful, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(module.last["safety"], safe, rtol=1e-4, atol=1e-4)
    assert module.last["safety_gate"].tolist() == safety_gate(safe, tags, threshold).tolist()
    torch.testing.assert_close(rewards, combine_rewards(helpful, safe, tags, combination), rtol=1e-4, atol=1e-4)
    # raw_scores: the same parts, and the chosen score before whitening
    parts = module.raw_scores(query_responses, mask)
    torch.testing.assert_close(parts["chosen"], torch.where(parts["safety_gate"], safe, helpful), rtol=1e-4, atol=1e-4)


def test_ppo_module_single_rm_matches_the_rm_itself(rm_dirs, tokenizer) -> None:
    """With one RM and no whitening the module gives exactly the RM's own last-token scores."""
    model, _ = load_reward_model(str(rm_dirs[0]))
    module = CombinedRewardModel(model, combination=RewardCombination(whitening="none"))
    query_responses, _, _ = ppo_batch(tokenizer)
    mask = (query_responses != tokenizer.pad_token_id).long()
    combined = module(input_ids=query_responses, attention_mask=mask).logits[:, 0]
    plain = last_token_scores(model, query_responses, mask)
    torch.testing.assert_close(combined, plain.float(), rtol=1e-5, atol=1e-5)
    helpful = score(model, tokenizer, PROMPTS, COMPLETIONS)  # right-padded, positions from 0
    torch.testing.assert_close(plain, helpful, rtol=1e-4, atol=1e-4)


def test_different_tokenizers_are_refused(rm_dirs, tokenizer, tmp_path) -> None:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from demo.tokenizer import build_tokenizer

    other = build_tokenizer(["completely different words here"] * 10, vocab_size=280)
    with pytest.raises(RewardModelError, match=r"safety reward model does not share the policy's tokenizer"):
        check_same_tokenizer(tokenizer, {"safety": other})
    other.save_pretrained(tmp_path)
    tiny_rm(other, 0).save_pretrained(tmp_path)
    with pytest.raises(RewardModelError, match="vocabularies differ"):
        load_combined_reward_model(str(rm_dirs[0]), str(tmp_path), tokenizer)
    check_same_tokenizer(tokenizer, {"helpful": load_reward_model(str(rm_dirs[0]))[1]})  # same: no error
