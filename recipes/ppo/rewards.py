"""PPO rewards: the score of each sampled response, at its last token (the trainer adds the per-token KL penalty).

- `math`: the evaluation suite's GSM8K grader (`eval.gsm8k.grade`, the one grader) against the prompt's reference
  answer, 1.0 correct / 0.0 wrong, plus optionally `partial_credit` x the F1 overlap between the numbers of the
  response and those of the reference solution (its intermediate results), a denser signal for a weak policy;
- `reward_model`: one reward model, or Llama 2's combination of the helpfulness and safety RMs with the safety gate
  (`recipes.common.reward.CombinedRewardModel`), each reading the policy's token ids. Their batch whitening runs
  over the whole rollout batch of every process at once (`PPOReward` scores the batch in chunks of
  `local_rollout_forward_batch_size` and whitens afterwards), so the reward's scale does not depend on the chunk
  size or the number of processes. RMs trained on the policy's base run as adapters on it (`recipes/ppo/modeling.py`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from transformers import PreTrainedTokenizerBase

from recipes.common.reward import (
    CombinedRewardModel,
    PromptSafetyTags,
    combination_for,
    load_reward_model,
    safety_tags,
    whiten,
)

RewardSource = Literal["math", "reward_model"]  # `reward_source` in the PPO config
REWARD_SOURCES = get_args(RewardSource)


class PromptTable:
    """Every prompt of the run by its exact token ids, with its row's metadata (reference answer, task)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[int, ...], dict[str, Any]] = {}

    def add(self, input_ids: Sequence[int], row: dict[str, Any]) -> None:
        self.rows[tuple(input_ids)] = row

    def row(self, input_ids: Sequence[int]) -> dict[str, Any]:
        row = self.rows.get(tuple(input_ids))
        if row is None:
            raise KeyError("a rollout starts with a prompt that is not in the PPO prompt table")
        return row


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def number_f1(response: str, reference: str) -> float:
    """F1 overlap of the numbers (as multisets, normalised like the grader does) in a response and a reference
    solution: 1.0 when the response uses exactly the reference's numbers, whatever the order."""
    from eval.gsm8k import normalize_number

    ours = Counter(normalize_number(n) for n in NUMBER.findall(response))
    theirs = Counter(normalize_number(n) for n in NUMBER.findall(reference))
    common = sum((ours & theirs).values())
    return 2 * common / (sum(ours.values()) + sum(theirs.values())) if common else 0.0


class PPOReward:
    """`reward(queries, query_mask, responses, response_mask) -> scores`, one float per rollout (see the module
    docstring). Queries are left-padded, responses right-padded; the masks say which tokens are real. After each call
    `last` holds the combined RM's parts (raw helpfulness, safety, gate) for logging."""

    def __init__(
        self,
        source: RewardSource,
        tokenizer: PreTrainedTokenizerBase,
        prompts: PromptTable,
        reward_model: CombinedRewardModel | None = None,
        math_grading: str = "flexible",
        partial_credit: float = 0.0,
        chunk_size: int = 64,
    ) -> None:
        if source == "reward_model" and reward_model is None:
            raise ValueError("reward_source 'reward_model' needs a reward model.")
        self.source = source
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.reward_model = reward_model
        self.math_grading = math_grading
        self.partial_credit = partial_credit
        self.chunk_size = chunk_size
        self.last: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(
        self, queries: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        if self.source == "math":
            return self._math_scores(queries, query_mask, responses, response_mask)
        input_ids = torch.cat([queries, responses], dim=1)
        attention_mask = torch.cat([query_mask, response_mask], dim=1).long()
        chunks = [
            self.reward_model.raw_scores(input_ids[i : i + self.chunk_size], attention_mask[i : i + self.chunk_size])
            for i in range(0, len(input_ids), self.chunk_size)
        ]
        parts = {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}
        rm_scores = parts.pop("chosen")  # before whitening: the reward model's own scale, for the logs
        scores = whiten(rm_scores, self.reward_model.combination)  # the whole batch, every process
        self.last = {**parts, "rm_score": rm_scores}
        return scores.float()

    def _math_scores(self, queries, query_mask, responses, response_mask) -> torch.Tensor:
        from eval.gsm8k import grade

        scores = []
        for query, qmask, response, rmask in zip(queries, query_mask.bool(), responses, response_mask.bool()):
            row = self.prompts.row(query[qmask].tolist())
            text = self.tokenizer.decode(response[rmask].tolist(), skip_special_tokens=True)
            score = float(grade(text, row["answer"], self.math_grading))
            if self.partial_credit:
                score += self.partial_credit * number_f1(text, row["answer"])
            scores.append(score)
        self.last = {}
        return torch.tensor(scores, device=queries.device)


def load_reward_models(
    tokenizer: PreTrainedTokenizerBase,
    prompts: PromptTable,
    training_args: Any,
    ppo_args: Any,
    model_args: Any,
    shared: Any,
) -> CombinedRewardModel | None:
    """The combined helpfulness (+ safety) reward model, or None for the math reward. An RM trained on the policy's
    base runs as an adapter on it (`share_base`), any other is loaded on its own."""
    from recipes.ppo.modeling import add_head_adapter, shares_base

    if ppo_args.reward_source != "reward_model":
        return None
    # Tokenizers were checked by `check_same_tokenizers` (modulo the pad token, which PPO takes from the policy).

    def load(path: str, name: str) -> torch.nn.Module:
        if ppo_args.share_base and shares_base(path, model_args, as_reward_model=True):
            return add_head_adapter(shared, path, f"reward_{name}").eval()
        return load_reward_model(path)[0]

    helpfulness = load(training_args.reward_model_path, "helpfulness")
    safety = load(ppo_args.safety_reward_model_path, "safety") if ppo_args.safety_reward_model_path else None
    unsafe = [ids for ids, row in prompts.rows.items() if safety_tags(1, {k: [v] for k, v in row.items()})[0]]
    return CombinedRewardModel(
        helpfulness,
        safety,
        combination_for(ppo_args, training_args.reward_model_path),
        safety_tagger=PromptSafetyTags(unsafe) if unsafe else None,
    )
