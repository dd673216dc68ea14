"""Batched generation and batched log-likelihood for any causal LM (full, LoRA, 4-bit), results in input order.

Both sort the work by length (longest first, so a batch holds similar lengths and an out-of-memory error shows up
at once), left-pad each batch, and put results back in the caller's order. Tokenization follows
lm-evaluation-harness: the tokenizer's own special tokens (e.g. BOS) are added unless the text already starts
with the BOS string (a rendered chat template), and over-long contexts are truncated from the left.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria

# Used when the model config names no maximum length; long enough for 5-shot GSM8K with a subword tokenizer.
FALLBACK_MAX_LENGTH = 4096


@dataclass
class Completion:
    """One generated response."""

    text: str  # decoded, special tokens skipped, cut before the first stop string
    hit_limit: bool  # generation ran into max_new_tokens (no EOS, no stop string)
    prompt_ids: list[int] = field(repr=False)  # the (possibly left-truncated) prompt the model saw
    token_ids: list[int] = field(repr=False)  # the sampled tokens up to the stop point, EOS included if produced


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def max_model_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> int:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        return model_max
    return FALLBACK_MAX_LENGTH


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id  # only ever used under a zero attention mask
    return 0


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response: the generation config's EOS ids (chat models list several) and the
    tokenizer's."""
    ids: list[int] = []
    gen_config = getattr(model, "generation_config", None)
    configured = getattr(gen_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif isinstance(configured, (list, tuple)):
        ids.extend(int(i) for i in configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids as lm-evaluation-harness makes them: the tokenizer's special tokens unless BOS is already there."""
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


class _StopOnStrings(StoppingCriteria):
    """Marks a row finished once its generated text (never the prompt) contains a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str], prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_width = prompt_width
        # A stop string of L characters spans at most L tokens (every token decodes to at least one character).
        self.lookback = max((len(s) for s in self.stop), default=1) + 2
        self.stopped_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_width :]
        tails = self.tokenizer.batch_decode(generated[:, -self.lookback :], skip_special_tokens=True)
        done = []
        for row, tail in enumerate(tails):
            hit = row in self.stopped_at or any(s in tail for s in self.stop)
            if hit and row not in self.stopped_at:
                self.stopped_at[row] = generated.shape[1]
            done.append(hit)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    stop: Sequence[str] = (),
    seed: int | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[list[Completion]]:
    """Generate `num_return_sequences` completions per prompt; `result[i][j]` is sample j of prompt i.

    Greedy unless `do_sample`; sampling is plain ancestral sampling at `temperature` (no top-k, top-p 1.0 unless
    given), so at temperature 1.0 the samples follow the policy, which the KL estimate needs. `seed` seeds torch's
    global generator: pass it inside `torch.random.fork_rng()` to leave the caller's random stream untouched.
    """
    if not prompts:
        return []
    if num_return_sequences > 1 and not do_sample:
        raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy decoding repeats one answer).")
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
    max_prompt = max(1, max_model_length(model, tokenizer) - max_new_tokens)
    encoded = [encode(tokenizer, p)[-max_prompt:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    # transformers fills every field left None from the model's own generation_config, so each knob that reshapes
    # the distribution is set to its neutral value here: a checkpoint's repetition_penalty or top_k would otherwise
    # change what "greedy" or "a sample from the policy" means.
    sampling = (
        {"temperature": temperature, "top_p": top_p, "top_k": 0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
         "eta_cutoff": 0.0}
        if do_sample
        else {}
    )  # fmt: skip
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=do_sample,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_return_sequences=num_return_sequences,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
        **sampling,
    )
    if seed is not None:
        torch.manual_seed(seed)
    results: list[list[Completion]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False) as bar:
        for batch in _batches(order, batch_size):
            input_ids, attention_mask = _left_pad([encoded[i] for i in batch], pad_id, device)
            stopper = _StopOnStrings(tokenizer, stop, input_ids.shape[1]) if stop else None
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=gen_config,
                stopping_criteria=[stopper] if stopper else None,
            )
            generated = output[:, input_ids.shape[1] :].tolist()
            for row, ids in enumerate(generated):
                prompt_index = batch[row // num_return_sequences]
                end = len(ids)
                eos_at = next((t for t, tok in enumerate(ids) if tok in eos_ids), None)
                if eos_at is not None:
                    end = eos_at + 1
                if stopper is not None and row in stopper.stopped_at:
                    end = min(end, stopper.stopped_at[row])
                kept = ids[:end]
                text = tokenizer.decode(kept, skip_special_tokens=True)
                text, stopped = _cut_at_stop(text, stop)
                hit_limit = eos_at is None and not stopped and len(kept) >= max_new_tokens
                completion = Completion(
                    text=text, hit_limit=hit_limit, prompt_ids=encoded[prompt_index], token_ids=kept
                )
                results[prompt_index].append(completion)
            bar.update(len(batch))
    return results


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the forward can skip the vocabulary projection of positions nobody scores (transformers >= 4.50
    models): a large saving in time and memory with big vocabularies and long contexts."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    # As lm-evaluation-harness: trailing spaces of the context join the continuation, and the continuation's ids
    # are the tail of the whole text's ids, so word-boundary merges come out as in running text.
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def score_token_ids(
    model: PreTrainedModel,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int = 0,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "log-likelihood",
) -> list[float]:
    """Sum of log p(continuation | context) for each (context ids, continuation ids) pair, in input order.

    Pairs whose model input (context + continuation minus its last token) is identical share one forward pass:
    MMLU's four one-token answers to the same question cost one pass, not four.
    """
    if not pairs:
        return []
    device = model_device(model)
    max_length = max_length or max_model_length(model)
    inputs: dict[tuple[int, ...], list[int]] = {}
    targets: list[tuple[tuple[int, ...], list[int]]] = []
    for index, (context, continuation) in enumerate(pairs):
        if not continuation:
            raise ValueError(f"Pair {index} has an empty continuation: nothing to score.")
        whole = list(context) + list(continuation)
        model_input = tuple(whole[-(max_length + 1) :][:-1])
        inputs.setdefault(model_input, []).append(index)
        targets.append((model_input, list(continuation)))
    unique = sorted(inputs, key=len, reverse=True)
    keep_logits = accepts_logits_to_keep(model)
    scores: list[float] = [math.nan] * len(pairs)
    with tqdm(total=len(pairs), desc=desc, disable=not progress, leave=False) as bar:
        for batch in _batches(range(len(unique)), batch_size):
            rows = [unique[i] for i in batch]
            input_ids, attention_mask = _left_pad(rows, pad_id, device)
            # Left padding shifts every position; explicit position ids keep absolute-position models exact.
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            kwargs = {}
            if keep_logits:  # rows end together (left padding), so the scored positions are the last few
                kwargs["logits_to_keep"] = max(len(targets[i][1]) for key in rows for i in inputs[key])
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
            ).logits
            for row, key in enumerate(rows):
                for index in inputs[key]:
                    continuation = targets[index][1]
                    tail = logits[row, -len(continuation) :, :].float()
                    logprobs = torch.log_softmax(tail, dim=-1)
                    token_ids = torch.tensor(continuation, device=logprobs.device).unsqueeze(-1)
                    scores[index] = logprobs.gather(-1, token_ids).sum().item()
                    bar.update(1)
    return scores


def loglikelihood(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "log-likelihood",
) -> list[float]:
    """Sum of log p(continuation | context) for each (context, continuation) text pair, in input order."""
    pairs = [_encode_pair(tokenizer, context, continuation) for context, continuation in requests]
    return score_token_ids(
        model,
        pairs,
        pad_id=pad_token_id(tokenizer),
        batch_size=batch_size,
        max_length=max_model_length(model, tokenizer),
        progress=progress,
        desc=desc,
    )
