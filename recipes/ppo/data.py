"""PPO prompts and tokenizer: what the PPO trainer expects, checked before any model loads.

The trainer takes a dataset of `input_ids` only and pads each batch on the left with the tokenizer's pad token
(`DataCollatorWithPadding`, which also gives the attention mask). So:
- the tokenizer pads on the left, and its pad token is not EOS (a reward model reads its score at the last non-pad
  token, and padding with EOS would hide the EOS at the end of a response) and appears in no prompt;
- every prompt leaves room for `response_length` tokens in the model's context;
- every reward/value model reads the policy's token ids unchanged, so they must share its tokenizer.
"""

from __future__ import annotations

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from recipes.common import policy as common_policy
from recipes.common.config import ConfigError, QLoRAModelConfig
from recipes.common.data import DataError
from recipes.common.modeling import ModelLoadError
from recipes.common.reward import RewardModelError, check_same_tokenizer, load_reward_tokenizer
from recipes.ppo.rewards import PromptTable

# TRL's prompt-only format (`prompt`: messages or text, + `answer` for the math reward), or GSM8K's question/answer.
PPO_FORMATS = [["prompt"], ["question", "answer"]]


def load_policy_tokenizer(model_args: QLoRAModelConfig, pad_token: str | None, chat: bool) -> PreTrainedTokenizerBase:
    """The SFT run's tokenizer, padding on the left with a token other than EOS: `pad_token` when given, else the one
    the SFT run saved, else one `recipes.common.modeling.set_pad_token` picks."""
    return common_policy.load_policy_tokenizer(
        model_args, require_chat_template=chat, padding_side="left", pad_token=pad_token
    )


def check_same_tokenizers(tokenizer: PreTrainedTokenizerBase, model_paths: dict[str, str | None]) -> None:
    """Every reward/value model (name -> output dir) must read the policy's token ids as the same text."""
    others = {}
    for name, path in model_paths.items():
        if path:
            other = load_reward_tokenizer(path)
            # What PPO never takes from these tokenizers: padding (masked by the policy's pad id) and the chat
            # template (rollouts are rendered by the policy's; e.g. TRL's SFT swaps in an equivalent training one).
            other.pad_token = tokenizer.pad_token
            other.chat_template = tokenizer.chat_template
            others[f"{name} model ({path})"] = other
    try:
        check_same_tokenizer(tokenizer, others)
    except RewardModelError as err:
        raise ModelLoadError(str(err)) from err


def select_prompts(dataset: Dataset, needs_answer: bool, where: str) -> Dataset:
    """TRL's prompt format (GSM8K's question becomes one user turn, as in SFT and the eval suite); with the math
    reward, only rows that have an `answer` to grade against (the demo's chat and safety prompts have none)."""
    if "prompt" not in dataset.column_names:
        dataset = dataset.map(
            lambda row: {"prompt": [{"role": "user", "content": row["question"]}]}, remove_columns=["question"]
        )
    if needs_answer:
        if "answer" not in dataset.column_names:
            raise DataError(f"{where} have no `answer` column, which the math reward grades against.")
        dataset = dataset.filter(lambda row: bool(row["answer"]))
        if len(dataset) == 0:
            raise DataError(f"{where}: no row has an `answer`; the math reward needs math prompts with answers.")
    return dataset


def tokenize_prompts(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    prompts: PromptTable,
    context_length: int | None,
    response_length: int,
    drop_long_prompts: bool,
    where: str,
) -> Dataset:
    """`input_ids` only (what the trainer's collator pads); each prompt is also registered in `prompts`, with its
    row's other columns, for the reward."""
    if context_length is not None:
        limit = context_length - response_length + 1
        if limit <= 1:
            raise ConfigError(f"response_length {response_length} fills the model's context ({context_length}).")
        dataset = common_policy.check_prompt_lengths(
            dataset, tokenizer, limit, where, "context - response_length", drop=drop_long_prompts
        )

    def tokenize(row: dict) -> dict:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if tokenizer.pad_token_id in ids:
            raise DataError(f"{where}: a prompt contains the pad token {tokenizer.pad_token!r}, which PPO masks out.")
        return {"input_ids": ids}

    tokenized = dataset.map(tokenize, remove_columns=dataset.column_names)
    for ids, row in zip(tokenized["input_ids"], dataset):
        prompts.add(ids, {k: v for k, v in row.items() if k != "prompt"})
    return tokenized
