"""Reward models for every recipe: load a trained RM, score completions, combine helpfulness and safety as Llama 2.

Public API (PPO, GRPO, rejection sampling and evaluation all use these; nothing else here is public)::

    load_reward_model(path, load_in_4bit=None, dtype=None, device=None) -> (model, tokenizer)
        An RM output dir of recipes/reward/train.py (base from adapter_config.json + LoRA adapter + score head), or a
        full sequence-classification model. 4-bit by default exactly when the RM was trained in 4-bit.
    load_reward_tokenizer(path) -> tokenizer
        Only the tokenizer an RM was trained with (cheap; for checks before loading weights).
    reward_tokenize(tokenizer, prompt, completion) -> list[int]
        The token ids an RM scores: training (recipes/reward/train.py) and `score` both use this one function.
    score(model, tokenizer, prompts, completions, batch_size=16, max_length=None, text_as_chat=False) -> torch.Tensor
        Raw scores (float32, CPU), one per (prompt, completion); conversational or plain text (`text_as_chat=True`:
        string prompts are the user's message, rendered with the chat template).
    RewardCombination(safety_threshold=0.15, whitening="batch", whiten_mean=0.0, whiten_std=1.0)
        The settings of the combination below.
    combination_for(config, helpfulness_path) -> RewardCombination
        The combination a GRPO or PPO config asks for (`reward_whitening`, `reward_whitening_mean`/`_std`,
        `safety_threshold`, `safety_reward_model_path`), with `fixed` statistics resolved (see below).
    safety_gate(safety_scores, safety_relevant, threshold) -> BoolTensor
        True where the safety score is used: the prompt is safety-relevant, or sigmoid(r_s) < threshold.
    combine_rewards(helpfulness_scores, safety_scores=None, safety_relevant=None, combination=None) -> torch.Tensor
        Llama 2's R = whiten(logit(R_c)), R_c = R_s if safety-relevant or R_s < 0.15 else R_h, on raw RM scores.
    whiten(values, combination) -> torch.Tensor
        The whitening step alone (batch statistics over all processes, fixed ones, or none).
    safety_tags(num_rows, columns, column=None) -> list[bool]
        Prompt-level safety tags from dataset columns (`is_unsafe_prompt`, or `task == "unsafe"`).
    CombinedReward(helpfulness, safety=None, combination=None, safety_column=None, batch_size=16, text_as_chat=False)
        Callable `f(prompts, completions, **kwargs) -> list[float]` for GRPO's `reward_funcs` and rejection sampling.
    CombinedRewardModel(helpfulness_model, safety_model=None, combination=None, safety_tagger=None)
        The same on token ids, as an `nn.Module` (PPO): `module(input_ids, attention_mask).logits` (B, 1), or
        `raw_scores(...)`, the parts before whitening (PPO whitens its whole rollout batch at once).
    last_token_scores(model, input_ids, attention_mask) -> torch.Tensor
        A sequence classifier's score at each row's last attended token, with positions counted from the first
        attended one (left-padded prompts): how PPO reads an RM on its rollouts.
    load_combined_reward_model(helpfulness_path, safety_path, policy_tokenizer, combination=None, ...) -> module
        Loads both RMs, checks they share the policy's tokenizer, returns a `CombinedRewardModel`.
    PromptSafetyTags(prompt_token_ids)
        A `safety_tagger` for the PPO module: tags rows whose tokens start with one of the given prompts.
    check_same_tokenizer(reference, others, reference_name="policy") -> None
        RewardModelError naming the model and what differs, when token ids would not mean the same thing.
    RewardModelError
        What went wrong, where, and how to fix it.
    RATINGS, normalize_rating(value) -> str
        Llama 2's preference-strength scale (strongest first) and a rating name or integer 0-3 mapped onto it: the
        reward data's `rating` column and the margin loss in training, the per-rating accuracy in evaluation.
    SAFETY_THRESHOLD = 0.15, KL_BETA = {"7B": 0.01, "13B": 0.01, "34B": 0.005, "70B": 0.005}
        Llama 2's values (KL_BETA is documentation: the KL penalty belongs to the RL trainer).

The combination (Touvron et al. 2023, Llama 2, section 3.2.2). Both RMs end in a linear score head; sigmoid(r) is
the "score" of the paper. `logit(sigmoid(r)) == r`, so whitening the logit of the chosen score is whitening the chosen
RM's raw score: we use the raw score (exact; no clamping of probabilities near 0 or 1) and the sigmoid only for the
0.15 gate. The KL penalty to the reference policy is not part of this reward: it stays in the RL trainer
(`kl_coef` in PPO, `beta` in GRPO); the paper used beta = 0.01 for 7B and 13B and 0.005 for 34B and 70B.

Whitening statistics: `whitening="batch"` uses the mean and standard deviation of the combined scores in each call,
taken over every process's scores of that call when torch.distributed is initialized (GRPO splits one generation
batch, and a prompt's group, across processes; PPO whitens each whole rollout batch of every process): all processes must
then call together, as the trainers do. `"fixed"` uses constant statistics, so one response gets the same reward
whatever else is in its batch: the config's `reward_whitening_mean`/`reward_whitening_std`, or, when those are unset,
the helpfulness RM's `score_mean`/`score_std` from its `rm_eval.json` (its scores on the chosen and rejected
responses of its eval split, written by recipes/reward/train.py); with a safety RM as well, give them in the config
(one RM's statistics do not describe the other's scores). `"none"` returns logit(R_c) as it is. GRPO normalises
rewards per group anyway: there whitening only sets the scale relative to other reward functions.

What "safety-relevant" means where:
- `CombinedReward` (GRPO, rejection sampling) sees the dataset's columns and takes the prompt's tag from them.
- `CombinedRewardModel` (PPO) sees only token ids. By default it applies the threshold rule alone (R_s < 0.15 selects
  the safety score); give it a `safety_tagger` (e.g. `PromptSafetyTags` built from the tokenized unsafe prompts) to
  also tag prompts. Every RM then reads the policy's token ids, so all of them must use the policy's tokenizer:
  `load_combined_reward_model` checks that and raises `RewardModelError` when they do not.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, get_args

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from recipes.common.errors import UserError
from recipes.common.modeling import keep_4bit_weights_unpacked

SAFETY_THRESHOLD = 0.15  # Llama 2: precision 0.89 / recall 0.55 on unsafe responses of their eval set
KL_BETA = {"7B": 0.01, "13B": 0.01, "34B": 0.005, "70B": 0.005}  # Llama 2's PPO KL coefficients (documentation)
WhiteningMode = Literal["batch", "fixed", "none"]  # the `reward_whitening` choices of the GRPO and PPO configs
WHITENING_MODES = get_args(WhiteningMode)
SAFETY_TASKS = ("unsafe", "safety")  # values of a `task` column that mark a safety-relevant prompt
RM_INFO_FILE = "reward_model.json"  # written by recipes/reward/train.py next to the adapter
RM_EVAL_FILE = "rm_eval.json"  # the RM's final evaluation (recipes/reward/train.py): `final.score_mean`/`score_std`


# Llama 2's annotation scale (Touvron et al. 2023, section 3.2.1), strongest first; Table 28's columns.
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
_ALIASES = {
    "significantly_better": "significantly_better",
    "much_better": "significantly_better",
    "better": "better",
    "slightly_better": "slightly_better",
    "negligibly_better": "negligibly_better",
    "negligibly_better_or_unsure": "negligibly_better",
    "negligibly_better/unsure": "negligibly_better",
    "negligibly_better_/_unsure": "negligibly_better",
    "unsure": "negligibly_better",
}
# Integer ratings: the strength of the preference, 3 = significantly better ... 0 = negligibly better / unsure.
_INT_RATINGS = {3: "significantly_better", 2: "better", 1: "slightly_better", 0: "negligibly_better"}


class RewardModelError(UserError):
    """A reward-model problem the user must fix; the message says what, where and how."""


@dataclass
class RewardCombination:
    """How two RM scores become one reward (Llama 2); see the module docstring."""

    safety_threshold: float = SAFETY_THRESHOLD
    whitening: WhiteningMode = "batch"
    whiten_mean: float = 0.0
    whiten_std: float = 1.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.whitening not in WHITENING_MODES:
            raise RewardModelError(f"whitening={self.whitening!r}: use one of {WHITENING_MODES}.")
        if not 0.0 < self.safety_threshold < 1.0:
            raise RewardModelError(
                f"safety_threshold={self.safety_threshold} is not a probability in (0, 1); it compares against "
                "sigmoid(safety score). Llama 2 used 0.15."
            )
        if self.whitening == "fixed" and not self.whiten_std > 0:
            raise RewardModelError(f"whiten_std={self.whiten_std} must be > 0 for whitening='fixed'.")


def normalize_rating(value: Any) -> str:
    """One of `RATINGS` from a rating name (any case, spaces or hyphens for underscores, "unsure" for the last level)
    or an integer strength 0-3 (3 = significantly better). Raises ValueError otherwise."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"rating {value!r} is not on the scale")
    if isinstance(value, (int, float)) and float(value).is_integer() and int(value) in _INT_RATINGS:
        return _INT_RATINGS[int(value)]
    if isinstance(value, str):
        key = value.strip().lower().replace("-", "_").replace(" ", "_")
        if key.isdigit() and int(key) in _INT_RATINGS:
            return _INT_RATINGS[int(key)]
        if key in _ALIASES:
            return _ALIASES[key]
    raise ValueError(
        f"rating {value!r} is not on Llama 2's scale: use one of {list(RATINGS)} (or an integer 0-3, "
        "3 = significantly better)"
    )


