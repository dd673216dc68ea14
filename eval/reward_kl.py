"""Mean reward under reward model(s) and the KL of the policy to a reference, so RLHF runs can plot one against the
other (Gao et al. 2022).

A reward is any callable `reward_fn(prompts, completions) -> list[float]`, where a prompt is the user's text (not the
rendered chat template) and a completion the response text; `load_reward_model` turns a saved
`AutoModelForSequenceClassification` (or a base + LoRA adapter with a score head) into one.

KL is the sampled-token estimate on responses drawn from the policy at temperature 1:
KL(pi || pi_ref) ~ mean over samples of sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]. A LoRA policy's
reference is the same model with the adapter disabled, so no second copy is loaded.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from eval.data import EvalError
from eval.generation import model_device, score_token_ids

RewardFn = Callable[[list[str], list[str]], list[float]]


class RewardModel:
    """A sequence-classification reward model as a `RewardFn`: scores each (prompt, completion) as one text, the
    chat template's user + assistant turns when the tokenizer has one (how TRL's RewardTrainer saw conversational
    data), else prompt + completion."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 8,
        max_length: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        from recipes.common.modeling import set_pad_token  # the project's one padding policy (late: no import cycle)

        set_pad_token(tokenizer)  # not EOS: the final EOS must not count as padding
        # Sequence classification reads the score at the last non-pad token, which it finds by the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id

    def format(self, prompt: str, completion: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + completion

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        texts = [self.format(p, c) for p, c in zip(prompts, completions, strict=True)]
        device = model_device(self.model)
        bos = self.tokenizer.bos_token
        rewards: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            add_special = not (bos and chunk[0].startswith(bos))  # a rendered chat template carries its own BOS
            batch = self.tokenizer(
                chunk,
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                add_special_tokens=add_special,
                return_tensors="pt",
            ).to(device)
            logits = self.model(**batch).logits
            rewards.extend(logits[:, 0].float().tolist())
        return rewards


def load_reward_model(
    path: str, load_in_4bit: bool = False, batch_size: int = 8, device: str | None = None
) -> RewardModel:
    """A reward model from a directory: a saved `AutoModelForSequenceClassification`, or a LoRA adapter (with its
    score head in `modules_to_save`) over the base named in its adapter_config.json."""
    from eval.loading import check_model_source, keep_4bit_weights_unpacked, quantization_config, resolve_device

    directory = Path(path).expanduser()
    adapter_config = directory / "adapter_config.json"
    device = resolve_device(device)
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config()
        kwargs["device_map"] = {"": device}
    try:
        if adapter_config.is_file():
            from peft import PeftModel

            base_name = json.loads(adapter_config.read_text())["base_model_name_or_path"]
            check_model_source(base_name, what=f"base model of reward adapter {path}")
            base = AutoModelForSequenceClassification.from_pretrained(base_name, num_labels=1, **kwargs)
            keep_4bit_weights_unpacked(base)
            model = PeftModel.from_pretrained(base, str(directory))
            tokenizer_source = str(directory) if (directory / "tokenizer_config.json").is_file() else base_name
        else:
            check_model_source(path, what="reward model")
            model = keep_4bit_weights_unpacked(AutoModelForSequenceClassification.from_pretrained(path, **kwargs))
            tokenizer_source = path
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=False)
    except EvalError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise EvalError(f"Could not load reward model {path!r}: {type(err).__name__}: {err}") from err
    if not load_in_4bit:
        model = model.to(device)
    return RewardModel(model, tokenizer, batch_size=batch_size)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n)


def reward_metrics(
    reward_fns: Mapping[str, RewardFn], prompts: Sequence[str], completions: Sequence[str]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(metrics, per-sample rewards by name). Metrics: `<name>/mean`, `<name>/std` for each reward function, and
    `mean`, `std` of the first one (the primary reward)."""
    metrics: dict[str, float] = {}
    per_sample: dict[str, list[float]] = {}
    for index, (name, reward_fn) in enumerate(reward_fns.items()):
        values = [float(v) for v in reward_fn(list(prompts), list(completions))]
        if len(values) != len(completions):
            raise ValueError(f"Reward {name!r} returned {len(values)} values for {len(completions)} completions.")
        mean, std = _mean_std(values)
        metrics[f"{name}/mean"], metrics[f"{name}/std"] = mean, std
        if index == 0:
            metrics["mean"], metrics["std"] = mean, std
        per_sample[name] = values
    return metrics, per_sample


@contextlib.contextmanager
def reference_of(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """The model with its LoRA adapter(s) switched off, for as long as the block runs."""
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):  # a peft PeftModel
        with model.disable_adapter():
            yield model
    elif getattr(model, "_hf_peft_config_loaded", False):  # adapters loaded through transformers' integration
        model.disable_adapters()
        try:
            yield model
        finally:
            model.enable_adapters()
    else:
        raise EvalError(
            "KL needs a reference model: the policy has no LoRA adapter to disable, so pass `ref_model` "
            "(`--ref_model PATH` on the command line)."
        )


def has_adapter(model: PreTrainedModel) -> bool:
    return (hasattr(model, "disable_adapter") and hasattr(model, "peft_config")) or bool(
        getattr(model, "_hf_peft_config_loaded", False)
    )


def kl_to_reference(
    model: PreTrainedModel,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    ref_model: PreTrainedModel | None = None,
    pad_id: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict[str, float], list[float]]:
    """(metrics, per-sample KL): `kl` (mean of per-sample sum_t log pi - log pi_ref, in nats), `kl_std`,
    `logprob_policy`, `logprob_ref` (mean summed log-probabilities). The completions must be samples from `model` at
    temperature 1 for `kl` to estimate KL(pi || pi_ref); empty completions count as 0."""
    pairs = [(p, c) for p, c in zip(prompt_ids, completion_ids, strict=True) if c]
    keep = [i for i, c in enumerate(completion_ids) if c]
    policy = score_token_ids(model, pairs, pad_id=pad_id, batch_size=batch_size, progress=progress, desc="kl: policy")
    if ref_model is not None:
        reference = score_token_ids(
            ref_model, pairs, pad_id=pad_id, batch_size=batch_size, progress=progress, desc="kl: reference"
        )
    else:
        with reference_of(model) as ref:
            reference = score_token_ids(
                ref, pairs, pad_id=pad_id, batch_size=batch_size, progress=progress, desc="kl: reference"
            )
    per_sample = [0.0] * len(completion_ids)
    for index, lp, lr in zip(keep, policy, reference):
        per_sample[index] = lp - lr
    kl, kl_std = _mean_std(per_sample)
    n_kept = max(len(keep), 1)
    metrics = {
        "kl": kl,
        "kl_std": kl_std,
        "logprob_policy": sum(policy) / n_kept,
        "logprob_ref": sum(reference) / n_kept,
    }
    return metrics, per_sample
