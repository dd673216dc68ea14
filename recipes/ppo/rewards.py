"""PPO rewards as the `reward_model` that TRL 1.12's `PPOTrainer` calls.

`PPOTrainer` scores a rollout with `trl.experimental.utils.get_reward(model, query_responses, pad_id, context_len)`,
which runs `getattr(model, model.base_model_prefix)(input_ids=..., attention_mask=..., ...)` and reads
`model.score(hidden_states[-1])` at the last response token. `PPOReward` plays that part: its "backbone" finds each
row's prompt (by its exact token ids, from the prompts we tokenized), splits off the response and scores it with

- `math`: the evaluation suite's GSM8K grader (`eval.gsm8k.grade`, the one grader) against the prompt's reference
  answer, 1.0 correct / 0.0 wrong, plus optionally `partial_credit` x the F1 overlap between the numbers of the
  response and those of the reference solution (its intermediate results), a denser signal for a weak policy; or
- `reward_model`: a sequence-classification reward model, or the combined helpfulness + safety module, scored
  through the same `get_reward` on the original token ids;

and broadcasts that score over all positions, so `score` can be the identity. It also keeps the raw scores and the
response lengths of each rollout for logging (TRL logs neither the reward's spread nor the length).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, Literal, get_args

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from trl.experimental.ppo import PPOConfig

from recipes.common.reward import (
    CombinedRewardModel,
    PromptSafetyTags,
    combination_for,
    load_reward_model,
    safety_tags,
)

RewardSource = Literal["math", "reward_model"]  # `reward_source` in the PPO config
REWARD_SOURCES = get_args(RewardSource)


class PromptTable:
    """Every prompt of the run by its exact token ids, with its row's metadata (reference answer, task)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[int, ...], dict[str, Any]] = {}
        self.lengths: list[int] = []

    def add(self, input_ids: Sequence[int], row: dict[str, Any]) -> None:
        self.rows[tuple(input_ids)] = row
        if len(input_ids) not in self.lengths:
            self.lengths = sorted({*self.lengths, len(input_ids)}, reverse=True)

    def split(self, tokens: list[int]) -> tuple[int, dict[str, Any]]:
        """(prompt length, prompt row) of a prompt + response token list; the longest matching prompt wins."""
        for length in self.lengths:
            row = self.rows.get(tuple(tokens[:length]))
            if row is not None:
                return length, row
        raise KeyError("a rollout starts with a prompt that is not in the PPO prompt table")


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def number_f1(response: str, reference: str) -> float:
    """F1 overlap of the numbers (as multisets, normalised like the grader does) in a response and a reference
    solution: 1.0 when the response uses exactly the reference's numbers, whatever the order."""
    from eval.gsm8k import normalize_number

    ours = Counter(normalize_number(n) for n in NUMBER.findall(response))
    theirs = Counter(normalize_number(n) for n in NUMBER.findall(reference))
    common = sum((ours & theirs).values())
    return 2 * common / (sum(ours.values()) + sum(theirs.values())) if common else 0.0