def combination_for(config: Any, helpfulness_path: str | None) -> RewardCombination:
    """The `RewardCombination` of a GRPO or PPO config (fields `reward_whitening`, `reward_whitening_mean`,
    `reward_whitening_std`, `safety_threshold`, `safety_reward_model_path`). For `fixed`, statistics unset in the
    config come from the helpfulness RM's rm_eval.json; an error names the fields to set when there are none."""
    mode = config.reward_whitening
    if mode != "fixed":
        return RewardCombination(safety_threshold=config.safety_threshold, whitening=mode)
    mean, std = config.reward_whitening_mean, config.reward_whitening_std
    if mean is None or std is None:
        if config.safety_reward_model_path:
            raise RewardModelError(
                "reward_whitening: fixed with a safety RM: set reward_whitening_mean and reward_whitening_std (the "
                "statistics of the combined reward, e.g. measured on SFT samples); the helpfulness RM's rm_eval.json "
                "describes only its own scores, not the safety scores the combination also picks."
            )
        stats = rm_eval_statistics(helpfulness_path)
        if stats is None:
            raise RewardModelError(
                f"reward_whitening: fixed needs statistics: set reward_whitening_mean and reward_whitening_std, or "
                f"train the RM with an eval split so that {helpfulness_path}/{RM_EVAL_FILE} holds score_mean/score_std "
                "(or use reward_whitening: batch)."
            )
        mean = stats[0] if mean is None else mean
        std = stats[1] if std is None else std
        print(f"[reward] fixed whitening: mean {mean:.4g}, std {std:.4g}", flush=True)
    return RewardCombination(
        safety_threshold=config.safety_threshold, whitening="fixed", whiten_mean=mean, whiten_std=std
    )


