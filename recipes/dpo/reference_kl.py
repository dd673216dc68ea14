"""KL of the DPO policy to its reference, which `DPOTrainer` does not log.

`ReferenceKLCallback` runs after each trainer evaluation (every `eval_steps`, and the final `trainer.evaluate()`)
on a fixed set of held-out pairs: at every token of each chosen response it takes the full next-token
distributions of the policy and of the reference (the frozen SFT adapter "ref" that TRL adds, or the model with
adapters disabled when the policy started from a full model) and logs

- `eval/kl/per_token`: mean over response tokens of KL(pi(.|context) || pi_ref(.|context)), in nats;
- `eval/kl/per_response`: the same summed over each response, averaged over responses.

Exact per position (no sampling), on the data's contexts rather than the policy's own samples: a drift measure
that is cheap and deterministic. Logged like the evaluation suite's metrics: to `state.log_history` and W&B.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainerCallback
from trl.data_utils import extract_prompt
from trl.trainer.utils import use_adapter


def _ids(tokenizer: PreTrainedTokenizerBase, messages_or_text, generation_prompt: bool) -> list[int]:
    if isinstance(messages_or_text, list):
        encoded = tokenizer.apply_chat_template(
            messages_or_text, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
        )
    else:
        encoded = tokenizer(text=messages_or_text)
    return list(encoded["input_ids"])


def response_batch(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, num_pairs: int, max_length: int | None
) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt + chosen for the first `num_pairs` rows, and where each response starts."""
    sequences, starts = [], []
    for row in dataset.select(range(min(num_pairs, len(dataset)))):
        if "prompt" not in row:
            row = {**row, **extract_prompt(row)}
        prompt_ids = _ids(tokenizer, row["prompt"], generation_prompt=True)
        full_ids = _ids(tokenizer, row["prompt"] + row["chosen"], generation_prompt=False)
        if max_length is not None:
            full_ids = full_ids[:max_length]
        if len(full_ids) > len(prompt_ids):
            sequences.append(full_ids)
            starts.append(len(prompt_ids))
    return sequences, starts


@torch.no_grad()
def reference_kl(model: torch.nn.Module, sequences: list[list[int]], starts: list[int], pad_id: int) -> dict:
    """Per-token and per-response KL(policy || reference) over the response tokens of `sequences`."""
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros_like(input_ids)
    response = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        input_ids[i, : len(seq)] = torch.tensor(seq, device=device)
        attention[i, : len(seq)] = 1
        response[i, start - 1 : len(seq) - 1] = True  # logits at t predict token t+1: the response's tokens
    policy_logp = F.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits.float(), dim=-1)
    reference = "ref" if "ref" in getattr(model, "peft_config", {}) else None
    with use_adapter(model, adapter_name=reference):
        ref_logp = F.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits.float(), dim=-1)
    per_position = (policy_logp.exp() * (policy_logp - ref_logp)).sum(-1) * response
    tokens = response.sum(-1).clamp(min=1)
    return {
        "eval/kl/per_token": (per_position.sum() / response.sum()).item(),
        "eval/kl/per_response": (per_position.sum(-1)).mean().item(),
        "eval/kl/response_tokens": (tokens.float().mean()).item(),
    }


class ReferenceKLCallback(TrainerCallback):
    """Logs `eval/kl/*` after every trainer evaluation (main process; the forward passes start no collective)."""

    def __init__(
        self, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, num_pairs: int = 16, max_length: int | None = 512
    ) -> None:
        self.sequences, self.starts = response_batch(dataset, tokenizer, num_pairs, max_length)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def on_evaluate(self, args, state, control, model=None, **kwargs) -> None:
        if not state.is_world_process_zero or model is None or not self.sequences:
            return
        if not hasattr(model, "peft_config"):  # full fine-tuning keeps a separate ref_model we cannot see here
            return
        device_type = next(model.parameters()).device.type
        autocast = (
            torch.autocast(device_type=device_type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
        )
        was_training = model.training
        model.eval()
        try:
            with autocast:
                metrics = reference_kl(model, self.sequences, self.starts, self.pad_id)
        finally:
            model.train(was_training)
        state.log_history.append({**metrics, "step": state.global_step})
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is not None:
            wandb.run.log({**metrics, "train/global_step": state.global_step})