class PPOReward(nn.Module):
    """A `get_reward`-compatible reward module (see the module docstring)."""

    base_model_prefix = "score_rollouts"

    def __init__(
        self,
        source: RewardSource,
        tokenizer: PreTrainedTokenizerBase,
        prompts: PromptTable,
        reward_model: nn.Module | None = None,
        math_grading: str = "flexible",
        partial_credit: float = 0.0,
    ) -> None:
        super().__init__()
        if source == "reward_model" and reward_model is None:
            raise ValueError("reward_source 'reward_model' needs a reward model.")
        self.source = source
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.reward_model = reward_model
        self.math_grading = math_grading
        self.partial_credit = partial_credit
        self.recording = True
        self.records: list[dict[str, torch.Tensor]] = []  # per call: scores, lengths, has_eos (+ RM components)

    def score(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def score_rollouts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> SimpleNamespace:
        # `get_reward` hands us pad positions already replaced by 0 and the mask of real tokens.
        rows = [ids[mask].tolist() for ids, mask in zip(input_ids, attention_mask.bool())]
        splits = [self.prompts.split(tokens) for tokens in rows]
        responses = [tokens[length:] for tokens, (length, _) in zip(rows, splits)]
        if self.source == "math":
            from eval.gsm8k import grade

            texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            scores = []
            for text, (_, row) in zip(texts, splits):
                score = float(grade(text, row["answer"], self.math_grading))
                if self.partial_credit:
                    score += self.partial_credit * number_f1(text, row["answer"])
                scores.append(score)
            scores = torch.tensor(scores, device=input_ids.device)
        else:
            scores = self._reward_model_scores(input_ids, attention_mask, splits)
        if self.recording:
            eos = self.tokenizer.eos_token_id
            record = {
                "scores": scores.detach().float().cpu(),
                "lengths": torch.tensor([len(r) for r in responses], dtype=torch.float),
                "has_eos": torch.tensor([float(eos in r) for r in responses]),
            }
            # The combined RM module keeps its raw parts (helpfulness, safety, gate) of the last call.
            for name, values in getattr(self.reward_model, "last", {}).items():
                if name != "reward":
                    record[name] = values.detach().float().cpu()
            self.records.append(record)
        per_position = scores.float()[:, None, None].expand(-1, input_ids.shape[1], 1)
        return SimpleNamespace(hidden_states=(per_position,))

    def _reward_model_scores(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, splits: list[tuple[int, dict[str, Any]]]
    ) -> torch.Tensor:
        from trl.experimental.utils import get_reward

        # Queries are left-padded to one width, so first real token + prompt length is the same for every row.
        first_real = attention_mask.long().argmax(dim=1)
        context_lengths = {int(start) + length for start, (length, _) in zip(first_real, splits)}
        if len(context_lengths) != 1:
            raise ValueError(f"rollouts of one batch have different prompt widths {sorted(context_lengths)}")
        pad_id = self.tokenizer.pad_token_id
        query_responses = input_ids.masked_fill(~attention_mask.bool(), pad_id)
        _, scores, _ = get_reward(self.reward_model, query_responses, pad_id, context_lengths.pop())
        return scores

    def pop_metrics(self) -> dict[str, torch.Tensor]:
        """Everything recorded since the last call, concatenated per name."""
        records, self.records = self.records, []
        return {name: torch.cat([record[name] for record in records]) for name in (records[0] if records else {})}


TRL_PLACEHOLDER_PATH = PPOConfig.reward_model_path  # PPOConfig's default ("EleutherAI/pythia-160m"): means unset


def reward_model_path(training_args: PPOConfig) -> str | None:
    """`PPOConfig.reward_model_path`, None while it holds TRL's placeholder default."""
    path = training_args.reward_model_path
    return None if path == TRL_PLACEHOLDER_PATH else path


def load_reward_models(
    tokenizer: PreTrainedTokenizerBase, prompts: PromptTable, training_args: PPOConfig, ppo_args: Any
) -> CombinedRewardModel | None:
    """The combined helpfulness (+ safety) reward model, or None for the math reward."""
    if ppo_args.reward_source != "reward_model":
        return None
    # Tokenizers were checked by `check_same_tokenizers` (modulo the pad token, which PPO takes from the policy).
    helpfulness, _ = load_reward_model(reward_model_path(training_args))
    safety = load_reward_model(ppo_args.safety_reward_model_path)[0] if ppo_args.safety_reward_model_path else None
    unsafe = [ids for ids, row in prompts.rows.items() if safety_tags(1, {k: [v] for k, v in row.items()})[0]]
    return CombinedRewardModel(
        helpfulness,
        safety,
        combination_for(ppo_args, reward_model_path(training_args)),
        safety_tagger=PromptSafetyTags(unsafe) if unsafe else None,
    )