def rm_eval_statistics(path: str | None) -> tuple[float, float] | None:
    """(score_mean, score_std) from an RM output dir's rm_eval.json (a checkpoint's run dir one level up), or None."""
    if not path:
        return None
    root = Path(path).expanduser()
    for directory in (root, root.parent) if root.name.startswith("checkpoint-") else (root,):
        eval_file = directory / RM_EVAL_FILE
        if eval_file.is_file():
            final = json.loads(eval_file.read_text()).get("final") or {}
            if "score_mean" in final and "score_std" in final:
                return float(final["score_mean"]), float(final["score_std"])
    return None


# ----------------------------------------------------------------------------------------------------------------
# Loading and scoring


def load_reward_model(
    path: str,
    load_in_4bit: bool | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A reward model in eval mode and its tokenizer (right padding, pad token as in training).

    `path` is an RM output dir (LoRA adapter with the score head in `modules_to_save`; the base comes from
    `adapter_config.json`'s `base_model_name_or_path`) or a full sequence-classification model with `num_labels=1`.
    `load_in_4bit=None` loads the base as the RM was trained (4-bit NF4 for QLoRA RMs, from `reward_model.json`), so
    the scores are the trained model's; `dtype=None` is float32 on CPU and bfloat16 on CUDA.
    """
    from recipes.common.config import QLoRAModelConfig
    from recipes.common.modeling import check_model_path, quantization_kwargs
    from recipes.common.policy import adapter_base

    base = adapter_base(path)
    check_model_path(
        base or path, what="reward model" if base is None else f"base model of the reward adapter {path!r}"
    )
    root = Path(path).expanduser()
    # A checkpoint-N dir has no reward_model.json of its own; its run's is one level up.
    info_file = next((d / RM_INFO_FILE for d in (root, root.parent) if (d / RM_INFO_FILE).is_file()), None)
    info = json.loads(info_file.read_text()) if info_file is not None and base is not None else {}
    if base is not None:
        adapter_config = json.loads((root / "adapter_config.json").read_text())
        if "score" not in (adapter_config.get("modules_to_save") or []):
            raise RewardModelError(
                f"The adapter in {path!r} has no trained score head (`modules_to_save` lacks 'score'), so a fresh "
                "random head would score. Train it with recipes/reward/train.py (it saves the head with the adapter)."
            )
    tokenizer = load_reward_tokenizer(path)
    if load_in_4bit is None:
        load_in_4bit = bool(info.get("load_in_4bit", False))
    if dtype is None:
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    model_args = QLoRAModelConfig(
        model_name_or_path=base or path,
        load_in_4bit=load_in_4bit,
        use_bnb_nested_quant=info.get("use_bnb_nested_quant", True),
        bnb_4bit_quant_type=info.get("bnb_4bit_quant_type", "nf4"),
        dtype=str(dtype).replace("torch.", ""),
    )
    with _quiet_head_warning():
        model = AutoModelForSequenceClassification.from_pretrained(
            base or path, num_labels=1, **quantization_kwargs(model_args)
        )
    keep_4bit_weights_unpacked(model)
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path, is_trainable=False)
    if getattr(model.config, "num_labels", 1) != 1:
        raise RewardModelError(f"{path!r} has num_labels={model.config.num_labels}; a reward model has one output.")
    model.config.pad_token_id = tokenizer.pad_token_id  # the classifier reads the score at the last non-pad token
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not load_in_4bit:  # a quantized model is already placed by its device_map
        model = model.to(device)
    return model.eval(), tokenizer


def load_reward_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer an RM was trained with (saved in its output dir, else its base's), right padding, with a pad other
    than EOS (the classifier reads the score at the last non-pad token): the one saved, else `set_pad_token`'s."""
    from recipes.common.modeling import set_pad_token
    from recipes.common.policy import tokenizer_source

    source = tokenizer_source(path)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, padding_side="right")
    set_pad_token(tokenizer, name=source)
    return tokenizer


def _quiet_head_warning():
    # "score.weight MISSING" is expected when a causal LM base gets a sequence-classification head.
    try:
        from trl.trainer.reward_trainer import suppress_seqcls_warning

        return suppress_seqcls_warning()
    except ImportError:  # pragma: no cover - older/newer TRL
        import contextlib

        return contextlib.nullcontext()


def _as_messages(completion: Any) -> list[dict[str, str]]:
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    if isinstance(completion, dict):
        return [completion]
    return list(completion)


def reward_tokenize(tokenizer: PreTrainedTokenizerBase, prompt: Any, completion: Any) -> list[int]:
    """Token ids of prompt + completion as the RM sees them in training and in scoring.

    Conversational (a prompt that is a list of messages, or None with a completion that is one): the chat template
    over the whole conversation, as TRL's RewardTrainer renders it, then without whitespace-only tokens after the
    final EOS (e.g. the newline many templates add after each turn), so the score is read at the response's EOS,
    where PPO reads it too. Plain text: prompt + completion, with EOS appended when missing (as TRL does).
    """
    if isinstance(prompt, (list, tuple)) or (prompt is None and not isinstance(completion, str)):
        messages = list(prompt or []) + _as_messages(completion)
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        return _trim_after_eos(tokenizer, list(ids))
    if not isinstance(completion, str):
        raise RewardModelError(
            "A plain-text prompt needs a plain-text completion (got a list of messages); pass conversational prompts "
            "as lists of messages."
        )
    text = (prompt or "") + completion
    if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return list(tokenizer(text)["input_ids"])


def _trim_after_eos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None or eos not in ids:
        return ids
    last = len(ids) - 1 - ids[::-1].index(eos)
    tail = ids[last + 1 :]
    if tail and tokenizer.decode(tail).strip() == "":
        return ids[: last + 1]
    return ids


@torch.no_grad()
def score(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    batch_size: int = 16,
    max_length: int | None = None,
    text_as_chat: bool = False,
) -> torch.Tensor:
    """Raw scores (float32 on CPU), one per (prompt, completion), from a sequence-classification RM.

    Prompts are lists of messages (conversational; the RM's chat template is applied) or strings; a completion is a
    string, a message, or a list of messages. String prompts are plain text (prompt + completion + EOS) unless
    `text_as_chat`, which makes them the user's message (for callers that pass the user's text, not a rendered
    prompt). `max_length` keeps the last tokens of longer inputs (the score is read at the end). Sorted by length
    into batches, so padding stays small.
    """
    if len(prompts) != len(completions):
        raise RewardModelError(f"score() got {len(prompts)} prompts for {len(completions)} completions.")
    if tokenizer.pad_token_id is None:
        raise RewardModelError("The RM tokenizer has no pad token; load the RM with `load_reward_model`.")
    if text_as_chat:
        prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    sequences = [reward_tokenize(tokenizer, p, c) for p, c in zip(prompts, completions)]
    if max_length is not None:
        sequences = [ids[-max_length:] for ids in sequences]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = torch.empty(len(sequences), dtype=torch.float32)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(sequences[i]) for i in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                attention_mask[row, : len(sequences[i])] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            scores[batch] = logits[:, 0].float().cpu()
    finally:
        model.train(was_training)
    return scores


# ----------------------------------------------------------------------------------------------------------------
# The combination


def safety_gate(
    safety_scores: torch.Tensor, safety_relevant: torch.Tensor | Sequence[bool] | None, threshold: float
) -> torch.Tensor:
    """True where Llama 2 uses the safety score: safety-relevant prompt, or sigmoid(safety score) < threshold."""
    gate = torch.sigmoid(safety_scores.float()) < threshold
    if safety_relevant is not None:
        tags = torch.as_tensor(safety_relevant, dtype=torch.bool, device=safety_scores.device)
        if tags.shape != gate.shape:
            raise RewardModelError(f"{tags.numel()} safety tags for {gate.numel()} scores.")
        gate = gate | tags
    return gate


def combine_rewards(
    helpfulness_scores: torch.Tensor,
    safety_scores: torch.Tensor | None = None,
    safety_relevant: torch.Tensor | Sequence[bool] | None = None,
    combination: RewardCombination | None = None,
) -> torch.Tensor:
    """whiten(logit(R_c)) from raw RM scores (1-D tensors), R_c = R_s if gated else R_h (see `safety_gate`).

    Without safety scores the helpfulness score alone is whitened. logit(sigmoid(r)) = r, so logit(R_c) is the chosen
    RM's raw score.
    """
    combination = combination or RewardCombination()
    helpfulness_scores = helpfulness_scores.float()
    if safety_scores is None:
        chosen = helpfulness_scores
    else:
        if safety_scores.shape != helpfulness_scores.shape:
            raise RewardModelError(
                f"helpfulness scores {tuple(helpfulness_scores.shape)} and safety scores "
                f"{tuple(safety_scores.shape)} differ in shape."
            )
        gate = safety_gate(safety_scores, safety_relevant, combination.safety_threshold)
        chosen = torch.where(gate, safety_scores.float(), helpfulness_scores)
    return whiten(chosen, combination)


def whiten(values: torch.Tensor, combination: RewardCombination) -> torch.Tensor:
    """(x - mean) / std with the batch's statistics (over all processes) or the configured ones; unchanged for
    whitening='none'."""
    if combination.whitening == "none":
        return values
    if combination.whitening == "fixed":
        return (values - combination.whiten_mean) / combination.whiten_std
    count, mean, std = batch_statistics(values)
    if count < 2:
        raise RewardModelError(
            f"whitening='batch' needs at least 2 scores per call (got {count}). Score a batch at a time, or use "
            "whitening='fixed' with whiten_mean/whiten_std (e.g. score_mean/score_std from the RM's rm_eval.json)."
        )
    return ((values - mean) / (std + combination.eps)).to(values.dtype)


def batch_statistics(values: torch.Tensor) -> tuple[int, float, float]:
    """(count, mean, unbiased std) of `values` together with every other process's `values` of this call (sums
    all-reduced in float64, two passes), or of `values` alone outside torch.distributed."""
    flat = values.detach().double().flatten()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        count = flat.numel()
        return count, float(flat.mean()) if count else 0.0, float(flat.std()) if count > 1 else 0.0
    device = flat.device
    if torch.distributed.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    totals = torch.tensor([flat.numel(), flat.sum().item()], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    count, mean = int(totals[0].item()), float(totals[1] / max(totals[0], 1))
    squares = torch.tensor([((flat - mean) ** 2).sum().item()], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(squares)
    std = (float(squares[0]) / (count - 1)) ** 0.5 if count > 1 else 0.0
    return count, mean, std


def safety_tags(num_rows: int, columns: Mapping[str, Any], column: str | None = None) -> list[bool]:
    """Per-row "safety-relevant prompt" tags from dataset columns, as GRPO passes them in `**kwargs`.

    `column` names a boolean column, or a string column compared against "unsafe"/"safety". Without it:
    `is_unsafe_prompt` when present, else `task` when present, else no prompt is tagged (threshold rule alone).
    """
    if column is None:
        column = next((name for name in ("is_unsafe_prompt", "is_safety_prompt", "task") if name in columns), None)
        if column is None:
            return [False] * num_rows
    elif column not in columns:
        raise RewardModelError(
            f"safety column {column!r} is not among the dataset columns {sorted(columns)}; name the column that marks "
            "safety-relevant prompts (a boolean, or a task name such as 'unsafe'), or leave it unset."
        )
    values = list(columns[column])
    if len(values) != num_rows:
        raise RewardModelError(f"safety column {column!r} has {len(values)} values for {num_rows} completions.")
    return [value in SAFETY_TASKS if isinstance(value, str) else bool(value) for value in values]


class CombinedReward:
    """Llama 2's combined reward as a plain callable: GRPO's `reward_funcs` entry, or a rejection-sampling scorer.

        reward = CombinedReward("outputs/demo/reward", "outputs/demo/reward-safety")
        rewards = reward(prompts, completions, is_unsafe_prompt=[...])  # -> list[float]

    `helpfulness` / `safety` are RM output dirs or (model, tokenizer) pairs; each RM tokenizes the text with its own
    tokenizer, so here (unlike the PPO module) RMs and policy need not share one. The prompt's safety tag comes from
    the dataset column `safety_column` in the keyword arguments (see `safety_tags`). `text_as_chat=True` for callers
    that pass the user's text as the prompt (see `score`). After each call, `last` holds the raw scores and the gate,
    for logging.
    """

    def __init__(
        self,
        helpfulness: str | tuple[nn.Module, PreTrainedTokenizerBase],
        safety: str | tuple[nn.Module, PreTrainedTokenizerBase] | None = None,
        combination: RewardCombination | None = None,
        safety_column: str | None = None,
        batch_size: int = 16,
        name: str = "combined_reward",
        load_in_4bit: bool | None = None,
        text_as_chat: bool = False,
    ) -> None:
        self.helpfulness = load_reward_model(helpfulness, load_in_4bit) if isinstance(helpfulness, str) else helpfulness
        self.safety = load_reward_model(safety, load_in_4bit) if isinstance(safety, str) else safety
        self.combination = combination or RewardCombination()
        self.safety_column = safety_column
        self.batch_size = batch_size
        self.text_as_chat = text_as_chat
        self.__name__ = name  # TRL logs each reward function under its __name__
        self.last: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        kwargs.pop("completion_ids", None)
        helpful = score(*self.helpfulness, prompts, completions, self.batch_size, text_as_chat=self.text_as_chat)
        if self.safety is None:
            rewards = combine_rewards(helpful, combination=self.combination)
            self.last = {"helpfulness": helpful, "reward": rewards}
            return rewards.tolist()
        safe = score(*self.safety, prompts, completions, self.batch_size, text_as_chat=self.text_as_chat)
        tags = safety_tags(len(completions), kwargs, self.safety_column)
        rewards = combine_rewards(helpful, safe, tags, self.combination)
        gate = safety_gate(safe, tags, self.combination.safety_threshold)
        self.last = {"helpfulness": helpful, "safety": safe, "safety_gate": gate, "reward": rewards}
        return rewards.tolist()


# ----------------------------------------------------------------------------------------------------------------
# The PPO module


def _classifier(model: nn.Module) -> nn.Module:
    """The transformers sequence classifier inside a PeftModel (LoRA layers injected), or the model itself."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not hasattr(model, "score") or not hasattr(model, "base_model_prefix"):
        raise RewardModelError(
            f"{type(model).__name__} is not a sequence-classification reward model with a `score` head; load it "
            "with `load_reward_model`."
        )
    return model


def _last_token_scores(classifier: nn.Module, input_ids, attention_mask, position_ids, last_index) -> torch.Tensor:
    backbone = getattr(classifier, classifier.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return classifier.score(hidden[rows, last_index]).squeeze(-1).float()


def _positions(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position ids counted from each row's first attended token, index of its last attended token)."""
    mask = attention_mask.long()
    return (mask.cumsum(1) - mask).clamp(min=0), mask.cumsum(1).argmax(1)


@torch.no_grad()
def last_token_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores (float32) of a sequence classifier (a PeftModel, a transformers `...ForSequenceClassification`, or
    anything with a backbone and `score`) at each row's last attended token. Rows may be left-padded (PPO's prompts)
    and right-padded (its responses): positions start at each row's first attended token, as in training."""
    position_ids, last_index = _positions(attention_mask)
    return _last_token_scores(_classifier(model), input_ids, attention_mask, position_ids, last_index)


class PromptSafetyTags:
    """A `safety_tagger` for `CombinedRewardModel`: tags a row whose real tokens start with one of `prompt_token_ids`
    (the tokenized safety-relevant prompts, exactly as the policy's queries are tokenized)."""

    def __init__(self, prompt_token_ids: Sequence[Sequence[int]]) -> None:
        self.prompts = {tuple(ids) for ids in prompt_token_ids}
        self.lengths = sorted({len(ids) for ids in self.prompts}, reverse=True)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tags = []
        for ids, mask in zip(input_ids, attention_mask.bool()):
            tokens = tuple(ids[mask].tolist())
            tags.append(any(tokens[:length] in self.prompts for length in self.lengths))
        return torch.tensor(tags, dtype=torch.bool, device=input_ids.device)


class CombinedRewardModel(nn.Module):
    """Llama 2's combined reward on token ids, for PPO: both RMs read the policy's tokens (each at the row's last
    attended token), `combine_rewards` picks and whitens. `forward(input_ids, attention_mask).logits` is the combined
    reward per row, shaped like a classifier's `(batch, 1)`; `raw_scores` gives the parts before whitening, for a
    caller that scores a batch in chunks and whitens it afterwards, as the PPO trainer does.

    Safety relevance: the module sees only token ids. Without `safety_tagger` the threshold rule alone applies
    (the safety score is used when sigmoid(r_s) < threshold). `safety_tagger(input_ids, attention_mask) -> BoolTensor`
    adds prompt tags, e.g. `PromptSafetyTags(tokenized unsafe prompts)`.

    The token ids are the policy's: every RM must use the policy's tokenizer (`load_combined_reward_model` checks).
    After each forward, `last` holds the raw scores, the gate and the reward, for logging.
    """

    def __init__(
        self,
        helpfulness_model: nn.Module,
        safety_model: nn.Module | None = None,
        combination: RewardCombination | None = None,
        safety_tagger: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.helpfulness = helpfulness_model
        self.safety = safety_model
        self.combination = combination or RewardCombination()
        self.safety_tagger = safety_tagger
        self.last: dict[str, torch.Tensor] = {}
        self.requires_grad_(False)

    @torch.no_grad()
    def raw_scores(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """`helpfulness` (raw), and with a safety RM `safety` (raw) and `safety_gate`; `chosen`: the score the
        combination whitens (the safety score where gated, else the helpfulness score)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        args = (input_ids, attention_mask, *_positions(attention_mask))
        helpful = _last_token_scores(_classifier(self.helpfulness), *args)
        if self.safety is None:
            return {"helpfulness": helpful, "chosen": helpful}
        safe = _last_token_scores(_classifier(self.safety), *args)
        tags = self.safety_tagger(input_ids, attention_mask) if self.safety_tagger is not None else None
        gate = safety_gate(safe, tags, self.combination.safety_threshold)
        return {"helpfulness": helpful, "safety": safe, "safety_gate": gate, "chosen": torch.where(gate, safe, helpful)}

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> SimpleNamespace:
        parts = self.raw_scores(input_ids, attention_mask)
        rewards = whiten(parts.pop("chosen"), self.combination)
        self.last = {**parts, "reward": rewards}
        return SimpleNamespace(logits=rewards[:, None])


def check_same_tokenizer(
    reference: PreTrainedTokenizerBase,
    others: Mapping[str, PreTrainedTokenizerBase],
    reference_name: str = "policy",
) -> None:
    """Raise `RewardModelError` unless every tokenizer in `others` maps text to the same ids as `reference`, with the
    same special tokens and chat template (a PPO reward model reads the policy's token ids as they are)."""
    for name, other in others.items():
        problems = []
        ours, theirs = reference.get_vocab(), other.get_vocab()
        if ours != theirs:
            differing = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])[:3]
            problems.append(f"vocabularies differ ({len(ours)} vs {len(theirs)} tokens, e.g. {differing})")
        for special in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(reference, special) != getattr(other, special):
                problems.append(f"{special} {getattr(reference, special)} vs {getattr(other, special)}")
        if (reference.chat_template or None) != (other.chat_template or None):
            problems.append("chat templates differ")
        if problems:
            raise RewardModelError(
                f"The {name} reward model does not share the {reference_name}'s tokenizer: {'; '.join(problems)}. "
                f"PPO hands the {reference_name}'s token ids to every reward model unchanged, so they would be read as "
                f"different text. Train the reward model from the {reference_name}'s base model (same tokenizer, pad "
                "token and chat template), or use the text-level `CombinedReward` (GRPO, rejection sampling)."
            )


def load_combined_reward_model(
    helpfulness_path: str,
    safety_path: str | None,
    policy_tokenizer: PreTrainedTokenizerBase,
    combination: RewardCombination | None = None,
    safety_tagger: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    load_in_4bit: bool | None = None,
) -> CombinedRewardModel:
    """Both RMs from their output dirs, checked against the policy's tokenizer (before any weights load), as one PPO
    `reward_model`."""
    paths = {f"helpfulness ({helpfulness_path})": helpfulness_path}
    if safety_path:
        paths[f"safety ({safety_path})"] = safety_path
    check_same_tokenizer(policy_tokenizer, {name: load_reward_tokenizer(path) for name, path in paths.items()})
    helpful_model, _ = load_reward_model(helpfulness_path, load_in_4bit)
    safety_model = load_reward_model(safety_path, load_in_4bit)[0] if safety_path else None
    return CombinedRewardModel(helpful_model, safety_model, combination, safety_tagger)
