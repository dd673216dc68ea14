"""Mean reward under reward model(s) and the KL of the policy to a reference, so RLHF runs can plot one against the
other (Gao et al. 2022).

A reward is any callable `reward_fn(prompts, completions) -> list[float]`, where a prompt is the user's text (not the
rendered chat template) and a completion the response text; `load_reward_model` turns a saved
`AutoModelForSequenceClassification` (or a base + LoRA adapter with a score head) into one.

KL is the sampled-token estimate on responses drawn from the policy at temperature 1:
KL(pi || pi_ref) ~ mean over samples of sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)].

The reference is the policy's starting point (`resolve_kl_reference`): what its run recorded in run_complete.json
(`start_model`, else `parent_run`; e.g. the SFT adapter a PPO adapter was trained from), `--ref_model PATH`, or
`--ref_model base`, the adapter's base model (the same model with the adapter disabled, no second copy). A policy
adapter continues training the SFT adapter, so "adapter disabled" is the base model, not the SFT policy; it is the
default only for an SFT adapter itself (whose starting point is that base).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from eval.data import EvalError
from eval.generation import score_token_ids
from recipes.common.errors import UserError
from recipes.common.modeling import default_chat_template, set_pad_token
from recipes.common.outputs import FINISHED_MARKER  # the run's marker: stage, start_model / parent_run
from recipes.common.reward import load_reward_model as load_trained_reward_model
from recipes.common.reward import score

RewardFn = Callable[[list[str], list[str]], list[float]]
ADAPTER_OFF = "base"  # `--ref_model base`: the policy's base model, i.e. the policy with its adapter disabled


class RewardModel:
    """A sequence-classification reward model as a `RewardFn`: scores each (prompt, completion) exactly as training
    and the RL recipes do (`recipes.common.reward.score`): the chat template's user + assistant turns when the
    tokenizer has one (how TRL's RewardTrainer saw conversational data), else prompt + completion + EOS."""

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
        set_pad_token(tokenizer)  # not EOS: the final EOS must not count as padding
        # Sequence classification reads the score at the last non-pad token, which it finds by the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        # The training path's tokenization (`recipes.common.reward.score`): the score is read where the RM was trained
        # to put it, at the response's EOS, with no BOS the chat template did not render.
        as_chat = bool(default_chat_template(self.tokenizer))
        scores = score(
            self.model, self.tokenizer, list(prompts), list(completions), self.batch_size, self.max_length, as_chat
        )
        return scores.tolist()


def load_reward_model(
    path: str, load_in_4bit: bool = False, batch_size: int = 8, device: str | None = None
) -> RewardModel:
    """A reward model from a directory (a reward-recipe output: LoRA adapter + score head over the base its
    adapter_config.json names, or a saved sequence classifier), loaded by the training path
    (`recipes.common.reward.load_reward_model`): 4-bit as it was trained unless `load_in_4bit` forces it."""
    from eval.loading import resolve_device

    try:
        model, tokenizer = load_trained_reward_model(
            path, load_in_4bit=True if load_in_4bit else None, device=resolve_device(device)
        )
    except UserError:
        raise  # the shared loader's own errors already say what and how to fix
    except (OSError, ValueError, KeyError) as err:  # transformers' and peft's: unreadable weights, an unknown hub id
        raise EvalError(
            f"Could not load reward model {path!r}: {type(err).__name__}: {err}. Pass a reward-recipe output dir "
            "(recipes/reward/train.py) or a saved sequence classifier with one output."
        ) from err
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


@dataclass
class KLReference:
    """What KL is measured against: a model to load (`path`), or the policy with its adapter disabled."""

    path: str | None
    adapter_disabled: bool
    description: str  # said in the printed table and the output JSON


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve() if Path(a).exists() else a == b


def resolve_kl_reference(model: str, adapter: str | None, ref_model: str | None) -> KLReference | None:
    """The reference for KL of the policy `model` (+ `adapter`), from files only (before anything loads).

    `ref_model` wins: a path/hub id, or "base" (the adapter disabled). Otherwise the policy's run says where it
    started: `start_model` or `parent_run` in its run_complete.json (an SFT adapter: its base). None when nothing
    can be referenced (a full model without lineage: only reward models are scored); an EvalError for an adapter
    without lineage, since its base model is rarely the reference meant.
    """
    policy_dir = Path(adapter or model).expanduser()
    adapter_config = policy_dir / "adapter_config.json"
    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path") if adapter_config.is_file() else None
    if ref_model == ADAPTER_OFF:
        if not adapter_config.is_file():
            raise EvalError(
                f"--ref_model {ADAPTER_OFF} means the policy with its LoRA adapter disabled, but {str(policy_dir)!r} "
                "is not an adapter: pass the reference model's path instead."
            )
        return KLReference(None, True, f"{base} (the adapter's base model: adapter disabled, --ref_model base)")
    if ref_model:
        return KLReference(ref_model, False, f"{ref_model} (--ref_model)")
    lineage_file = policy_dir / FINISHED_MARKER
    lineage = json.loads(lineage_file.read_text()) if lineage_file.is_file() else {}
    start = lineage.get("start_model") or lineage.get("parent_run")
    if start and base and _same_path(start, base):
        return KLReference(None, True, f"{base} (its start in {lineage_file}: the adapter's base, adapter disabled)")
    if start:
        key = "start_model" if lineage.get("start_model") else "parent_run"
        return KLReference(str(start), False, f"{start} (the policy's starting point: {key} in {lineage_file})")
    if base and lineage.get("stage") == "sft":
        return KLReference(None, True, f"{base} (an SFT adapter starts from its base: adapter disabled)")
    if base:
        raise EvalError(
            f"KL needs the policy's starting point, and {str(policy_dir)!r} does not record one (no start_model or "
            f"parent_run in {FINISHED_MARKER}). Pass --ref_model DIR (e.g. the SFT output the policy was trained from), "
            f"or --ref_model {ADAPTER_OFF} to measure against the adapter's base model (adapter disabled)."
        )
    return None


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
