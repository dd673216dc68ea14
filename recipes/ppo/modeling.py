"""The PPO models on one shared 4-bit base: policy, reference, value model and reward models, switched by adapter.

PPO runs four models; three or four of them usually are the same base with different LoRA adapters. So the policy's
PeftModel carries them all, and a forward pass picks one by name (`SharedBase.use`):

| adapter | what | trains |
|---|---|---|
| "default" | the policy: the SFT adapter (trainable copy), or a fresh LoRA on a full model | yes |
| "reference" | the SFT adapter again, frozen: the reference is exactly the SFT policy (a full model: adapters off) | no |
| "value" | the value model's LoRA, from the (helpfulness) RM's adapter or fresh; its head is `value.score` | yes |
| "reward_helpfulness", "reward_safety" | the RMs' LoRA adapters; their score heads sit next to them | no |

A model shares the base when its adapter was trained on the policy's base, quantized the same way (the reward
recipe's `reward_model.json`). One with another base (or a full model) is loaded on its own, as before; so is
everything with `share_base: false` (what `scripts/benchmarks/ppo_memory.py` compares against).

The heads (value, RM scores) are plain `nn.Linear(hidden, 1)` modules outside peft: a causal LM has no `score`
module for peft's `modules_to_save`. The RM's saved `score.weight` goes into its head unchanged, so a shared-base RM
scores exactly like the separately loaded one (tests/recipes/test_ppo.py::test_shared_base_scores_like_separate_models).

Dropout is switched off everywhere: PPO's ratio p/p_old must be 1 before the first step, and a value fitted with
dropout noise would not be the value of the rollouts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from trl import ModelConfig, get_peft_config

from recipes.common import policy as common_policy
from recipes.common.modeling import load_model

POLICY_ADAPTER = "default"  # saved at the top of the output dir, where `PeftModel.from_pretrained` looks
REFERENCE_ADAPTER = "reference"
VALUE_ADAPTER = "value"
HEAD_KEY = "base_model.model.score."  # where a SEQ_CLS adapter file keeps its score head (modules_to_save)
RM_INFO_FILE = "reward_model.json"


class SharedBase:
    """The policy's PeftModel and its adapters. `use(name)` runs a block with adapter `name` active (None: every
    adapter off), and puts back which parameters train: peft's `set_adapter` would make the active adapter trainable
    and the others frozen, which would freeze the value adapter whenever the policy runs, and the other way round."""

    def __init__(self, model: PeftModel) -> None:
        self.model = model
        self.trainable_adapters: set[str] = {POLICY_ADAPTER}
        self._trainable: list[tuple[nn.Parameter, bool]] = []

    @property
    def backbone(self) -> nn.Module:
        """The transformer body without the LM head (LoRA layers inside): what value and reward heads read."""
        causal_lm = self.model.get_base_model()
        return getattr(causal_lm, causal_lm.base_model_prefix)

    def set_trainable(self, adapters: set[str]) -> None:
        """Exactly the LoRA weights of `adapters` train; remembered and restored after every switch."""
        self.trainable_adapters = set(adapters)
        self._trainable = []
        for name, param in self.model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(any(f".{adapter}." in name for adapter in adapters))
                self._trainable.append((param, param.requires_grad))

    def _restore(self) -> None:
        for param, flag in self._trainable:
            param.requires_grad_(flag)

    @contextlib.contextmanager
    def use(self, adapter: str | None) -> Iterator[None]:
        if adapter is None:
            with self.model.disable_adapter():
                yield
            self._restore()
            return
        previous = self.model.active_adapter
        if adapter == previous:
            yield
            return
        self.model.set_adapter(adapter)
        self._restore()
        try:
            yield
        finally:
            self.model.set_adapter(previous)
            self._restore()


class ScalarHead(nn.Module):
    """A backbone's hidden states through a linear head, per position: the value model, or a reward model.

    On the shared base it runs the policy's backbone with its own adapter (the base is not a child module here: the
    policy owns it); loaded separately it wraps its own sequence-classification PeftModel. Either way it offers what
    `recipes.common.reward` reads from a classifier: `backbone(...)` and `score`."""

    base_model_prefix = "backbone"

    def __init__(
        self,
        score: nn.Module,
        shared: SharedBase | None = None,
        adapter: str | None = None,
        own_model: PeftModel | None = None,
    ) -> None:
        super().__init__()
        self.score = score
        self.own_model = own_model
        self._shared = [shared]  # a list: not registered as a child
        self.adapter = adapter

    @property
    def is_shared(self) -> bool:
        return self.own_model is None

    def backbone(self, **inputs: Any) -> Any:
        if self.own_model is not None:
            classifier = self.own_model.get_base_model()
            return getattr(classifier, classifier.base_model_prefix)(**inputs)
        shared = self._shared[0]
        with shared.use(self.adapter):
            return shared.backbone(**inputs)

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()


@dataclasses.dataclass
class PPOModels:
    policy: PeftModel
    reference_adapter: str | None  # None: the reference is the base with adapters off
    value: ScalarHead
    shared: SharedBase


def load_policy(model_args: ModelConfig, gradient_checkpointing: bool) -> tuple[PeftModel, str | None]:
    """The policy PeftModel and the name of its reference adapter (None: the reference is the base, adapters off)."""
    model, peft_config = common_policy.load_policy(model_args, gradient_checkpointing=gradient_checkpointing)
    if peft_config is not None:  # a full model: a fresh LoRA on it
        return get_peft_model(model, peft_config), None
    # The SFT adapter, now trainable as "default", again as a frozen reference on the same base.
    model.load_adapter(model_args.model_name_or_path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.set_adapter(POLICY_ADAPTER)
    return model, REFERENCE_ADAPTER


def policy_base(model_args: ModelConfig) -> str:
    return common_policy.adapter_base(model_args.model_name_or_path) or model_args.model_name_or_path


def _same_path(a: str, b: str) -> bool:
    resolve = lambda p: str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p  # noqa: E731
    return resolve(a) == resolve(b)


def rm_quantization(path: str) -> dict[str, Any]:
    """How the reward recipe loaded an RM's base (its reward_model.json; a checkpoint's is one level up)."""
    root = Path(path).expanduser()
    for directory in (root, root.parent):
        if (directory / RM_INFO_FILE).is_file():
            return json.loads((directory / RM_INFO_FILE).read_text())
    return {}


def shares_base(path: str | None, model_args: ModelConfig, as_reward_model: bool) -> bool:
    """Whether the LoRA adapter at `path` (with a score head) can run on the policy's base. A reward model must also
    have been trained on it quantized the same way (else its scores would not be the trained model's); the value
    model is loaded with the policy's quantization anyway."""
    base = common_policy.adapter_base(path) if path else None
    if base is None or not _same_path(base, policy_base(model_args)):
        return False
    if not as_reward_model:
        return True
    info = rm_quantization(path)
    return (
        bool(info.get("load_in_4bit", False)) == bool(model_args.load_in_4bit)
        and info.get("use_bnb_nested_quant", True) == model_args.use_bnb_nested_quant
        and info.get("bnb_4bit_quant_type", "nf4") == model_args.bnb_4bit_quant_type
    )


def _new_head(shared: SharedBase, state: dict[str, torch.Tensor] | None) -> nn.Linear:
    hidden = shared.model.get_base_model().config.hidden_size
    head = nn.Linear(hidden, 1, bias=bool(state and "bias" in state), dtype=torch.float32)
    if state is None:
        torch.nn.init.normal_(head.weight, std=1e-3)  # values start near 0, whatever the reward's scale
    else:
        head.load_state_dict({k: v.float() for k, v in state.items()})
    return head.to(next(shared.backbone.parameters()).device)


def _split_head(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    head = {key[len(HEAD_KEY) :]: state.pop(key) for key in list(state) if key.startswith(HEAD_KEY)}
    return state, head


def _load_adapter_weights(shared: SharedBase, state: dict[str, torch.Tensor], adapter: str, where: Path) -> None:
    result = set_peft_model_state_dict(shared.model, state, adapter_name=adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{where} does not match this run's model (unexpected keys, e.g. {unexpected[:3]}).")


def add_head_adapter(shared: SharedBase, path: str, adapter: str) -> ScalarHead:
    """A reward-recipe output (LoRA adapter + score head) as adapter `adapter` on the shared base, with its head."""
    config = LoraConfig.from_pretrained(path)
    config = dataclasses.replace(
        config, task_type="CAUSAL_LM", modules_to_save=None, inference_mode=False, lora_dropout=0.0
    )
    shared.model.add_adapter(adapter, config)
    weights, head = _split_head(load_file(Path(path) / "adapter_model.safetensors"))
    if "weight" not in head:
        raise ValueError(f"{path} has no score head (`{HEAD_KEY}weight`); train it with recipes/reward/train.py.")
    _load_adapter_weights(shared, weights, adapter, Path(path))
    shared.set_trainable(shared.trainable_adapters)  # add_adapter may have changed which weights train
    return ScalarHead(_new_head(shared, head), shared=shared, adapter=adapter)


def load_value_model(source: str, model_args: ModelConfig, gradient_checkpointing: bool) -> ScalarHead:
    """A value model of its own (another base than the policy's, or `share_base: false`): an RM output dir (LoRA
    adapter + score head) or a full model (a causal LM gets a fresh score head), quantized like the policy."""
    base = common_policy.adapter_base(source)
    model = load_model(model_args, gradient_checkpointing, num_labels=1, model_name_or_path=base or source)
    if base is not None:  # a reward model trained as LoRA: start from its adapter and head
        peft_model = PeftModel.from_pretrained(model, source, is_trainable=True)
    else:
        if "ForSequenceClassification" not in str(model.config.architectures):  # a fresh head: values start near 0
            torch.nn.init.normal_(model.score.weight, std=1e-3)
        config = dataclasses.replace(get_peft_config(model_args), task_type="SEQ_CLS", modules_to_save=["score"])
        peft_model = get_peft_model(model, config)
    return ScalarHead(peft_model.get_base_model().score, own_model=peft_model)


def load_ppo_models(
    model_args: ModelConfig, value_source: str, share_base: bool, gradient_checkpointing: bool
) -> PPOModels:
    """Policy (+ reference) and value model, the value model on the policy's base when it can be (module docstring)."""
    policy, reference_adapter = load_policy(model_args, gradient_checkpointing)
    shared = SharedBase(policy)
    if share_base and _same_path(value_source, policy_base(model_args)):  # a fresh value adapter and head
        config = dataclasses.replace(
            get_peft_config(model_args), task_type="CAUSAL_LM", modules_to_save=None, lora_dropout=0.0
        )
        policy.add_adapter(VALUE_ADAPTER, config)
        value = ScalarHead(_new_head(shared, None), shared=shared, adapter=VALUE_ADAPTER)
    elif share_base and shares_base(value_source, model_args, as_reward_model=False):
        value = add_head_adapter(shared, value_source, VALUE_ADAPTER)
    else:
        value = load_value_model(value_source, model_args, gradient_checkpointing)
    shared.set_trainable({POLICY_ADAPTER, VALUE_ADAPTER})
    value.score.requires_grad_(True)
    disable_dropout(policy)
    disable_dropout(value)
    return PPOModels(policy, reference_adapter, value, shared)


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


# --- the value model in checkpoints ------------------------------------------------------------------------------


def save_value_model(value: ScalarHead, directory: Path, base_name: str) -> None:
    """`directory` as a reward-recipe output (adapter_config.json for a SEQ_CLS LoRA with the head in
    modules_to_save, adapter_model.safetensors with `base_model.model.score.*`), whichever way the value model runs:
    it loads back into either, and `load_reward_model` reads it as an RM."""
    if not value.is_shared:
        value.own_model.save_pretrained(directory, safe_serialization=True)
        return
    shared = value._shared[0]
    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(shared.model, adapter_name=value.adapter)
    state.update({HEAD_KEY + name: tensor for name, tensor in value.score.state_dict().items()})
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, directory / "adapter_model.safetensors")
    config = dataclasses.replace(
        shared.model.peft_config[value.adapter], task_type="SEQ_CLS", modules_to_save=["score"], inference_mode=True
    )
    config.base_model_name_or_path = base_name
    config.save_pretrained(str(directory))


def load_value_state(value: ScalarHead, directory: Path) -> None:
    """The weights `save_value_model` wrote, back into the running value model."""
    state = load_file(directory / "adapter_model.safetensors")
    if not value.is_shared:
        result = set_peft_model_state_dict(value.own_model, state)
        if getattr(result, "unexpected_keys", []):
            raise ValueError(f"{directory} does not match this run's value model.")
        return
    weights, head = _split_head(state)
    _load_adapter_weights(value._shared[0], weights, value.adapter, directory)
    with torch.no_grad():
        for name, tensor in value.score.state_dict().items():
            tensor.copy_(head[name])


def value_init_path(model_args: ModelConfig, training_args: Any, ppo_args: Any) -> str:
    """`value_model_path`; else the (helpfulness) reward model when it gives the reward (the value predicts returns on
    its scale); else the policy's base with a fresh score head (the math reward's 0/1 scale is not an RM's)."""
    if ppo_args.value_model_path:
        return ppo_args.value_model_path
    if ppo_args.reward_source == "reward_model":
        return training_args.reward_model_path
    return policy_base(model_args)
