"""The tiny Llama base model: configuration, pretraining from random init on the corpus, and its metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from recipes.common.modeling import keep_4bit_weights_unpacked

from .math_problems import final_answer


@dataclass(frozen=True)
class PretrainSettings:
    """Sized for ~5 minutes on 2 CPU cores (~0.2 s a step).

    The model first learns the format, then to copy numbers from the question, and then, fairly suddenly, the
    arithmetic; when that happens depends on the seed. Measured (greedy accuracy of the base model on the 150 demo
    test problems, demo version 3 shapes, one thread): without the arithmetic table in the corpus, seeds 0 / 1 / 2
    reached 79% / 47% / 50% after 1000 steps; with it (`datasets.ARITHMETIC_DRILLS`) seed 2 reached 70% after 1000.
    1400 steps with the table leave every seed past the jump, so that SFT's worked solutions are mostly right, which
    is what RL needs to have something to reinforce. All shapes are multiples of 64: bitsandbytes' CPU kernels need
    in_features to be (tests/unit/test_4bit_cpu.py).
    """

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 384
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 1400
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01


def build_model(tokenizer: PreTrainedTokenizerBase, settings: PretrainSettings, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=128,
    )
    return model


def pack(tokenizer: PreTrainedTokenizerBase, documents: list[str], seq_len: int) -> torch.Tensor:
    """BOS + document + EOS, concatenated and cut into rows of `seq_len` (the remainder is dropped)."""
    ids: list[int] = []
    for encoded in tokenizer(documents)["input_ids"]:  # the tokenizer adds BOS itself
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    rows = len(ids) // seq_len
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def pretrain(
    model: LlamaForCausalLM,
    data: torch.Tensor,
    settings: PretrainSettings,
    seed: int,
    log: Callable[[str], None] = print,
) -> list[float]:
    """AdamW with linear warmup and cosine decay over a fixed number of steps; returns the loss per step."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )

    def schedule(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator)
    position, losses, start = 0, [], time.perf_counter()
    model.train()
    for step in range(settings.steps):
        if position + settings.batch_size > len(order):  # next epoch, new order
            order, position = torch.randperm(len(data), generator=generator), 0
        batch = data[order[position : position + settings.batch_size]]
        position += settings.batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == settings.steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(f"  step {step + 1}/{settings.steps}  loss {recent:.3f}  {time.perf_counter() - start:.0f}s")
    model.eval()
    return losses


@torch.no_grad()
def mean_loss(model: torch.nn.Module, data: torch.Tensor, batch_size: int = 16) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(data), batch_size):
        batch = data[i : i + batch_size]
        total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    return total / len(data)


@torch.no_grad()
def gsm_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[dict],
    max_new_tokens: int = 80,
    batch_size: int = 50,
) -> dict[str, float]:
    """Greedy accuracy with the raw-text prompt "Question: ...\\nAnswer:", overall and per level."""
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    correct: dict[int, list[bool]] = {}
    try:
        for i in range(0, len(problems), batch_size):
            chunk = problems[i : i + batch_size]
            prompts = [f"Question: {p['question']}\nAnswer:" for p in chunk]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for problem, text in zip(chunk, texts):
                prediction = final_answer(text.split("\n\n")[0])  # a blank line ends the answer
                correct.setdefault(problem["level"], []).append(prediction == final_answer(problem["answer"]))
    finally:
        tokenizer.padding_side = padding_side
    scores = {f"level_{level}": sum(v) / len(v) for level, v in sorted(correct.items())}
    scores["overall"] = sum(sum(v) for v in correct.values()) / sum(len(v) for v in correct.values())
    return scores


def load_4bit(path: Path) -> torch.nn.Module:
    """The QLoRA loading of the recipes: NF4 with double quantization, float32 compute (CPU)."""
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32)
    return keep_4bit_weights_unpacked(model)
